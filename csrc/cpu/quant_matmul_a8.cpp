// CPU kernel of splice::quant_matmul_a8: y = x̂ @ ((q − z) · s)^T (+ bias), x̂ the int8 block
// quantization of x (act_quant.h); the math is python/splice/ops/quant_matmul_a8.py.
//
// With AVX-512 VNNI (vpdpbusd: 64 u8 codes × s8 activations into 16 int32 lanes per instruction):
// each token's codes are quantized once and laid out in the order of the packed weight bytes, so a
// 64-byte load of a row's packed bytes, its codes split into u8 registers (one per nibble, crumb or
// byte), meets activation registers loaded as they lie. Every int32 lane sums 4 codes of one
// activation block and one weight group; per step the lanes are scaled by s_g · d_b and summed into
// fp32, and the zero points come off at the end: Σ_b s_g z_g d_b Σ x8_b. Blocks of kRows rows ×
// kTokens tokens are held in registers, so each packed byte is read once for all tokens.
//
// Without VNNI the op multiplies x̂ with the float kernel (quant_matmul.cpp): the same math, no
// int8 dot products; splice._C.int8_dot_products says which one was compiled.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "act_quant.h"
#include "quant_layout.h"
#include "quant_matmul_args.h"
#include "quant_matmul_cpu.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SPLICE_VNNI 1
#else
#define SPLICE_VNNI 0
#endif

namespace splice {

bool int8_dot_products() { return SPLICE_VNNI; }

namespace {

constexpr int64_t kMaxTokens = 32;  // more tokens (prefill): x̂ through the float kernel's GEMM

#if SPLICE_VNNI
// The step of a `B`-bit row: 4 tiles of kTile codes, 64 bytes of the (low) code plane, kRegs u8
// registers of codes; lane l of register c holds 4 codes of activation block kMap[c][l] of the step.
template <int B>
struct Step {
  static constexpr int kTile = B == 8 ? 16 : B == 4 ? 32 : 64;  // 3 bits: the 2-bit plane's tiles
  static constexpr int kRegs = kTile / 16, kCodes = 4 * kTile, kBlocks = kCodes / kActBlock;
  static constexpr int kMaps = kTile == 64 ? 2 : 1;  // registers c and c' share a map if c / 2 == c' / 2

  // Block of lane l in the registers of map m, within the step.
  static __m512i map(int m) {
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = static_cast<int32_t>((l / 4 * kTile + 16 * 2 * m) / kActBlock);
    return _mm512_load_si512(idx);
  }
  // Where code k of the row goes in the activation order.
  static int64_t position(int64_t k) {
    const int64_t t = k / kTile, c = k % kTile / 16;
    return t / 4 * kCodes + c * 64 + t % 4 * 16 + k % 16;
  }
};

// Row bytes [64 · step, +64) as kRegs registers of u8 codes (`tiles` < 4 in a row's last step).
template <int B>
inline void decode_step(const uint8_t* row, int64_t step, int tiles, int64_t kp, __m512i* codes) {
  const __m512i v = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, 16 * tiles), row + 64 * step);
  if constexpr (B == 8) {
    codes[0] = v;
  } else if constexpr (B == 4) {
    const __m512i m = _mm512_set1_epi8(0x0f);
    codes[0] = _mm512_and_si512(v, m);
    codes[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  } else {
    const __m512i m = _mm512_set1_epi8(3);
    for (int c = 0; c < 4; ++c) codes[c] = _mm512_and_si512(_mm512_srli_epi16(v, 2 * c), m);
    if constexpr (B == 3) {  // + 4 where the high plane's bit is set: chunk 4t + c is uint16 4t + c
      const uint16_t* high = reinterpret_cast<const uint16_t*>(row + kp / 4) + 16 * step;
      for (int c = 0; c < 4; ++c) {
        uint64_t mask = 0;
        for (int t = 0; t < tiles; ++t) mask |= static_cast<uint64_t>(high[4 * t + c]) << (16 * t);
        codes[c] = _mm512_mask_add_epi8(codes[c], mask, codes[c], _mm512_set1_epi8(4));
      }
    }
  }
}

// The weight group of every lane of map m's registers in `step` (groups of 2^shift blocks).
template <int B>
inline __m512i lane_groups(int m, int64_t step, int shift) {
  return _mm512_srli_epi32(_mm512_add_epi32(Step<B>::map(m), _mm512_set1_epi32(step * Step<B>::kBlocks)), shift);
}

// Per-block values v[b] (at least steps · kBlocks + 16 readable) as lane vectors: vector (step, m)
// holds, in lane l, the value of the block that lane l of map m's registers covers in that step.
template <int B>
inline void to_lanes(const float* v, int64_t steps, float* out) {
  using S = Step<B>;
  for (int m = 0; m < S::kMaps; ++m) {
    const __m512i map = S::map(m);
    for (int64_t step = 0; step < steps; ++step)
      _mm512_storeu_ps(out + (step * S::kMaps + m) * 16,
                       _mm512_permutexvar_ps(map, _mm512_loadu_ps(v + step * S::kBlocks)));
  }
}

// Each token's codes in the weight's order (zero-padded to whole steps), its block scales d as lane
// vectors (to_lanes), and per weight group Σ_b∈g d_b Σ x8_b (for the zero points).
struct Acts8 {
  std::vector<int8_t> x8;
  std::vector<float> dl, gsum;
  int64_t codes, lanes, groups;  // per token: codes (whole steps), lane floats, groups (+ 16 floats)
};

template <int B, typename T>
Acts8 quantize_acts(const T* x, int64_t tokens, int64_t k, int64_t steps, int64_t group_size) {
  using S = Step<B>;
  Acts8 a;
  const int64_t real = (k + kActBlock - 1) / kActBlock, per_group = group_size / kActBlock;
  a.codes = steps * S::kCodes, a.lanes = steps * S::kMaps * 16, a.groups = (k + group_size - 1) / group_size + 16;
  a.x8.assign(tokens * a.codes, 0);
  a.dl.resize(tokens * a.lanes);
  a.gsum.assign(tokens * a.groups, 0.f);
  std::vector<float> d(steps * S::kBlocks + 16, 0.f), dsum(real);
  for (int64_t t = 0; t < tokens; ++t) {
    quantize_act_row(x + t * k, k, real, S::position, a.x8.data() + t * a.codes, d.data(), dsum.data());
    to_lanes<B>(d.data(), steps, a.dl.data() + t * a.lanes);
    for (int64_t b = 0; b < real; ++b) a.gsum[t * a.groups + b / per_group] += dsum[b];
  }
  return a;
}

struct Rows {
  const uint8_t* q;
  const at::Half* s;
  const at::Half* z;
  int64_t k, kp, groups, group_size, row_bytes;
};

// Where the sums go: y [tokens, n_out] in x's dtype (bf16 rounded to nearest even, as .to() rounds),
// each plus the bias of its row in fp32 first.
struct Out {
  float* f;
  at::BFloat16* h;
  const float* bias;
  int64_t n_out;

  void store(int64_t t, int64_t n, float v) const {
    if (bias != nullptr) v += bias[n];
    if (h != nullptr) {
      h[t * n_out + n] = at::BFloat16(v);
    } else {
      f[t * n_out + n] = v;
    }
  }
};

inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::clamp<int64_t>(n, 0, 16))));
}

// Per-row floats of a register block's scratch: the row's block scales s_g as lane vectors
// (to_lanes, a.lanes floats), then s_g · z_g of every group (w.groups rounded up to 16).
inline int64_t row_scratch(const Rows& w, const Acts8& a) { return a.lanes + (w.groups + 15) / 16 * 16; }

// Row n's scratch (row_scratch) into s: lane l of vector (step, m) is s_g of the group holding the
// block that lane covers (to_lanes), read from the row's fp16 scales in one pass.
template <int B>
inline void row_scales(const Rows& w, int64_t n, int64_t steps, int64_t lanes, float* s) {
  using S = Step<B>;
  const int shift = __builtin_ctzll(w.group_size / kActBlock);  // blocks per group: 1, 2 or 4
  const at::Half* row = w.s + n * w.groups;
  for (int m = 0; m < S::kMaps; ++m)
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t g0 = (step * S::kBlocks) >> shift;  // the step's first group: lanes index from it
      const __m512i group = _mm512_sub_epi32(lane_groups<B>(m, step, shift), _mm512_set1_epi32(g0));
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(w.groups - g0), row + g0));
      _mm512_storeu_ps(s + (step * S::kMaps + m) * 16, _mm512_permutexvar_ps(group, sv));
    }
  float* sz = s + lanes;
  for (int64_t g = 0; g < w.groups; g += 16) {
    const __mmask16 m = first_lanes(w.groups - g);
    const __m512 sg = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.s + n * w.groups + g));
    const __m512 zg = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.z + n * w.groups + g));
    _mm512_storeu_ps(sz + g, _mm512_mul_ps(sg, zg));
  }
}

// y for R rows from n0 and T tokens from t0, all sums in registers; s holds the rows'
// scratch (row_scales, row_scratch(w, a) floats a row). The scales are read from L1 as they are
// used rather than held in registers beside the sums, the rows' codes and one token's activations.
template <int B, int R, int T>
void dot_block(const Rows& w, const Acts8& a, const float* s, int64_t steps, int64_t n0, int64_t t0, const Out& y) {
  using S = Step<B>;
  const int64_t tiles_total = w.kp / S::kTile, stride = row_scratch(w, a);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t step = 0; step < steps; ++step) {
    const int tiles = static_cast<int>(std::min<int64_t>(4, tiles_total - 4 * step));
    __m512i codes[R][S::kRegs];
    for (int r = 0; r < R; ++r) decode_step<B>(w.q + (n0 + r) * w.row_bytes, step, tiles, w.kp, codes[r]);
    for (int t = 0; t < T; ++t) {
      const int8_t* xt = a.x8.data() + (t0 + t) * a.codes + step * S::kCodes;
      const float* dl = a.dl.data() + (t0 + t) * a.lanes + step * S::kMaps * 16;
      __m512i xv[S::kRegs];
      for (int c = 0; c < S::kRegs; ++c) xv[c] = _mm512_loadu_si512(xt + 64 * c);
      for (int m = 0; m < S::kMaps; ++m) {
        for (int r = 0; r < R; ++r) {
          __m512i dot = _mm512_setzero_si512();
          for (int c = m * S::kRegs / S::kMaps; c < (m + 1) * S::kRegs / S::kMaps; ++c)
            dot = _mm512_dpbusd_epi32(dot, codes[r][c], xv[c]);
          const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(s + r * stride + (step * S::kMaps + m) * 16),
                                             _mm512_loadu_ps(dl + m * 16));
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {  // − Σ_g s_g z_g gsum_g
    const float* gsum = a.gsum.data() + (t0 + t) * a.groups;
    for (int r = 0; r < R; ++r) {
      const float* sz = s + r * stride + a.lanes;
      for (int64_t g = 0; g < w.groups; g += 16)
        acc[r][t] = _mm512_fnmadd_ps(_mm512_loadu_ps(sz + g), _mm512_loadu_ps(gsum + g), acc[r][t]);
      y.store(t0 + t, n0 + r, _mm512_reduce_add_ps(acc[r][t]));
    }
  }
}

// dot_block for `rows` ≤ R rows and `tokens` ≤ T tokens (the last, partial blocks).
template <int B, int R, int T>
void dot_block_upto(int64_t rows, int64_t tokens, const Rows& w, const Acts8& a, const float* s, int64_t steps,
                    int64_t n0, int64_t t0, const Out& y) {
  if constexpr (R > 1)
    if (rows < R) return dot_block_upto<B, R - 1, T>(rows, tokens, w, a, s, steps, n0, t0, y);
  if constexpr (T > 1)
    if (tokens < T) return dot_block_upto<B, R, T - 1>(rows, tokens, w, a, s, steps, n0, t0, y);
  dot_block<B, R, T>(w, a, s, steps, n0, t0, y);
}

// One token (GEMV) where a row has at most kGemvGroups groups: y for R rows from n0, each row's
// scales held in two registers and spread over a step's lanes by one permute per step, with the
// group of every lane of every step in `groups` (gemv_groups, shared by all rows).
constexpr int64_t kGemvGroups = 32;

template <int B>
std::vector<int32_t> gemv_groups(const Rows& w, int64_t steps) {
  using S = Step<B>;
  const int shift = __builtin_ctzll(w.group_size / kActBlock);
  std::vector<int32_t> groups(steps * S::kMaps * 16);
  for (int m = 0; m < S::kMaps; ++m)
    for (int64_t step = 0; step < steps; ++step) {
      const __m512i g = lane_groups<B>(m, step, shift);
      // steps past the row's groups (padding) read group 0: their codes and activations are 0
      const __m512i in = _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(g, _mm512_set1_epi32(w.groups)), g);
      _mm512_storeu_si512(groups.data() + (step * S::kMaps + m) * 16, in);
    }
  return groups;
}

template <int B, int R>
void gemv_block(const Rows& w, const Acts8& a, const int32_t* groups, int64_t steps, int64_t n0, const Out& y) {
  using S = Step<B>;
  const int64_t tiles_total = w.kp / S::kTile;
  __m512 acc[R], lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    const at::Half* sr = w.s + (n0 + r) * w.groups;
    lo[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(w.groups), sr));
    hi[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(w.groups - 16), sr + 16));
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t step = 0; step < steps; ++step) {
    const int tiles = static_cast<int>(std::min<int64_t>(4, tiles_total - 4 * step));
    const int8_t* xt = a.x8.data() + step * S::kCodes;
    __m512i xv[S::kRegs];
    for (int c = 0; c < S::kRegs; ++c) xv[c] = _mm512_loadu_si512(xt + 64 * c);
    for (int r = 0; r < R; ++r) {
      __m512i codes[S::kRegs];
      decode_step<B>(w.q + (n0 + r) * w.row_bytes, step, tiles, w.kp, codes);
      for (int m = 0; m < S::kMaps; ++m) {
        const int64_t lane = (step * S::kMaps + m) * 16;
        __m512i dot = _mm512_setzero_si512();
        for (int c = m * S::kRegs / S::kMaps; c < (m + 1) * S::kRegs / S::kMaps; ++c)
          dot = _mm512_dpbusd_epi32(dot, codes[c], xv[c]);
        const __m512 sl = _mm512_permutex2var_ps(lo[r], _mm512_loadu_si512(groups + lane), hi[r]);
        const __m512 scale = _mm512_mul_ps(sl, _mm512_loadu_ps(a.dl.data() + lane));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // − Σ_g s_g z_g gsum_g
    const at::Half* zr = w.z + (n0 + r) * w.groups;
    const __m512 zlo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(w.groups), zr));
    const __m512 zhi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(w.groups - 16), zr + 16));
    const __m512 glo = _mm512_maskz_loadu_ps(first_lanes(w.groups), a.gsum.data());
    const __m512 ghi = _mm512_maskz_loadu_ps(first_lanes(w.groups - 16), a.gsum.data() + 16);
    acc[r] = _mm512_fnmadd_ps(_mm512_mul_ps(lo[r], zlo), glo, acc[r]);
    acc[r] = _mm512_fnmadd_ps(_mm512_mul_ps(hi[r], zhi), ghi, acc[r]);
    y.store(0, n0 + r, _mm512_reduce_add_ps(acc[r]));
  }
}

template <int B, int R>
void gemv_block_upto(int64_t rows, const Rows& w, const Acts8& a, const int32_t* groups, int64_t steps, int64_t n0,
                     const Out& y) {
  if constexpr (R > 1)
    if (rows < R) return gemv_block_upto<B, R - 1>(rows, w, a, groups, steps, n0, y);
  gemv_block<B, R>(w, a, groups, steps, n0, y);
}

// Register block of `B`-bit rows: kRows rows × kTokens tokens of fp32 sums plus the rows' code
// registers (kRegs each); 2 rows where a step takes 4 code registers a row (2 and 3 bits).
template <int B>
struct Block {
  static constexpr int kRows = Step<B>::kRegs == 4 ? 2 : 4, kTokens = 4;
};

template <int B>
void vnni(const Rows& w, const Acts8& a, int64_t tokens, int64_t steps, const Out& y) {
  constexpr int kRows = Block<B>::kRows, kTokens = Block<B>::kTokens;
  const int64_t n_out = y.n_out, grain = std::max<int64_t>(16, n_out / (4 * at::get_num_threads()));
  if (tokens == 1 && w.groups <= kGemvGroups) {
    const std::vector<int32_t> groups = gemv_groups<B>(w, steps);
    at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n0 = begin; n0 < end; n0 += kRows)
        gemv_block_upto<B, kRows>(std::min<int64_t>(kRows, end - n0), w, a, groups.data(), steps, n0, y);
    });
    return;
  }
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    const int64_t stride = row_scratch(w, a);
    std::vector<float> s(kRows * stride);
    for (int64_t n0 = begin; n0 < end; n0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, end - n0);
      for (int64_t r = 0; r < rows; ++r) row_scales<B>(w, n0 + r, steps, a.lanes, s.data() + r * stride);
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
        const int64_t tk = std::min<int64_t>(kTokens, tokens - t0);
        dot_block_upto<B, kRows, kTokens>(rows, tk, w, a, s.data(), steps, n0, t0, y);
      }
    }
  });
}

template <int B>
at::Tensor run_vnni(const Rows& w, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t n_out) {
  const int64_t tokens = x.size(0), steps = (w.kp + Step<B>::kCodes - 1) / Step<B>::kCodes;
  const bool f32 = x.scalar_type() == at::kFloat;
  at::Tensor y = at::empty({tokens, n_out}, x.options());
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Out out{f32 ? y.data_ptr<float>() : nullptr, f32 ? nullptr : y.data_ptr<at::BFloat16>(),
                b.defined() ? b.data_ptr<float>() : nullptr, n_out};
  const Acts8 a = f32 ? quantize_acts<B>(x.data_ptr<float>(), tokens, w.k, steps, w.group_size)
                      : quantize_acts<B>(x.data_ptr<at::BFloat16>(), tokens, w.k, steps, w.group_size);
  vnni<B>(w, a, tokens, steps, out);
  return y;
}
#endif

// x̂ = d_b · x8 as fp32 [tokens, k].
template <typename T>
at::Tensor dequantized_acts(const T* x, int64_t tokens, int64_t k, const at::TensorOptions& options) {
  const int64_t blocks = (k + kActBlock - 1) / kActBlock;
  at::Tensor out = at::empty({tokens, k}, options.dtype(at::kFloat));
  std::vector<int8_t> x8(k);
  std::vector<float> d(blocks), dsum(blocks);
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    quantize_act_row(x + t * k, k, blocks, [](int64_t i) { return i; }, x8.data(), d.data(), dsum.data());
    for (int64_t i = 0; i < k; ++i) o[t * k + i] = d[i / kActBlock] * static_cast<float>(x8[i]);
  }
  return out;
}

at::Tensor quant_matmul_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                               int64_t group_size, int64_t out_features, int64_t in_features) {
  check_quant_matmul_args(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features);
  TORCH_CHECK(x.device().is_cpu(), "quant_matmul_a8_cpu: tensors must be on the CPU");
  const at::Tensor xc = x.contiguous();
#if SPLICE_VNNI
  if (xc.size(0) > 0 && xc.size(0) <= kMaxTokens) {
    const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
    const Rows w{qc.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), zc.data_ptr<at::Half>(), in_features,
                 quant_padded_k(in_features), sc.size(1), group_size, qc.size(1)};
    switch (bits) {
      case 2: return run_vnni<2>(w, xc, bias, out_features);
      case 3: return run_vnni<3>(w, xc, bias, out_features);
      case 4: return run_vnni<4>(w, xc, bias, out_features);
      default: return run_vnni<8>(w, xc, bias, out_features);
    }
  }
#endif
  const at::Tensor xq = xc.scalar_type() == at::kFloat
                            ? dequantized_acts(xc.data_ptr<float>(), xc.size(0), in_features, xc.options())
                            : dequantized_acts(xc.data_ptr<at::BFloat16>(), xc.size(0), in_features, xc.options());
  return quant_matmul_cpu(xq, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
      .to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CPU, m) { m.impl("quant_matmul_a8", &quant_matmul_a8_cpu); }

}  // namespace splice
