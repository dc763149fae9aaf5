// CUDA kernels of splice::band_attention and splice::decode_attention, free of torch headers: one warp
// per query, each lane holding D / 32 of its dimensions, an online softmax over the keys in tiles of 32.
// Each lane tests one key of a tile; a tile that no key of which the query may read is skipped after
// that test (streaming heads read only their sinks and window), and the warp then walks only the
// readable keys of the tile. The contract is python/splice/ops/attention_reference.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace splice {
namespace gpu {

// Contiguous operands. band: q/out [B, Hq, T, D], k/v [B, Hkv, T, D], queries = keys = T.
// decode: q/out [B, Hq, D], k/v [B, Hkv, L, D], queries = 1, keys = L; pos, sinks, window unused.
template <typename T>
struct AttentionArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  const int64_t* pos;     // [B, T]
  const bool* valid;      // [B, keys]
  const int64_t* sinks;   // [Hkv]
  const int64_t* window;  // [Hkv]
  int64_t batch, q_heads, kv_heads, queries, keys, head_dim;
  float scale;
  float softcap;  // > 0: scores are soft-capped, s = softcap · tanh(s / softcap)
};

constexpr int kAttnWarps = 4;        // queries per thread block
constexpr int kAttnMaxChunks = 8;    // head_dim <= 32 * 8

template <typename T> __device__ __forceinline__ float attn_to_float(T v);
template <> __device__ __forceinline__ float attn_to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float attn_to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float attn_to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T attn_from_float(float v);
template <> __device__ __forceinline__ float attn_from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 attn_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half attn_from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T, bool kBand>
__global__ void attention_kernel(const AttentionArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (query >= a.batch * a.q_heads * a.queries) return;
  const int64_t bh = query / a.queries, i = query % a.queries, b = bh / a.q_heads;
  const int64_t g = (bh % a.q_heads) / (a.q_heads / a.kv_heads), d = a.head_dim;
  const int chunks = static_cast<int>((d + 31) / 32);
  float q[kAttnMaxChunks], acc[kAttnMaxChunks];
  const T* qr = a.q + query * d;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = lane + 32 * c;
    q[c] = c < chunks && e < d ? attn_to_float(qr[e]) * a.scale : 0.f;
    acc[c] = 0.f;
  }
  int64_t sinks = 0, window = 0, pi = 0;
  if (kBand) sinks = a.sinks[g], window = a.window[g], pi = a.pos[b * a.keys + i];
  const int64_t last = kBand ? i : a.keys - 1;  // causal: keys up to the query itself
  const T* kb = a.k + (b * a.kv_heads + g) * a.keys * d;
  const T* vb = a.v + (b * a.kv_heads + g) * a.keys * d;
  float m = -INFINITY, l = 0.f;
  for (int64_t j0 = 0; j0 <= last; j0 += 32) {
    const int64_t j = j0 + lane;
    bool ok = j <= last && a.valid[b * a.keys + j];
    if (kBand && ok) {
      const int64_t pj = a.pos[b * a.keys + j];
      ok = window <= 0 || pi - pj < window || pj < sinks;
    }
    unsigned todo = __ballot_sync(0xffffffffu, ok);
    while (todo != 0u) {  // the readable keys of the tile, one at a time
      const int src = __ffs(todo) - 1;
      todo &= todo - 1u;
      const T* kr = kb + (j0 + src) * d;
      const T* vr = vb + (j0 + src) * d;
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < kAttnMaxChunks; ++c) {
        const int64_t e = lane + 32 * c;
        if (c < chunks && e < d) s += q[c] * attn_to_float(kr[e]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (a.softcap > 0.f) s = a.softcap * tanhf(s / a.softcap);
      const float m_new = fmaxf(m, s), corr = __expf(m - m_new), p = __expf(s - m_new);
      l = l * corr + p;
      m = m_new;
#pragma unroll
      for (int c = 0; c < kAttnMaxChunks; ++c) {
        const int64_t e = lane + 32 * c;
        if (c < chunks && e < d) acc[c] = acc[c] * corr + p * attn_to_float(vr[e]);
      }
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* orow = a.out + query * d;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = lane + 32 * c;
    if (c < chunks && e < d) orow[e] = attn_from_float<T>(acc[c] * inv);
  }
}

template <typename T, bool kBand>
cudaError_t launch_attention(const AttentionArgs<T>& a, cudaStream_t stream) {
  const int64_t queries = a.batch * a.q_heads * a.queries;
  if (queries == 0 || a.head_dim == 0) return cudaSuccess;
  if (a.head_dim > 32 * kAttnMaxChunks || a.kv_heads <= 0) return cudaErrorInvalidValue;
  const int64_t blocks = (queries + kAttnWarps - 1) / kAttnWarps;
  attention_kernel<T, kBand><<<static_cast<unsigned>(blocks), 32 * kAttnWarps, 0, stream>>>(a);
  return cudaGetLastError();
}

// Launches band_attention on stream (head_dim at most 256); returns the launch error.
template <typename T>
cudaError_t launch_band_attention(const AttentionArgs<T>& a, cudaStream_t stream) {
  return launch_attention<T, true>(a, stream);
}

// Launches decode_attention on stream (head_dim at most 256); returns the launch error.
template <typename T>
cudaError_t launch_decode_attention(const AttentionArgs<T>& a, cudaStream_t stream) {
  return launch_attention<T, false>(a, stream);
}

}  // namespace gpu
}  // namespace splice
