// CPU kernel of splice::index_attention: one query per row attending to the cache slots that idx
// names for its KV head (negative entries skipped). The contract is
// python/splice/ops/index_attention_reference.py.
//
// One task per (batch, KV head) runs the query heads of the group together (flash-decoding chunks of
// idx where there are fewer pairs than threads: attention_online.h). It takes the next kBlock
// non-negative slots, reads each key row where the cache holds it, once, converted to fp32 16 lanes at
// a time, for the dot products of up to four of the group's queries (four keys at a time, their lane
// sums reduced together), takes one online-softmax step in fp32 over the block, then reads each value
// row once for the axpys into up to four outputs held in registers (AVX-512 when compiled with it).
// Nothing is copied, sorted or transposed; rows a few keys ahead are prefetched. k and v may be
// strided in every dimension but the last.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attention_online.h"
#include "index_attention_checks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPLICE_INDEX_AVX512 1
#else
#define SPLICE_INDEX_AVX512 0
#endif

namespace splice {
namespace {

using namespace attn;

constexpr int64_t kMinIndexChunk = 256;  // fewest idx entries per task
constexpr int64_t kAhead = 8;            // key rows prefetched ahead of their use

// Raises IndexError, before anything is computed, unless every value of idx [B, Hkv, K] is below L.
void check_slots(const int64_t* idx, int64_t B, int64_t Hkv, int64_t K, int64_t L) {
  const int64_t n = B * Hkv * K;
  int64_t hi = -1;
  for (int64_t i = 0; i < n; ++i) hi = std::max(hi, idx[i]);
  if (hi < L) return;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] < L, "index_attention: idx[", i / (Hkv * K), ", ", i / K % Hkv, ", ", i % K,
                      "] = ", idx[i], " is out of range for ", L, " slots");
}

// Asks for the cache lines of bytes [p, p + n), n > 0, ahead of their use.
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i);
  __builtin_prefetch(c + n - 1);
}

#if SPLICE_INDEX_AVX512
// The first min(n, 16) lanes, n >= 1.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u); }

// 16 fp32 lanes from p[0, min(n, 16)), zero past n (n >= 1); nothing past n is read.
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline __m512 load16(const at::BFloat16* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p)); }

// f(std::integral_constant<int, n>) for n in 1..4.
template <typename F>
inline void with_count(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// The sums of the lanes of a0, a1, a2 and a3, in this order.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));  // 128-bit lane i: 4 partial sums of a_i
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, u));
}

// s[r, j] = q[r] · kr[j][0, d) for NR queries (rows of dp floats) and the nk key rows, four keys at a
// time (past nk the last row again: s there is written, to be masked by the caller). Value rows are
// prefetched as their keys are read, key rows kAhead keys ahead.
template <int NR, typename E>
inline void scores_rows(const float* q, const E* const* kr, const E* const* vr, int64_t nk, int64_t d,
                        int64_t dp, float* s) {
  const int64_t bytes = d * static_cast<int64_t>(sizeof(E));
  for (int64_t j0 = 0; j0 < nk; j0 += 4) {
    const E* rows[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t j = j0 + u;
      rows[u] = kr[std::min(j, nk - 1)];
      if (j + kAhead < nk) prefetch(kr[j + kAhead], bytes);
      if (j < nk) prefetch(vr[j], bytes);
    }
    __m512 acc[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      __m512 qv[NR];
      for (int r = 0; r < NR; ++r) qv[r] = _mm512_loadu_ps(q + r * dp + c);
      for (int u = 0; u < 4; ++u) {
        const __m512 kv = load16(rows[u] + c, d - c);
        for (int r = 0; r < NR; ++r) acc[r][u] = _mm512_fmadd_ps(qv[r], kv, acc[r][u]);
      }
    }
    for (int r = 0; r < NR; ++r)
      _mm_storeu_ps(s + r * kBlock + j0, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  }
}

// o[r, dc + 16·NV) += Σ_j p[r, j] · vr[j][dc + 16·NV) for NR queries, the sums kept in registers.
template <int NR, int NV, typename E>
inline void accumulate_cols(const float* p, const E* const* vr, int64_t nk, int64_t d, int64_t dp, float* o,
                            int64_t dc) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dp + dc + 16 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load16(vr[j] + dc + 16 * c, d - dc - 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * kBlock + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * dp + dc + 16 * c, acc[r][c]);
}

// s [rows, kBlock] = q [rows, dp] · the nk key rows, four queries at a time.
template <typename E>
inline void scores(const float* q, int64_t rows, const E* const* kr, const E* const* vr, int64_t nk, int64_t d,
                   int64_t dp, float* s) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    with_count(std::min<int64_t>(4, rows - r0), [&](auto nr) {
      scores_rows<decltype(nr)::value>(q + r0 * dp, kr, vr, nk, d, dp, s + r0 * kBlock);
    });
}

// o [rows, dp] += p [rows, kBlock] · the nk value rows, four queries and 64 columns at a time.
template <typename E>
inline void accumulate(const float* p, int64_t rows, const E* const* vr, int64_t nk, int64_t d, int64_t dp,
                       float* o) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t dc = 0; dc < dp; dc += 64)
      with_count(std::min<int64_t>(4, rows - r0), [&](auto nr) {
        with_count(std::min<int64_t>(4, (dp - dc) / 16), [&](auto nv) {
          accumulate_cols<decltype(nr)::value, decltype(nv)::value>(p + r0 * kBlock, vr, nk, d, dp, o + r0 * dp,
                                                                    dc);
        });
      });
}
#else
// Portable fallbacks: the same products, one element at a time.
template <typename E>
inline void scores(const float* q, int64_t rows, const E* const* kr, const E* const*, int64_t nk, int64_t d,
                   int64_t dp, float* s) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nk; ++j) {
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += q[r * dp + c] * static_cast<float>(kr[j][c]);
      s[r * kBlock + j] = acc;
    }
}

template <typename E>
inline void accumulate(const float* p, int64_t rows, const E* const* vr, int64_t nk, int64_t d, int64_t dp,
                       float* o) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < d; ++c) o[r * dp + c] += p[r * kBlock + j] * static_cast<float>(vr[j][c]);
}
#endif

// Folds the nk (<= kBlock) key / value rows kr, vr into the running softmax st of `rows` queries q
// [rows, dp] (already scaled); softcap > 0 soft-caps each score first, s = softcap · tanh(s / softcap).
template <typename E>
inline void fold_rows(Online& st, const float* q, int64_t rows, const E* const* kr, const E* const* vr, int64_t nk,
                      int64_t d, int64_t dp, float softcap) {
  scores(q, rows, kr, vr, nk, d, dp, st.s.data());
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = st.s.data() + r * kBlock;
    if (softcap > 0.f)
      for (int64_t j = 0; j < nk; ++j) sr[j] = softcap * std::tanh(sr[j] / softcap);
    std::fill(sr + nk, sr + kBlock, kNegInf);
    softmax_row(sr, st.m[r], st.l[r], st.o.data() + r * dp, dp);
  }
  accumulate(st.s.data(), rows, vr, nk, d, dp, st.o.data());
}

template <typename E>
at::Tensor index_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& idx, double scale, double softcap) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = k.size(2), K = idx.size(2);
  const int64_t group = Hq / Hkv, dp = padded_dim(D);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  check_slots(ip, B, Hkv, K, L);
  at::Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  DecodeSplit split(B * Hkv, group, dp, K, kMinIndexChunk);
  const E *qp = q.const_data_ptr<E>(), *kp = k.const_data_ptr<E>(), *vp = v.const_data_ptr<E>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  at::parallel_for(0, split.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dp);
    const E* kr[kBlock];
    const E* vr[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / split.nc, b = bg / Hkv, g = bg % Hkv, c1 = split.last(task);
      for (int64_t h = 0; h < group; ++h) load_row(qp + (bg * group + h) * D, qf.data() + h * dp, D, dp, fscale);
      Online st(group, dp);
      const int64_t* slots = ip + bg * K;
      const E* kb = kp + b * ks0 + g * ks1;
      const E* vb = vp + b * vs0 + g * vs1;
      int64_t j = split.first(task);
      while (j < c1) {  // the next kBlock non-negative slots, then fold them in
        int64_t nk = 0;
        for (; j < c1 && nk < kBlock; ++j) {
          if (slots[j] < 0) continue;
          kr[nk] = kb + slots[j] * ks2, vr[nk] = vb + slots[j] * vs2;
          ++nk;
        }
        if (nk > 0) fold_rows<E>(st, qf.data(), group, kr, vr, nk, D, dp, fcap);
      }
      split.save(task, st);
    }
  });
  split.merge(out.data_ptr<E>(), D);
  return out;
}

at::Tensor index_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                               double scale, double softcap) {
  check_index_attention_args(q, k, v, idx);
  check_attention_softcap(softcap, "index_attention");
  TORCH_CHECK(q.device().is_cpu(), "index_attention_cpu: tensors must be on the CPU");
  // Rows are read in place: k and v need only unit stride along the head dimension.
  const at::Tensor qc = q.contiguous(), ic = idx.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous(), vc = v.stride(3) == 1 ? v : v.contiguous();
  switch (q.scalar_type()) {
    case at::kFloat: return index_attention_impl<float>(qc, kc, vc, ic, scale, softcap);
    case at::kBFloat16: return index_attention_impl<at::BFloat16>(qc, kc, vc, ic, scale, softcap);
    default: return index_attention_impl<at::Half>(qc, kc, vc, ic, scale, softcap);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CPU, m) { m.impl("index_attention", &index_attention_cpu); }

}  // namespace splice
