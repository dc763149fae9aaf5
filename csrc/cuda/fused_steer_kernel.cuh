// CUDA kernel of splice::fused_steer, free of torch headers: residual add + steering + RMSNorm,
// one thread block per token, fp32 math and block-wide reductions. The math is stated in
// python/splice/ops/steer_reference.py; this file must match it (and csrc/cpu/fused_steer.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "steer_params.h"

namespace splice {
namespace gpu {

// Row-major, contiguous operands. delta, vecs/params, weight/out, gates may be null (absent);
// vecs/params are also null for a table of no entries, gates for a row of no gates (num_gates 0).
// slot values must lie in [0, slots) wherever a table was given (slots >= 0; -1: no table); weight
// is float32 (offset not yet added).
template <typename T>
struct SteerArgs {
  const T* x;             // [tokens, hidden]
  const T* delta;         // [tokens, hidden] or null
  const float* vecs;      // [slots, entries, hidden] or null
  const float* params;    // [slots, entries, kNumParams] or null
  const int32_t* slot;    // [tokens]
  const int64_t* pos;     // [tokens]
  const bool* gen;        // [tokens]
  const float* weight;    // [hidden] or null
  const float* gates;     // [tokens, num_gates] or null
  T* resid;               // [tokens, hidden]
  T* out;                 // [tokens, hidden], null iff weight is null
  int64_t tokens, hidden, entries, slots, num_gates;
  float eps, weight_offset;
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);  // round to nearest even
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Sum of v over the block (blockDim.x a multiple of 32); every thread must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch is free again
  return v;
}

__device__ __forceinline__ bool entry_active(const float* p, int64_t pos, bool gen) {
  const float posf = static_cast<float>(pos);
  if (!(p[kStart] <= posf && posf < p[kEnd])) return false;
  const float phase = p[kPhase];
  return phase == kPhaseAll || (phase == kPhasePrompt && !gen) || (phase == kPhaseGenerated && gen);
}

// <u, v> over the block, u in shared memory (each thread reads its own elements); every thread
// gets the sum and must call it.
__device__ __forceinline__ float block_dot(const float* u, const float* v, int64_t h, float* scratch) {
  float part = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) part += u[i] * v[i];
  return block_sum(part, scratch);
}

// The gate register's new value from an admitted KIND_GATE entry p (see steer_layout.py): the row
// gate row_gates[index] (0 past num_gates) when index >= 0, else sigmoid((s - lo) * alpha) of the
// score s = <u, v> (beta = 1: <u, v> / |u|), [s > lo] when alpha is infinite. Block-uniform.
__device__ __forceinline__ float gate_value(const float* u, const float* v, const float* p, int64_t index,
                                            const float* row_gates, int64_t num_gates, int64_t h,
                                            float* scratch) {
  if (index >= 0) return index < num_gates ? row_gates[index] : 0.f;
  float score = block_dot(u, v, h, scratch);
  if (p[kBeta] == 1.f) score /= fmaxf(sqrtf(block_dot(u, u, h, scratch)), 1e-30f);
  if (isinf(p[kAlpha])) return score > p[kLo] ? 1.f : 0.f;
  return 1.f / (1.f + expf(-(score - p[kLo]) * p[kAlpha]));
}

// Block t handles token t; u (the steered row, fp32) lives in dynamic shared memory, each thread
// owning the elements i = threadIdx.x (mod blockDim.x).
template <typename T>
__global__ void fused_steer_kernel(const SteerArgs<T> a) {
  extern __shared__ float u[];
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x, h = a.hidden;
  const T* xr = a.x + t * h;
  const T* src = a.delta ? a.delta + t * h : xr;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) u[i] = to_float(src[i]);

  const int32_t s = a.slot[t];
  const bool in_range = a.slots < 0 || (s >= 0 && s < a.slots);
  // An out-of-range slot fails a device-side assert, kept under NDEBUG like torch's CUDA_KERNEL_ASSERT
  // (the next synchronising CUDA call raises); its token is left unsteered and no table row is read.
  if (!in_range) __assert_fail("fused_steer: slot value out of range", __FILE__, __LINE__, __func__);
  if (a.vecs && s != 0 && in_range) {
    const float* vs = a.vecs + s * a.entries * h;
    const float* ps = a.params + s * a.entries * kNumParams;
    const int64_t pos = a.pos[t];
    const bool gen = a.gen[t];
    const float* row_gates = a.gates ? a.gates + t * a.num_gates : nullptr;
    float g = 1.f;              // the gate register
    float reg[kMaxRank] = {};   // the low-rank registers (the same in every thread)
    for (int64_t k = 0; k < a.entries; ++k) {
      const float* p = ps + k * kNumParams;
      const int kind = static_cast<int>(p[kKind]);
      if (kind == kKindProject && p[kAlpha] == 0.f && p[kBeta] == 0.f) continue;
      if (!entry_active(p, pos, gen)) {
        if (kind == kKindGate) g = 0.f;
        continue;
      }
      const float* v = vs + k * h;
      const float f = p[kGated] == 1.f ? g : 1.f;
      const int64_t index = static_cast<int64_t>(p[kIndex]);
      const bool reg_ok = index >= 0 && index < kMaxRank;
      switch (kind) {
        case kKindProject: {
          float gain = p[kAlpha];
          if (p[kBeta] != 0.f) {
            const float proj = block_dot(u, v, h, scratch);
            gain += p[kBeta] * (fminf(fmaxf(proj, p[kLo]), p[kHi]) - proj);
          }
          for (int64_t i = threadIdx.x; i < h; i += blockDim.x) u[i] += f * gain * v[i];
          break;
        }
        case kKindGate:
          g = gate_value(u, v, p, index, row_gates, a.num_gates, h, scratch);
          break;
        case kKindScale:
          for (int64_t i = threadIdx.x; i < h; i += blockDim.x) u[i] += f * p[kAlpha] * v[i] * u[i];
          break;
        case kKindRead:
          if (reg_ok) reg[index] = block_dot(u, v, h, scratch);
          break;
        case kKindWrite:
          if (reg_ok) {
            const float c = f * p[kAlpha] * (reg[index] - p[kLo]);
            for (int64_t i = threadIdx.x; i < h; i += blockDim.x) u[i] += c * v[i];
          }
          break;
        default:
          break;
      }
    }
  }

  T* rr = a.resid + t * h;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const T rounded = from_float<T>(a.delta ? to_float(xr[i]) + u[i] : u[i]);
    rr[i] = rounded;
    u[i] = to_float(rounded);
    ss += u[i] * u[i];
  }
  if (!a.out) return;
  const float inv = rsqrtf(block_sum(ss, scratch) / static_cast<float>(h) + a.eps);
  T* orow = a.out + t * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    orow[i] = from_float<T>(u[i] * inv * (a.weight[i] + a.weight_offset));
}

// Launches one block per token on stream; returns the launch (or attribute) error.
template <typename T>
cudaError_t launch_fused_steer(const SteerArgs<T>& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.hidden == 0) return cudaSuccess;
  const int64_t warps = (a.hidden + 31) / 32;
  const int threads = static_cast<int>(32 * (warps < 32 ? warps : 32));
  const size_t smem = static_cast<size_t>(a.hidden) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(fused_steer_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  fused_steer_kernel<T><<<static_cast<unsigned>(a.tokens), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace splice
