// Online-softmax pieces shared by the CPU attention kernels (attention.cpp: band_attention and
// decode_attention; index_attention.cpp): fp32 rows padded to whole 16-lane vectors, the running
// softmax state of a few queries over tiles of kBlock keys, one softmax step of a score tile, and the
// flash-decoding split of one query per row over chunks of its keys, with the merge of the chunks'
// partial softmaxes.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers self-initialise _mm512_undefined_*(), which -Wall reports once inlined here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace splice {
namespace attn {

constexpr int64_t kBlock = 64;  // keys per block: the columns of a score tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }

// dst[0, dp) = scale · src[0, d), zero-padded.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t d, int64_t dp, float scale = 1.f) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  for (int64_t i = d; i < dp; ++i) dst[i] = 0.f;
}

// Running softmax state of `rows` queries: max m, sum l, unnormalised output o [rows, dp].
struct Online {
  std::vector<float> m, l, o, s;  // s: the score / probability tile [rows, kBlock]
  Online(int64_t rows, int64_t dp)
      : m(rows, kNegInf), l(rows, 0.f), o(rows * dp, 0.f), s(rows * kBlock) {}
};

#ifdef __AVX512F__
// exp(x) for x <= 0 (Cephes' polynomial after x = n ln2 + r); values below -87 give ~1e-38.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// One row of the online softmax: s [kBlock] (−inf where masked) becomes probabilities relative to the
// new running max; l and o [dp] are rescaled to it.
inline void softmax_row(float* s, float& m, float& l, float* o, int64_t dp) {
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int c = 0; c < kBlock; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  if (m_new == kNegInf) {  // nothing readable yet: the row contributes nothing
    for (int c = 0; c < kBlock; c += 16) _mm512_storeu_ps(s + c, _mm512_setzero_ps());
    return;
  }
  const __m512 mv = _mm512_set1_ps(m_new), ninf = _mm512_set1_ps(kNegInf);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < kBlock; c += 16) {
    const __m512 x = _mm512_loadu_ps(s + c);
    const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, mv)));
    _mm512_storeu_ps(s + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  if (alpha != 1.f) {
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t c = 0; c < dp; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), av));
  }
}
#else
// Portable fallback: the same step, one element at a time.
inline void softmax_row(float* s, float& m, float& l, float* o, int64_t dp) {
  float m_new = m;
  for (int64_t j = 0; j < kBlock; ++j) m_new = std::max(m_new, s[j]);
  if (m_new == kNegInf) {
    for (int64_t j = 0; j < kBlock; ++j) s[j] = 0.f;
    return;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < kBlock; ++j) sum += (s[j] = s[j] == kNegInf ? 0.f : std::exp(s[j] - m_new));
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  for (int64_t d = 0; d < dp; ++d) o[d] *= alpha;
}
#endif

// out row [d] = o / l, or 0 where nothing was read.
template <typename T>
inline void store_row(const float* o, float l, T* out, int64_t d) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(o[i] * inv);
}

// Flash-decoding of one query per row: each of `pairs` (batch, KV head) pairs reads n keys (cache
// slots, or slot indices), split into nc chunks of `chunk` keys, enough tasks (pairs · nc) to keep
// every thread busy and none under min_chunk keys. Task t folds keys [first(t), last(t)) of pair
// t / nc for the `group` query heads of the pair and saves its partial softmax; merge() combines the
// chunks of each query head.
struct DecodeSplit {
  int64_t pairs, group, dp, n, chunk, nc;
  std::vector<float> pm, pl, po;  // per (task, query head of the group): max, sum, unnormalised output [dp]

  DecodeSplit(int64_t pairs, int64_t group, int64_t dp, int64_t n, int64_t min_chunk)
      : pairs(pairs), group(group), dp(dp), n(n) {
    const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + pairs - 1) / pairs);
    chunk = std::max(min_chunk, (n + want - 1) / want);
    nc = std::max<int64_t>(1, (n + chunk - 1) / chunk);
    pm.resize(pairs * nc * group), pl.resize(pairs * nc * group), po.resize(pairs * nc * group * dp);
  }

  int64_t tasks() const { return pairs * nc; }
  int64_t first(int64_t task) const { return (task % nc) * chunk; }
  int64_t last(int64_t task) const { return std::min(n, first(task) + chunk); }

  void save(int64_t task, const Online& st) {
    const int64_t at = task * group;
    std::copy(st.m.begin(), st.m.end(), pm.begin() + at);
    std::copy(st.l.begin(), st.l.end(), pl.begin() + at);
    std::copy(st.o.begin(), st.o.end(), po.begin() + at * dp);
  }

  // out [pairs · group, d]: the chunks of each (b, query head) merged and normalised.
  template <typename T>
  void merge(T* out, int64_t d) const {
    at::parallel_for(0, pairs * group, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> o(dp);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bg = bh / group, h = bh % group;
        float m = kNegInf, l = 0.f;
        for (int64_t c = 0; c < nc; ++c) m = std::max(m, pm[(bg * nc + c) * group + h]);
        std::fill(o.begin(), o.end(), 0.f);
        if (m != kNegInf) {
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t at = (bg * nc + c) * group + h;
            if (pm[at] == kNegInf) continue;
            const float w = std::exp(pm[at] - m);
            l += pl[at] * w;
            for (int64_t i = 0; i < d; ++i) o[i] += po[at * dp + i] * w;
          }
        }
        store_row(o.data(), l, out + bh * d, d);
      }
    });
  }
};

}  // namespace attn
}  // namespace splice
