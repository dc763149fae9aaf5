// CUDA kernel of splice::index_attention, free of torch headers: one warp per query (b, h), as for
// decode_attention (attention_kernel.cuh, whose per-key warp step it shares). The warp walks idx[b, g]
// in tiles of 32 entries, each lane reading one; an entry past the cache fails a device assert (kept
// under NDEBUG, like torch's CUDA_KERNEL_ASSERT, and never read); the key and value rows of the tile's
// non-negative entries are then folded in one at a time, read where the cache holds them. The
// contract is python/splice/ops/index_attention_reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_kernel.cuh"

namespace splice {
namespace gpu {

// q/out [B, Hq, D] and idx [B, Hkv, K] contiguous; k/v [B, Hkv, L, D] with unit stride along D.
template <typename T>
struct IndexAttentionArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  const int64_t* idx;
  int64_t batch, q_heads, kv_heads, slots, count, head_dim;  // slots = L, count = K
  int64_t k_stride[3], v_stride[3];                           // elements, along B, Hkv and L
  float scale;
  float softcap;  // > 0: scores are soft-capped, s = softcap · tanh(s / softcap)
};

template <typename T>
__global__ void index_attention_kernel(const IndexAttentionArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (query >= a.batch * a.q_heads) return;
  const int64_t b = query / a.q_heads, g = (query % a.q_heads) / (a.q_heads / a.kv_heads), d = a.head_dim;
  WarpQuery w = attn_load_query(a.q + query * d, d, a.scale);
  const T* kb = a.k + b * a.k_stride[0] + g * a.k_stride[1];
  const T* vb = a.v + b * a.v_stride[0] + g * a.v_stride[1];
  const int64_t* entries = a.idx + (b * a.kv_heads + g) * a.count;
  for (int64_t j0 = 0; j0 < a.count; j0 += 32) {
    const int64_t slot = j0 + lane < a.count ? entries[j0 + lane] : -1;
    if (slot >= a.slots) __assert_fail("index_attention: idx value out of range", __FILE__, __LINE__, __func__);
    unsigned todo = __ballot_sync(0xffffffffu, slot >= 0 && slot < a.slots);
    while (todo != 0u) {  // the tile's slots, one at a time
      const int src = __ffs(todo) - 1;
      todo &= todo - 1u;
      const int64_t s = __shfl_sync(0xffffffffu, slot, src);
      attn_fold_key(w, kb + s * a.k_stride[2], vb + s * a.v_stride[2], a.softcap);
    }
  }
  attn_store(w, a.out + query * d);
}

// Launches index_attention on stream (head_dim at most 256); returns the launch error.
template <typename T>
cudaError_t launch_index_attention(const IndexAttentionArgs<T>& a, cudaStream_t stream) {
  const int64_t queries = a.batch * a.q_heads;
  if (queries == 0 || a.head_dim == 0) return cudaSuccess;
  if (a.head_dim > 32 * kAttnMaxChunks || a.kv_heads <= 0) return cudaErrorInvalidValue;
  const int64_t blocks = (queries + kAttnWarps - 1) / kAttnWarps;
  index_attention_kernel<T><<<static_cast<unsigned>(blocks), 32 * kAttnWarps, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace splice
