// CPU kernel of splice::quant_matmul: y = x @ ((q − z) · s)^T (+ bias) on packed group-quantized weights.
// The math is stated in python/splice/ops/quant_matmul_reference.py, the layout in quant_layout.h, the
// vectors and code decoding in quant_simd.h.
//
// * decode and small batches (tokens ≤ kBlockedMaxTokens): blocks of kRows rows are dequantized
//   once into an fp32 buffer that stays in L1, and every token is multiplied with it, kRows × kTokens
//   dot products at a time held in registers, so each packed weight is read from memory once for
//   all tokens; rows are split over threads;
// * with AVX-512 and tokens ≤ kFusedMaxTokens, the measured faster fused GEMV: per row n and group g,
//   sum_k x_k (q_k − z_g) s_g = s_g (x·q)_g − s_g z_g Σ_g x, codes widened and FMA'd with x directly;
// * prefill: blocks of rows are dequantized to fp32 once and multiplied with at::mm.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "quant_layout.h"
#include "quant_matmul_args.h"
#include "quant_matmul_cpu.h"
#include "quant_simd.h"

namespace splice {
namespace {

constexpr int64_t kBlockedMaxTokens = 32;
#if defined(__AVX512F__)
constexpr int64_t kFusedMaxTokens = 4;
#else
constexpr int64_t kFusedMaxTokens = 0;  // the fused GEMV is AVX-512 only
#endif
constexpr int64_t kGemmRowBlock = 1024;
// Register block of the multi-token kernel: kRows × kTokens accumulators plus kRows weight vectors
// fit the ISA's registers (16 ymm, 32 zmm); one token alone takes kRows1 rows to hide FMA latency.
constexpr int kRows = 3, kTokens = kLanes == 16 ? 8 : 4, kRows1 = 8;

struct Packed {
  const uint8_t* q;
  const at::Half* s;
  const at::Half* z;
  int64_t k, kp, groups, group_size, row_bytes;
};

// Activations as fp32 rows zero-padded to kp, and (for the fused GEMV only) their per-group sums
// [tokens, groups].
struct Acts {
  std::vector<float> x, sums;
};

template <typename T>
Acts load_acts(const T* x, int64_t tokens, const Packed& w, bool with_sums) {
  Acts a{std::vector<float>(tokens * w.kp, 0.f), std::vector<float>(with_sums ? tokens * w.groups : 0, 0.f)};
  for (int64_t t = 0; t < tokens; ++t) {
    float* xr = a.x.data() + t * w.kp;
    for (int64_t i = 0; i < w.k; ++i) xr[i] = static_cast<float>(x[t * w.k + i]);
    for (int64_t g = 0; with_sums && g < w.groups; ++g) {
      float s = 0.f;
      for (int64_t i = g * w.group_size; i < std::min(w.k, (g + 1) * w.group_size); ++i) s += xr[i];
      a.sums[t * w.groups + g] = s;
    }
  }
  return a;
}

// fp32 (q − z) · s of rows [begin, end) into dst (row stride kp; padding codes give −z · s, and meet
// zero activations).
template <int B>
void dequant_rows(const Packed& w, float* dst, int64_t begin, int64_t end) {
#if SPLICE_SIMD
  using Tl = Tile<B>;
  const int64_t tiles = w.kp / (Tl::kChunks * kQuantChunk);
  const int cpg_shift = __builtin_ctzll(w.group_size / kQuantChunk);  // group sizes are 16 · 2^j
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    float* out = dst + (n - begin) * w.kp;
    int64_t g = -1;
    V scale = vzero(), shift = vzero();  // s and −z · s of group g
    for (int64_t tile = 0; tile < tiles; ++tile) {
      V codes[Tl::kChunks * kVecsPerChunk];
      Tl::decode(row, tile, w.kp, codes);
      for (int j = 0; j < Tl::kChunks; ++j) {
        const int64_t chunk = tile * Tl::kChunks + j, cg = std::min(chunk >> cpg_shift, w.groups - 1);
        if (cg != g) {
          g = cg;
          const float s = static_cast<float>(w.s[n * w.groups + g]);
          scale = vset1(s), shift = vset1(-static_cast<float>(w.z[n * w.groups + g]) * s);
        }
        for (int h = 0; h < kVecsPerChunk; ++h)
          vstore(out + chunk * kQuantChunk + h * kLanes, vfma(codes[j * kVecsPerChunk + h], scale, shift));
      }
    }
  }
#else
  for (int64_t n = begin; n < end; ++n)
    for (int64_t i = 0; i < w.kp; ++i) {
      const int64_t g = std::min(i / w.group_size, w.groups - 1);
      dst[(n - begin) * w.kp + i] = (static_cast<float>(quant_code(w.q + n * w.row_bytes, i, B, w.kp)) -
                                     static_cast<float>(w.z[n * w.groups + g])) *
                                    static_cast<float>(w.s[n * w.groups + g]);
    }
#endif
}

// y[t · n_out + r] = Σ_k w[r · kp + k] x[t · kp + k] for R rows and T tokens, every sum in a register.
template <int R, int T>
void dot_block(const float* w, const float* x, int64_t kp, float* y, int64_t n_out) {
  V acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = vzero();
  for (int64_t k = 0; k < kp; k += kLanes) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * kp + k);
    for (int t = 0; t < T; ++t) {
      const V xv = vload(x + t * kp + k);
      for (int r = 0; r < R; ++r) acc[r][t] = vfma(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * n_out + r] = vsum(acc[r][t]);
}

// dot_block for `rows` ≤ R rows and `tokens` ≤ T tokens (the last, partial blocks).
template <int R, int T>
void dot_block_upto(int64_t rows, int64_t tokens, const float* w, const float* x, int64_t kp, float* y,
                    int64_t n_out) {
  if constexpr (R > 1)
    if (rows < R) return dot_block_upto<R - 1, T>(rows, tokens, w, x, kp, y, n_out);
  if constexpr (T > 1)
    if (tokens < T) return dot_block_upto<R, T - 1>(rows, tokens, w, x, kp, y, n_out);
  dot_block<R, T>(w, x, kp, y, n_out);
}

// Rows [begin, end): R rows dequantized at a time, then multiplied with every token, T at a time.
template <int B, int R, int T>
void blocked_rows(const Packed& w, const Acts& a, int64_t tokens, float* y, int64_t n_out, int64_t begin,
                  int64_t end) {
  std::vector<float> buf(R * w.kp);
  for (int64_t n0 = begin; n0 < end; n0 += R) {
    const int64_t rows = std::min<int64_t>(R, end - n0);
    dequant_rows<B>(w, buf.data(), n0, n0 + rows);
    for (int64_t t0 = 0; t0 < tokens; t0 += T)
      dot_block_upto<R, T>(rows, std::min<int64_t>(T, tokens - t0), buf.data(), a.x.data() + t0 * w.kp, w.kp,
                           y + t0 * n_out + n0, n_out);
  }
}

template <int B>
void blocked(const Packed& w, const Acts& a, int64_t tokens, float* y, int64_t n_out) {
  const int64_t grain = std::max<int64_t>(16, n_out / (4 * at::get_num_threads()));
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    if (tokens == 1)
      blocked_rows<B, kRows1, 1>(w, a, tokens, y, n_out, begin, end);
    else
      blocked_rows<B, kRows, kTokens>(w, a, tokens, y, n_out, begin, end);
  });
}

#ifdef __AVX512F__
// The fp32 scales of row n into sf, and corr[t] = Σ_g s_g z_g Σ_g x_t (16 groups per step).
template <int NT>
inline void row_params(const Packed& w, const Acts& a, int64_t n, float* sf, float* corr) {
  __m512 c[NT];
  for (int t = 0; t < NT; ++t) c[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; g += 16) {
    const auto left = static_cast<unsigned>(std::min<int64_t>(16, w.groups - g));
    const __mmask16 m = static_cast<__mmask16>(_bzhi_u32(0xffffu, left));
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.s + n * w.groups + g));
    const __m512 sz = _mm512_mul_ps(s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.z + n * w.groups + g)));
    _mm512_mask_storeu_ps(sf + g, m, s);
    for (int t = 0; t < NT; ++t)
      c[t] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(m, a.sums.data() + t * w.groups + g), c[t]);
  }
  for (int t = 0; t < NT; ++t) corr[t] = _mm512_reduce_add_ps(c[t]);
}

// acc += s_g · d (one register per token).
template <int NT>
inline void flush_group(float s, const __m512* d, __m512* acc) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(d[t], sv, acc[t]);
}

// y[t, n] = Σ_g s_g (x_t·q)_g − s_g z_g Σ_g x_t for rows [begin, end) and NT tokens, CPG chunks per group.
// The main loop takes steps of whole groups and whole tiles (all indices compile-time); a short
// runtime loop handles the last, partial step of the row.
template <int B, int CPG, int NT>
void gemv_rows(const Packed& w, const Acts& a, float* y, int64_t n_out, int64_t begin, int64_t end) {
  using Tl = Tile<B>;
  constexpr int kSpan = CPG > Tl::kChunks ? CPG : Tl::kChunks;
  constexpr int kGroups = kSpan / CPG, kTiles = kSpan / Tl::kChunks;
  const int64_t chunks = (w.k + kQuantChunk - 1) / kQuantChunk, steps = chunks / kSpan;
  const float* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = a.x.data() + t * w.kp;
  std::vector<float> sbuf(w.groups + 16);
  float* sf = sbuf.data();
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    float corr[NT];
    row_params<NT>(w, a, n, sf, corr);
    __m512 acc[NT], d[NT], d1[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t step = 0; step < steps; ++step) {
      __m512 wv[kSpan];
      for (int i = 0; i < kTiles; ++i) Tl::decode(row, step * kTiles + i, w.kp, wv + i * Tl::kChunks);
      for (int gg = 0; gg < kGroups; ++gg) {
        for (int t = 0; t < NT; ++t) d[t] = d1[t] = _mm512_setzero_ps();
        for (int cc = 0; cc < CPG; ++cc) {
          const float* xc = xs[0] + (step * kSpan + gg * CPG + cc) * kQuantChunk;
          for (int t = 0; t < NT; ++t) {  // two accumulators per token break the FMA latency chain
            __m512& dst = (cc & 1) ? d1[t] : d[t];
            dst = _mm512_fmadd_ps(wv[gg * CPG + cc], _mm512_loadu_ps(xc + t * w.kp), dst);
          }
        }
        for (int t = 0; t < NT; ++t) d[t] = _mm512_add_ps(d[t], d1[t]);
        flush_group<NT>(sf[step * kGroups + gg], d, acc);
      }
    }
    int64_t c = steps * kSpan, g = steps * kGroups;
    for (int t = 0; t < NT; ++t) d[t] = _mm512_setzero_ps();
    for (int64_t tile = c / Tl::kChunks; c < chunks; ++tile) {
      __m512 wv[Tl::kChunks];
      Tl::decode(row, tile, w.kp, wv);
      for (int j = 0; j < Tl::kChunks && c < chunks; ++j) {
        for (int t = 0; t < NT; ++t)
          d[t] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(xs[t] + c * kQuantChunk), d[t]);
        if (++c % CPG == 0 || c == chunks) {
          flush_group<NT>(sf[g++], d, acc);
          for (int t = 0; t < NT; ++t) d[t] = _mm512_setzero_ps();
        }
      }
    }
    for (int t = 0; t < NT; ++t) y[t * n_out + n] = _mm512_reduce_add_ps(acc[t]) - corr[t];
  }
}

template <int B, int CPG>
void gemv_tokens(const Packed& w, const Acts& a, int64_t tokens, float* y, int64_t n_out, int64_t begin,
                 int64_t end) {
  switch (tokens) {
    case 1: gemv_rows<B, CPG, 1>(w, a, y, n_out, begin, end); break;
    case 2: gemv_rows<B, CPG, 2>(w, a, y, n_out, begin, end); break;
    case 3: gemv_rows<B, CPG, 3>(w, a, y, n_out, begin, end); break;
    default: gemv_rows<B, CPG, 4>(w, a, y, n_out, begin, end); break;
  }
}

// Fused GEMV (tokens ≤ kFusedMaxTokens): rows split over threads.
template <int B>
void gemv(const Packed& w, const Acts& a, int64_t tokens, float* y, int64_t n_out) {
  const int64_t grain = std::max<int64_t>(16, n_out / (4 * at::get_num_threads()));
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    switch (w.group_size) {
      case 32: gemv_tokens<B, 2>(w, a, tokens, y, n_out, begin, end); break;
      case 64: gemv_tokens<B, 4>(w, a, tokens, y, n_out, begin, end); break;
      default: gemv_tokens<B, 8>(w, a, tokens, y, n_out, begin, end); break;
    }
  });
}
#endif

// y^T [n_out, tokens] = W @ x^T, one block of rows dequantized to fp32 (by all threads), then at::mm.
template <int B>
void gemm(const Packed& w, const at::Tensor& x32, at::Tensor& yt, int64_t n_out) {
  const int64_t block = std::min(kGemmRowBlock, n_out);
  at::Tensor buf = at::empty({block, w.kp}, x32.options());
  const at::Tensor xt = x32.t();
  for (int64_t n0 = 0; n0 < n_out; n0 += block) {
    const int64_t rows = std::min(block, n_out - n0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      dequant_rows<B>(w, buf.data_ptr<float>() + begin * w.kp, n0 + begin, n0 + end);
    });
    at::Tensor out = yt.narrow(0, n0, rows);
    at::mm_out(out, buf.narrow(0, 0, rows).narrow(1, 0, w.k), xt);
  }
}

template <int B>
at::Tensor run(const Packed& w, const at::Tensor& x, int64_t n_out) {
  const int64_t tokens = x.size(0);
  at::Tensor y = at::empty({tokens, n_out}, x.options().dtype(at::kFloat));
  if (tokens == 0) return y;
  if (tokens > kBlockedMaxTokens) {
    at::Tensor yt = at::empty({n_out, tokens}, y.options());
    gemm<B>(w, x.to(at::kFloat), yt, n_out);
    return yt.t().contiguous();
  }
  const bool fused = tokens <= kFusedMaxTokens;
  const Acts a = x.scalar_type() == at::kFloat ? load_acts(x.data_ptr<float>(), tokens, w, fused)
                                               : load_acts(x.data_ptr<at::BFloat16>(), tokens, w, fused);
#ifdef __AVX512F__
  if (fused) {
    gemv<B>(w, a, tokens, y.data_ptr<float>(), n_out);
    return y;
  }
#endif
  blocked<B>(w, a, tokens, y.data_ptr<float>(), n_out);
  return y;
}

}  // namespace

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                            int64_t group_size, int64_t out_features, int64_t in_features) {
  check_quant_matmul_args(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features);
  TORCH_CHECK(x.device().is_cpu(), "quant_matmul_cpu: tensors must be on the CPU");
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const int64_t kp = quant_padded_k(in_features);
  const Packed w{qc.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), zc.data_ptr<at::Half>(), in_features, kp,
                 sc.size(1), group_size, qc.size(1)};
  at::Tensor y;
  switch (bits) {
    case 2: y = run<2>(w, xc, out_features); break;
    case 3: y = run<3>(w, xc, out_features); break;
    case 4: y = run<4>(w, xc, out_features); break;
    default: y = run<8>(w, xc, out_features); break;
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(splice, CPU, m) { m.impl("quant_matmul", &quant_matmul_cpu); }

}  // namespace splice
