// CUDA kernels of splice::band_attention and splice::decode_attention, free of torch headers: one warp
// per query, each lane holding D / 32 of its dimensions, an online softmax over the keys in tiles of 32.
// Each lane tests one key of a tile; a tile that no key of which the query may read is skipped after
// that test (streaming heads read only their sinks and window), and the warp then walks only the
// readable keys of the tile (that per-key step, WarpQuery and attn_fold_key, also serves
// index_attention_kernel.cuh). The contract is python/splice/ops/attention_reference.py.
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

// The online softmax of one query, held by a warp: lane `lane` holds dimensions lane + 32c (c < chunks,
// below d) of the scaled query and of the unnormalised output, and every lane the running max and sum.
struct WarpQuery {
  float q[kAttnMaxChunks], acc[kAttnMaxChunks];
  float m, l;
  int64_t d;
  int chunks, lane;
};

template <typename T>
__device__ __forceinline__ WarpQuery attn_load_query(const T* qr, int64_t d, float scale) {
  WarpQuery w;
  w.d = d, w.chunks = static_cast<int>((d + 31) / 32), w.lane = threadIdx.x & 31;
  w.m = -INFINITY, w.l = 0.f;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = w.lane + 32 * c;
    w.q[c] = c < w.chunks && e < d ? attn_to_float(qr[e]) * scale : 0.f;
    w.acc[c] = 0.f;
  }
  return w;
}

// Folds key row kr and value row vr into w (every lane of the warp takes part); softcap > 0 soft-caps
// the score, s = softcap · tanh(s / softcap).
template <typename T>
__device__ __forceinline__ void attn_fold_key(WarpQuery& w, const T* kr, const T* vr, float softcap) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = w.lane + 32 * c;
    if (c < w.chunks && e < w.d) s += w.q[c] * attn_to_float(kr[e]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (softcap > 0.f) s = softcap * tanhf(s / softcap);
  const float m_new = fmaxf(w.m, s), corr = __expf(w.m - m_new), p = __expf(s - m_new);
  w.l = w.l * corr + p;
  w.m = m_new;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = w.lane + 32 * c;
    if (c < w.chunks && e < w.d) w.acc[c] = w.acc[c] * corr + p * attn_to_float(vr[e]);
  }
}

// orow [d] = the normalised output, or 0 where no key was read.
template <typename T>
__device__ __forceinline__ void attn_store(const WarpQuery& w, T* orow) {
  const float inv = w.l > 0.f ? 1.f / w.l : 0.f;
#pragma unroll
  for (int c = 0; c < kAttnMaxChunks; ++c) {
    const int64_t e = w.lane + 32 * c;
    if (c < w.chunks && e < w.d) orow[e] = attn_from_float<T>(w.acc[c] * inv);
  }
}

template <typename T, bool kBand>
__global__ void attention_kernel(const AttentionArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (query >= a.batch * a.q_heads * a.queries) return;
  const int64_t bh = query / a.queries, i = query % a.queries, b = bh / a.q_heads;
  const int64_t g = (bh % a.q_heads) / (a.q_heads / a.kv_heads), d = a.head_dim;
  WarpQuery w = attn_load_query(a.q + query * d, d, a.scale);
  int64_t sinks = 0, window = 0, pi = 0;
  if (kBand) sinks = a.sinks[g], window = a.window[g], pi = a.pos[b * a.keys + i];
  const int64_t last = kBand ? i : a.keys - 1;  // causal: keys up to the query itself
  const T* kb = a.k + (b * a.kv_heads + g) * a.keys * d;
  const T* vb = a.v + (b * a.kv_heads + g) * a.keys * d;
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
      attn_fold_key(w, kb + (j0 + src) * d, vb + (j0 + src) * d, a.softcap);
    }
  }
  attn_store(w, a.out + query * d);
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
