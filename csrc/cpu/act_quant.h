// Activations quantized to int8 for splice::quant_matmul_a8 (the math: python/splice/ops/act_quant.py).
//
// Each token's row of K values is cut into blocks of kActBlock; block b gets d_b = max|x| / 127 and
// codes x8 = round_half_even(x · (127 / max|x|)) ∈ [−127, 127] (d_b = 0 and x8 = 0 for an all-zero
// block), so x ≈ d_b · x8. The kernels use x̂ = d_b · x8 in place of x.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace splice {

constexpr int64_t kActBlock = 32;

// Codes and scales of one token's blocks [0, blocks) (blocks past k are all zero): code k goes to
// x8[pos(k)], d_b to d[b], d_b · Σ x8 of block b to dsum[b].
template <typename T, typename Pos>
inline void quantize_act_row(const T* x, int64_t k, int64_t blocks, Pos pos, int8_t* x8, float* d, float* dsum) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kActBlock, hi = std::min(k, lo + kActBlock);
    float amax = 0.f;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const auto q = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[i]) * inv));
      x8[pos(i)] = q;
      sum += q;
    }
    d[b] = amax / 127.f;
    dsum[b] = d[b] * static_cast<float>(sum);
  }
}

}  // namespace splice
