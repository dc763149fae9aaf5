// CUDA kernel of the activation quantization of splice::quant_matmul_a8, free of torch headers (math:
// python/splice/ops/act_quant.py; the same codes as csrc/cpu/act_quant.h). One warp per block of 32
// values of one token: d = max|x| / 127, x̂ = d · round_half_even(x · (127 / max|x|)), in IEEE-rounded
// fp32 (__fdiv_rn, __fmul_rn) so --use_fast_math cannot change a code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "quant_matmul_kernel.cuh"

namespace splice {
namespace gpu {

constexpr int kActWarps = 8;  // blocks of 32 values per thread block

template <typename T>
__global__ void act_quant_kernel(const T* __restrict__ x, float* __restrict__ xq, int64_t tokens, int64_t k,
                                 int64_t blocks) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kActWarps + threadIdx.x / 32;
  if (block >= tokens * blocks) return;  // uniform over the warp
  const int64_t t = block / blocks, i = (block % blocks) * 32 + threadIdx.x % 32;
  const float v = i < k ? q_to_float(x[t * k + i]) : 0.f;
  float amax = fabsf(v);
  for (int lanes = 16; lanes > 0; lanes >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, lanes));
  if (i >= k) return;
  const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
  xq[t * k + i] = __fmul_rn(rintf(__fmul_rn(v, inv)), __fdiv_rn(amax, 127.f));
}

// x̂ [tokens, k] fp32 of x [tokens, k] (row-major, contiguous) on stream.
template <typename T>
cudaError_t launch_act_quant(const T* x, float* xq, int64_t tokens, int64_t k, cudaStream_t stream) {
  const int64_t blocks = (k + 31) / 32, warps = tokens * blocks;
  if (warps == 0) return cudaSuccess;
  const auto grid = static_cast<unsigned>((warps + kActWarps - 1) / kActWarps);
  act_quant_kernel<T><<<grid, kActWarps * 32, 0, stream>>>(x, xq, tokens, k, blocks);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace splice
