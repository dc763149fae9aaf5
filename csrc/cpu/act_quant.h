// Activations quantized to int8 for splice::quant_matmul_a8 (the math: python/splice/ops/act_quant.py).
//
// Each token's row of K values is cut into blocks of kActBlock; block b gets d_b = max|x| / 127 and
// codes x8 = round_half_even(x · (127 / max|x|)) ∈ [−127, 127] (d_b = 0 and x8 = 0 for an all-zero
// block), so x ≈ d_b · x8. The kernels use x̂ = d_b · x8 in place of x.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace splice {

constexpr int64_t kActBlock = 32;

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 values of x from p (the first n < 16 of them when n < 16, the rest 0) as fp32.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#endif

// Codes and scales of one token's blocks [0, blocks) (blocks past k are all zero): code k goes to
// x8[pos(k)], d_b to d[b], d_b · Σ x8 of block b to dsum[b]. `pos` maps each aligned chunk of 16
// codes to 16 consecutive positions (the AVX-512 build stores the chunk's codes at once).
template <typename T, typename Pos>
inline void quantize_act_row(const T* x, int64_t k, int64_t blocks, Pos pos, int8_t* x8, float* d, float* dsum) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kActBlock, hi = std::min(k, lo + kActBlock);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __mmask16 m[2];
    __m512 v[2];
    __m512 amaxv = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const int64_t n = std::clamp<int64_t>(hi - lo - 16 * h, 0, 16);
      m[h] = static_cast<__mmask16>((1u << n) - 1u);
      v[h] = load16(x + lo + 16 * h, m[h]);
      amaxv = _mm512_max_ps(amaxv, _mm512_abs_ps(v[h]));
    }
    const float amax = _mm512_reduce_max_ps(amaxv);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      if (m[h] == 0) continue;
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));  // round half to even (default MXCSR)
      _mm_mask_storeu_epi8(x8 + pos(lo + 16 * h), m[h], _mm512_cvtsepi32_epi8(q));
      sum = _mm512_add_epi32(sum, q);
    }
    const int32_t total = _mm512_reduce_add_epi32(sum);
#else
    float amax = 0.f;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t total = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const auto q = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[i]) * inv));
      x8[pos(i)] = q;
      total += q;
    }
#endif
    d[b] = amax / 127.f;
    dsum[b] = d[b] * static_cast<float>(total);
  }
}

}  // namespace splice
