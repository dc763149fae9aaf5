// CUDA kernel of splice::quant_matmul, free of torch headers: a dequantizing GEMV/GEMM, one warp per
// (output row, block of kQuantTokens tokens), fp32 accumulation. The math is stated in
// python/splice/ops/quant_matmul_reference.py, the packed layout in csrc/cpu/quant_layout.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "quant_layout.h"

namespace splice {
namespace gpu {

// Row-major, contiguous operands; bias may be null.
template <typename T>
struct QuantMatmulArgs {
  const T* x;               // [tokens, in_features]
  const uint8_t* qweight;   // [out_features, quant_row_bytes(in_features, bits)]
  const __half* scales;     // [out_features, groups]
  const __half* zeros;      // [out_features, groups]
  const float* bias;        // [out_features] or null
  T* y;                     // [tokens, out_features]
  int64_t tokens, out_features, in_features, group_size;
  int bits;
};

constexpr int kQuantWarps = 8;   // rows per thread block
constexpr int kQuantTokens = 8;  // tokens per warp: each weight is decoded once for all of them

template <typename T> __device__ __forceinline__ float q_to_float(T v);
template <> __device__ __forceinline__ float q_to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float q_to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T q_from_float(float v);
template <> __device__ __forceinline__ float q_from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 q_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int B>
__global__ void quant_matmul_kernel(QuantMatmulArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (n >= a.out_features) return;
  const int64_t k_total = a.in_features, kp = quant_padded_k(k_total);
  const int64_t groups = (k_total + a.group_size - 1) / a.group_size;
  const uint8_t* row = a.qweight + n * quant_row_bytes(k_total, B);
  for (int64_t t0 = blockIdx.y * kQuantTokens; t0 < a.tokens; t0 += gridDim.y * kQuantTokens) {
    const int64_t nt = a.tokens - t0 < kQuantTokens ? a.tokens - t0 : kQuantTokens;
    const T* xr = a.x + t0 * k_total;
    float acc[kQuantTokens] = {};
    for (int64_t k = lane; k < k_total; k += 32) {
      const int64_t g = k / a.group_size;
      const float s = __half2float(a.scales[n * groups + g]), z = __half2float(a.zeros[n * groups + g]);
      const float w = (static_cast<float>(quant_code(row, k, B, kp)) - z) * s;
#pragma unroll
      for (int j = 0; j < kQuantTokens; ++j)
        if (j < nt) acc[j] += q_to_float(xr[j * k_total + k]) * w;
    }
#pragma unroll
    for (int j = 0; j < kQuantTokens; ++j) {
      for (int o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
      if (lane == 0 && j < nt)
        a.y[(t0 + j) * a.out_features + n] = q_from_float<T>(acc[j] + (a.bias ? a.bias[n] : 0.f));
    }
  }
}

template <typename T>
cudaError_t launch_quant_matmul(const QuantMatmulArgs<T>& a, cudaStream_t stream) {
  if (a.tokens == 0) return cudaSuccess;
  const int64_t blocks_t = (a.tokens + kQuantTokens - 1) / kQuantTokens;
  const dim3 grid(static_cast<unsigned>((a.out_features + kQuantWarps - 1) / kQuantWarps),
                  static_cast<unsigned>(blocks_t < 65535 ? blocks_t : 65535));
  const dim3 block(32 * kQuantWarps);
  switch (a.bits) {
    case 2: quant_matmul_kernel<T, 2><<<grid, block, 0, stream>>>(a); break;
    case 3: quant_matmul_kernel<T, 3><<<grid, block, 0, stream>>>(a); break;
    case 4: quant_matmul_kernel<T, 4><<<grid, block, 0, stream>>>(a); break;
    case 8: quant_matmul_kernel<T, 8><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace splice
