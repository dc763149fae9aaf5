// CPU kernels of splice::band_attention (prefill, per-KV-head sinks + window) and
// splice::decode_attention (one query per row over a cache slice). The contract is
// python/splice/ops/attention_reference.py.
//
// Both are online-softmax (flash-style) loops in fp32 over blocks of kBlock keys: scores of a block of
// queries against a block of keys, a running max / sum per query, and the output rescaled as the max
// grows. K and V are first converted to fp32 (K transposed per block, so that scores are broadcast-FMAs
// over 16 keys at once, AVX-512 when compiled with it). band_attention runs one task per
// (batch, query head, block of queries) and skips the key blocks that no query of the block may read
// (outside the head's sinks and window, after the diagonal, or all padding): streaming heads touch
// only O(sinks + window) keys per query. decode_attention splits each (batch, KV head) cache over
// chunks (flash-decoding), runs the query heads of the group together over the valid slots of a
// chunk, and merges the chunks' partial softmaxes.
#include <ATen/Parallel.h>
#include <torch/library.h>
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

#include "attention_checks.h"

namespace splice {
namespace {

constexpr int64_t kBlock = 64;      // keys per block: the columns of a score tile
constexpr int64_t kQueries = 32;    // queries per band_attention task
constexpr int64_t kMinChunk = 512;  // fewest cache slots per decode task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }

// dst[0, dp) = scale · src[0, d), zero-padded.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t d, int64_t dp, float scale = 1.f) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  for (int64_t i = d; i < dp; ++i) dst[i] = 0.f;
}

// Column j of the transposed key tile kt [dp, kBlock] = src [d].
template <typename T>
inline void load_column(const T* src, float* kt, int64_t j, int64_t d) {
  for (int64_t i = 0; i < d; ++i) kt[i * kBlock + j] = static_cast<float>(src[i]);
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

// s [rows, kBlock] = q [rows, dp] · kt [dp, kBlock], four queries at a time (the last group repeats
// its last row rather than branching).
inline void scores(const float* q, int64_t rows, const float* kt, int64_t dp, float* s) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* qr[4];
    for (int r = 0; r < 4; ++r) qr[r] = q + std::min(r0 + r, rows - 1) * dp;
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dp; ++d) {
      __m512 kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_ps(kt + d * kBlock + 16 * c);
      for (int r = 0; r < 4; ++r) {
        const __m512 qb = _mm512_set1_ps(qr[r][d]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)  // a repeated row stores the same values twice
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + std::min(r0 + r, rows - 1) * kBlock + 16 * c, acc[r][c]);
  }
}

// o [rows, dp] += p [rows, kBlock] · v [nk, dp], for NV vectors of 16 columns starting at dc, four
// queries at a time (a short last group repeats its last row, which then stores the same values twice).
template <int NV>
inline void accumulate_cols(const float* p, int64_t rows, int64_t nk, const float* v, int64_t dp, float* o,
                            int64_t dc) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* pr[4];
    float* orow[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t row = std::min(r0 + r, rows - 1);
      pr[r] = p + row * kBlock, orow[r] = o + row * dp + dc;
    }
    __m512 acc[4][NV];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(orow[r] + 16 * c);
    for (int64_t j = 0; j < nk; ++j) {
      __m512 vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * dp + dc + 16 * c);
      for (int r = 0; r < 4; ++r) {
        const __m512 pb = _mm512_set1_ps(pr[r][j]);
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(orow[r] + 16 * c, acc[r][c]);
  }
}

inline void accumulate(const float* p, int64_t rows, int64_t nk, const float* v, int64_t dp, float* o) {
  for (int64_t dc = 0; dc < dp; dc += 64) {
    switch (std::min<int64_t>(4, (dp - dc) / 16)) {
      case 1: accumulate_cols<1>(p, rows, nk, v, dp, o, dc); break;
      case 2: accumulate_cols<2>(p, rows, nk, v, dp, o, dc); break;
      case 3: accumulate_cols<3>(p, rows, nk, v, dp, o, dc); break;
      default: accumulate_cols<4>(p, rows, nk, v, dp, o, dc); break;
    }
  }
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
// Portable fallbacks: the same tiles, one element at a time.
inline void scores(const float* q, int64_t rows, const float* kt, int64_t dp, float* s) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) sr[j] = 0.f;
    for (int64_t d = 0; d < dp; ++d)
      for (int64_t j = 0; j < kBlock; ++j) sr[j] += q[r * dp + d] * kt[d * kBlock + j];
  }
}

inline void accumulate(const float* p, int64_t rows, int64_t nk, const float* v, int64_t dp, float* o) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] += p[r * kBlock + j] * v[j * dp + d];
}

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

// Folds one tile of keys (kt [dp, kBlock], v [nk, dp]; scores of keys past nk must be −inf) into st;
// softcap > 0 soft-caps each score first, s = softcap · tanh(s / softcap).
inline void fold_block(Online& st, const float* q, int64_t rows, const float* kt, const float* v, int64_t nk,
                       int64_t dp, const std::vector<uint8_t>* allowed, float softcap) {
  scores(q, rows, kt, dp, st.s.data());
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = st.s.data() + r * kBlock;
    if (softcap > 0.f)
      for (int64_t j = 0; j < kBlock; ++j) sr[j] = softcap * std::tanh(sr[j] / softcap);
    if (allowed != nullptr) {
      for (int64_t j = 0; j < kBlock; ++j)
        if (!(*allowed)[r * kBlock + j]) sr[j] = kNegInf;
    } else {
      for (int64_t j = nk; j < kBlock; ++j) sr[j] = kNegInf;
    }
    softmax_row(sr, st.m[r], st.l[r], st.o.data() + r * dp, dp);
  }
  accumulate(st.s.data(), rows, nk, v, dp, st.o.data());
}

// out row [d] = o / l, or 0 where nothing was read.
template <typename T>
inline void store_row(const float* o, float l, T* out, int64_t d) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(o[i] * inv);
}

// Positions of the valid keys of one key block (or of all the queries of a query block).
struct BlockStats {
  int64_t min_pos = std::numeric_limits<int64_t>::max(), max_pos = std::numeric_limits<int64_t>::min();
  int64_t count = 0;  // valid keys
};

template <typename E>
at::Tensor band_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const at::Tensor& valid, const at::Tensor& sinks, const at::Tensor& window,
                               double scale, double softcap) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, dp = padded_dim(D), nkb = (T + kBlock - 1) / kBlock;
  const int64_t nqb = (T + kQueries - 1) / kQueries;
  at::Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  const E *qp = q.const_data_ptr<E>(), *kp = k.const_data_ptr<E>(), *vp = v.const_data_ptr<E>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const bool* vd = valid.const_data_ptr<bool>();
  const int64_t *sp = sinks.const_data_ptr<int64_t>(), *wp = window.const_data_ptr<int64_t>();
  E* op = out.data_ptr<E>();

  // fp32 K, transposed per block [B, Hkv, nkb, dp, kBlock], and V [B, Hkv, nkb · kBlock, dp], zero-padded.
  const int64_t tile = dp * kBlock;
  std::vector<float> kt(B * Hkv * nkb * tile, 0.f), vf(B * Hkv * nkb * tile, 0.f);
  at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bg = t / nkb, j0 = (t % nkb) * kBlock, nk = std::min(kBlock, T - j0);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t src = (bg * T + j0 + j) * D;
        load_column(kp + src, kt.data() + t * tile, j, D);
        load_row(vp + src, vf.data() + t * tile + j * dp, D, dp);
      }
    }
  });
  std::vector<BlockStats> kstats(B * nkb), qstats(B * nqb);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < T; ++j) {
      const int64_t p = pp[b * T + j];
      BlockStats& qs = qstats[b * nqb + j / kQueries];
      qs.min_pos = std::min(qs.min_pos, p), qs.max_pos = std::max(qs.max_pos, p), ++qs.count;
      if (!vd[b * T + j]) continue;
      BlockStats& ks = kstats[b * nkb + j / kBlock];
      ks.min_pos = std::min(ks.min_pos, p), ks.max_pos = std::max(ks.max_pos, p), ++ks.count;
    }

  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(kQueries * dp);
    std::vector<uint8_t> allowed(kQueries * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, b = bh / Hq, g = (bh % Hq) / group;
      const int64_t i0 = (task % nqb) * kQueries, rows = std::min(kQueries, T - i0);
      const int64_t S = sp[g], W = wp[g];
      const bool full = W <= 0;
      const BlockStats& qs = qstats[b * nqb + i0 / kQueries];
      for (int64_t r = 0; r < rows; ++r) load_row(qp + (bh * T + i0 + r) * D, qf.data() + r * dp, D, dp, fscale);
      Online st(rows, dp);
      const int64_t* prow = pp + b * T;
      const bool* vrow = vd + b * T;
      for (int64_t kb = 0; kb <= (i0 + rows - 1) / kBlock; ++kb) {
        const BlockStats& ks = kstats[b * nkb + kb];
        if (ks.count == 0) continue;
        if (!full && ks.min_pos >= S && qs.min_pos - ks.max_pos >= W) continue;  // no pair is near enough
        const int64_t j0 = kb * kBlock, nk = std::min(kBlock, T - j0);
        const bool every = ks.count == kBlock && j0 + kBlock - 1 <= i0 &&
                           (full || qs.max_pos - ks.min_pos < W || ks.max_pos < S);
        if (!every) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r, pi = prow[i];
            for (int64_t j = 0; j < kBlock; ++j) {
              const int64_t jj = j0 + j;
              allowed[r * kBlock + j] = j < nk && jj <= i && vrow[jj] &&
                                        (full || pi - prow[jj] < W || prow[jj] < S);
            }
          }
        }
        const int64_t blk = ((b * Hkv + g) * nkb + kb) * tile;
        fold_block(st, qf.data(), rows, kt.data() + blk, vf.data() + blk, nk, dp, every ? nullptr : &allowed,
                   fcap);
      }
      for (int64_t r = 0; r < rows; ++r) store_row(st.o.data() + r * dp, st.l[r], op + (bh * T + i0 + r) * D, D);
    }
  });
  return out;
}

template <typename E>
at::Tensor decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& valid, double scale, double softcap) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = k.size(2);
  const int64_t group = Hq / Hkv, dp = padded_dim(D);
  at::Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  // Chunks of the cache per (b, g): enough tasks to keep every thread busy, none under kMinChunk slots.
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + B * Hkv - 1) / (B * Hkv));
  const int64_t chunk = std::max(kMinChunk, (L + want - 1) / want), nc = std::max<int64_t>(1, (L + chunk - 1) / chunk);
  const E *qp = q.const_data_ptr<E>(), *kp = k.const_data_ptr<E>(), *vp = v.const_data_ptr<E>();
  const bool* vd = valid.const_data_ptr<bool>();
  E* op = out.data_ptr<E>();
  // Partial softmax of each (b, g, chunk, query head of the group): max, sum, unnormalised output.
  std::vector<float> pm(B * Hkv * nc * group), pl(B * Hkv * nc * group), po(B * Hkv * nc * group * dp);
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  at::parallel_for(0, B * Hkv * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dp), kt(dp * kBlock, 0.f), vf(kBlock * dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / nc, b = bg / Hkv, c0 = (task % nc) * chunk, c1 = std::min(L, c0 + chunk);
      for (int64_t h = 0; h < group; ++h) load_row(qp + (bg * group + h) * D, qf.data() + h * dp, D, dp, fscale);
      Online st(group, dp);
      const bool* vrow = vd + b * L;
      int64_t j = c0;
      while (j < c1) {  // gather the next kBlock valid slots, then fold them in
        int64_t nk = 0;
        for (; j < c1 && nk < kBlock; ++j) {
          if (!vrow[j]) continue;
          const int64_t src = (bg * L + j) * D;
          load_column(kp + src, kt.data(), nk, D);
          load_row(vp + src, vf.data() + nk * dp, D, dp);
          ++nk;
        }
        if (nk > 0) fold_block(st, qf.data(), group, kt.data(), vf.data(), nk, dp, nullptr, fcap);
      }
      const int64_t at = task * group;
      std::copy(st.m.begin(), st.m.end(), pm.begin() + at);
      std::copy(st.l.begin(), st.l.end(), pl.begin() + at);
      std::copy(st.o.begin(), st.o.end(), po.begin() + at * dp);
    }
  });
  // Merge the chunks of each (b, query head).
  at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
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
          for (int64_t d = 0; d < D; ++d) o[d] += po[at * dp + d] * w;
        }
      }
      store_row(o.data(), l, op + bh * D, D);
    }
  });
  return out;
}

at::Tensor band_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                              const at::Tensor& valid, const at::Tensor& sinks, const at::Tensor& window,
                              double scale, double softcap) {
  check_band_attention_args(q, k, v, pos, valid, sinks, window);
  check_attention_softcap(softcap, "band_attention");
  TORCH_CHECK(q.device().is_cpu(), "band_attention_cpu: tensors must be on the CPU");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), pc = pos.contiguous(),
                   mc = valid.contiguous(), sc = sinks.contiguous(), wc = window.contiguous();
  switch (q.scalar_type()) {
    case at::kFloat: return band_attention_impl<float>(qc, kc, vc, pc, mc, sc, wc, scale, softcap);
    case at::kBFloat16: return band_attention_impl<at::BFloat16>(qc, kc, vc, pc, mc, sc, wc, scale, softcap);
    default: return band_attention_impl<at::Half>(qc, kc, vc, pc, mc, sc, wc, scale, softcap);
  }
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& valid, double scale, double softcap) {
  check_decode_attention_args(q, k, v, valid);
  check_attention_softcap(softcap, "decode_attention");
  TORCH_CHECK(q.device().is_cpu(), "decode_attention_cpu: tensors must be on the CPU");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = valid.contiguous();
  switch (q.scalar_type()) {
    case at::kFloat: return decode_attention_impl<float>(qc, kc, vc, mc, scale, softcap);
    case at::kBFloat16: return decode_attention_impl<at::BFloat16>(qc, kc, vc, mc, scale, softcap);
    default: return decode_attention_impl<at::Half>(qc, kc, vc, mc, scale, softcap);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CPU, m) {
  m.impl("band_attention", &band_attention_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace splice
