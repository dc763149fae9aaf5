// fp32 vectors of the widest ISA the build targets and the decoding of packed codes into them, for
// the CPU kernels of splice::quant_matmul (layout: quant_layout.h).
//
// V holds kLanes fp32 lanes (VI as many int32): __m512 (16) with AVX-512F, __m256 (8) with AVX2 +
// FMA. Tile<B>::decode writes tile t of a row (kChunks chunks of kQuantChunk codes, read from 16
// packed bytes) as kChunks · kVecsPerChunk vectors of fp32 codes, in code order. Without either ISA,
// V is a float and SPLICE_SIMD is 0 (no Tile: codes are read one at a time with quant_code).
#pragma once

#include <cstdint>

#include "quant_layout.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define SPLICE_SIMD 1
#else
#define SPLICE_SIMD 0
#endif

namespace splice {

#if defined(__AVX512F__)
using V = __m512;
using VI = __m512i;
constexpr int kLanes = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float v) { return _mm512_set1_ps(v); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }

// 16 packed bytes as 16 int32 lanes.
inline void widen16(const uint8_t* p, VI* out) {
  out[0] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline V to_float(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m512i bits_of(__m512i v, int shift, int mask) {
  return _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(mask));
}
// + 4 on the lanes whose bit is set in `high` (lane j of widened part 0: bit j).
inline __m512i add_high(__m512i low, uint16_t high, int) {
  return _mm512_mask_add_epi32(low, static_cast<__mmask16>(high), low, _mm512_set1_epi32(4));
}
#elif SPLICE_SIMD
using V = __m256;
using VI = __m256i;
constexpr int kLanes = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float v) { return _mm256_set1_ps(v); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 packed bytes as two vectors of 8 int32 lanes (bytes 0-7, then 8-15).
inline void widen16(const uint8_t* p, VI* out) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  out[0] = _mm256_cvtepu8_epi32(v);
  out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
}
inline V to_float(__m256i v) { return _mm256_cvtepi32_ps(v); }
inline __m256i bits_of(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(mask));
}
// + 4 on the lanes whose bit is set in `high` (lane j of widened part h: bit 8h + j).
inline __m256i add_high(__m256i low, uint16_t high, int h) {
  const __m256i shifts = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * h));
  const __m256i set = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(high), shifts), _mm256_set1_epi32(1));
  return _mm256_add_epi32(low, _mm256_slli_epi32(set, 2));
}
#else
using V = float;
constexpr int kLanes = 1;
inline V vzero() { return 0.f; }
inline V vset1(float v) { return v; }
inline V vload(const float* p) { return *p; }
inline void vstore(float* p, V v) { *p = v; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline float vsum(V v) { return v; }
#endif

#if SPLICE_SIMD
constexpr int kVecsPerChunk = kQuantChunk / kLanes;

// B ∈ {2, 4, 8}: byte j of a tile holds codes j, 16 + j, 32 + j, ... (B bits each, low bits first).
template <int B>
struct Tile {
  static constexpr int kChunks = 8 / B;
  static inline void decode(const uint8_t* row, int64_t t, int64_t, V* w) {
    VI v[kVecsPerChunk];
    widen16(row + 16 * t, v);
    for (int c = 0; c < kChunks; ++c)
      for (int h = 0; h < kVecsPerChunk; ++h)
        w[c * kVecsPerChunk + h] = to_float(bits_of(v[h], B * c, (1 << B) - 1));
  }
};

template <>
struct Tile<3> {  // the 2-bit layout for the low bits; bit 2 of code k is bit k of the plane at kp / 4
  static constexpr int kChunks = 4;
  static inline void decode(const uint8_t* row, int64_t t, int64_t kp, V* w) {
    VI v[kVecsPerChunk];
    widen16(row + 16 * t, v);
    const uint16_t* high = reinterpret_cast<const uint16_t*>(row + kp / 4) + kChunks * t;
    for (int c = 0; c < kChunks; ++c)
      for (int h = 0; h < kVecsPerChunk; ++h)
        w[c * kVecsPerChunk + h] = to_float(add_high(bits_of(v[h], 2 * c, 3), high[c], h));
  }
};
#endif

}  // namespace splice
