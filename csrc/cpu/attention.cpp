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
// chunk, and merges the chunks' partial softmaxes (the softmax step and that split: attention_online.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_checks.h"
#include "attention_online.h"

namespace splice {
namespace {

using namespace attn;

constexpr int64_t kQueries = 32;    // queries per band_attention task
constexpr int64_t kMinChunk = 512;  // fewest cache slots per decode task

// Column j of the transposed key tile kt [dp, kBlock] = src [d].
template <typename T>
inline void load_column(const T* src, float* kt, int64_t j, int64_t d) {
  for (int64_t i = 0; i < d; ++i) kt[i * kBlock + j] = static_cast<float>(src[i]);
}

#ifdef __AVX512F__
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
  DecodeSplit split(B * Hkv, group, dp, L, kMinChunk);
  const E *qp = q.const_data_ptr<E>(), *kp = k.const_data_ptr<E>(), *vp = v.const_data_ptr<E>();
  const bool* vd = valid.const_data_ptr<bool>();
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  at::parallel_for(0, split.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dp), kt(dp * kBlock, 0.f), vf(kBlock * dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / split.nc, b = bg / Hkv, c1 = split.last(task);
      for (int64_t h = 0; h < group; ++h) load_row(qp + (bg * group + h) * D, qf.data() + h * dp, D, dp, fscale);
      Online st(group, dp);
      const bool* vrow = vd + b * L;
      int64_t j = split.first(task);
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
      split.save(task, st);
    }
  });
  split.merge(out.data_ptr<E>(), D);
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
