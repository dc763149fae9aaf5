// The packed weight layout of splice::quant_matmul, free of torch headers (CPU, CUDA). The format is
// documented in python/splice/quant/packing.py; this file must match it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPLICE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPLICE_HOST_DEVICE inline
#endif

namespace splice {

constexpr int64_t kQuantTile = 64;  // rows are zero-padded to a multiple of this many codes
constexpr int64_t kQuantChunk = 16;  // codes decoded together (one AVX-512 register of fp32)

SPLICE_HOST_DEVICE int64_t quant_padded_k(int64_t k) { return (k + kQuantTile - 1) / kQuantTile * kQuantTile; }

SPLICE_HOST_DEVICE int64_t quant_row_bytes(int64_t k, int bits) { return quant_padded_k(k) * bits / 8; }

// Code k (< kp, the padded row length) of one packed row of `bits`-bit codes.
SPLICE_HOST_DEVICE int quant_code(const uint8_t* row, int64_t k, int bits, int64_t kp) {
  if (bits == 8) return row[k];
  if (bits == 4) return (row[(k >> 5) * 16 + (k & 15)] >> (4 * ((k >> 4) & 1))) & 15;
  const int low = (row[(k >> 6) * 16 + (k & 15)] >> (2 * ((k >> 4) & 3))) & 3;
  if (bits == 2) return low;
  return low | (((row[kp / 4 + (k >> 3)] >> (k & 7)) & 1) << 2);  // bits == 3
}

}  // namespace splice
