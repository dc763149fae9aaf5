// CPU kernel of splice::fused_steer: residual add + steering + RMSNorm in one pass per token.
// The math is stated in python/splice/ops/steer_reference.py; this file must match it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "steer_layout.h"

namespace splice {
namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float g, const float* __restrict v, float* __restrict u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] += g * v[i];
}

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// bfloat16 rows as raw bits, so that the compiler vectorizes the conversions (c10::BFloat16's
// scalar conversions do not): widening is a shift, narrowing is c10's round-to-nearest-even.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return std::isnan(f) ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <>
inline void load_row(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <>
inline void store_row(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = bf16_bits(src[i]);
}

inline bool entry_active(const float* p, int64_t pos, bool gen) {
  const float posf = static_cast<float>(pos);
  if (!(p[kStart] <= posf && posf < p[kEnd])) return false;
  const float phase = p[kPhase];
  return phase == kPhaseAll || (phase == kPhasePrompt && !gen) || (phase == kPhaseGenerated && gen);
}

// The gate register's new value from a KIND_GATE entry (see steer_layout.py).
inline float gate_value(const float* u, const float* v, const float* p, const float* row_gates,
                        int64_t num_gates, int64_t h) {
  const int64_t index = static_cast<int64_t>(p[kIndex]);
  if (index >= 0) return index < num_gates ? row_gates[index] : 0.f;
  float score = dot(u, v, h);
  if (p[kBeta] == 1.f) score /= std::fmax(std::sqrt(dot(u, u, h)), 1e-30f);
  if (std::isinf(p[kAlpha])) return score > p[kLo] ? 1.f : 0.f;
  return 1.f / (1.f + std::exp(-(score - p[kLo]) * p[kAlpha]));
}

// Runs one slot's entries on u (length h), in order; row_gates is the token's [num_gates] row.
inline void steer_row(float* __restrict u, const float* vecs, const float* params, int64_t k_entries,
                      int64_t h, int64_t pos, bool gen, const float* row_gates, int64_t num_gates) {
  float g = 1.f;
  float reg[kMaxRank] = {};
  for (int64_t k = 0; k < k_entries; ++k) {
    const float* p = params + k * kNumParams;
    const int kind = static_cast<int>(p[kKind]);
    if (kind == kKindProject && p[kAlpha] == 0.f && p[kBeta] == 0.f) continue;
    if (!entry_active(p, pos, gen)) {
      if (kind == kKindGate) g = 0.f;
      continue;
    }
    const float* v = vecs + k * h;
    const float f = p[kGated] == 1.f ? g : 1.f;
    const int64_t index = static_cast<int64_t>(p[kIndex]);
    const bool reg_ok = index >= 0 && index < kMaxRank;
    switch (kind) {
      case kKindProject: {
        float gain = p[kAlpha];
        if (p[kBeta] != 0.f) {
          const float proj = dot(u, v, h);
          gain += p[kBeta] * (std::fmin(std::fmax(proj, p[kLo]), p[kHi]) - proj);
        }
        axpy(f * gain, v, u, h);
        break;
      }
      case kKindGate:
        g = gate_value(u, v, p, row_gates, num_gates, h);
        break;
      case kKindScale: {
        const float a = f * p[kAlpha];
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) u[i] += a * v[i] * u[i];
        break;
      }
      case kKindRead:
        if (reg_ok) reg[index] = dot(u, v, h);
        break;
      case kKindWrite:
        if (reg_ok) axpy(f * p[kAlpha] * (reg[index] - p[kLo]), v, u, h);
        break;
      default:
        break;
    }
  }
}

template <typename T>
void fused_steer_rows(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                      const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& params,
                      const at::Tensor& slot, const at::Tensor& pos, const at::Tensor& gen,
                      const c10::optional<at::Tensor>& weight, double eps, double weight_offset,
                      const c10::optional<at::Tensor>& gates, at::Tensor& resid, at::Tensor& out) {
  const int64_t t_count = x.size(0), h = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta.has_value() ? delta->data_ptr<T>() : nullptr;
  const bool steered = vecs.has_value() && vecs->size(1) > 0;
  const int64_t k_entries = steered ? vecs->size(1) : 0;
  const float* vp = steered ? vecs->data_ptr<float>() : nullptr;
  const float* pp = steered ? params->data_ptr<float>() : nullptr;
  const int32_t* sp = slot.data_ptr<int32_t>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  const bool* gp = gen.data_ptr<bool>();
  const int64_t num_gates = gates.has_value() ? gates->size(1) : 0;
  const float* gatesp = num_gates > 0 ? gates->data_ptr<float>() : nullptr;
  std::vector<float> w;
  if (weight.has_value()) {
    w.resize(h);
    if (weight->scalar_type() == x.scalar_type()) {
      load_row(weight->contiguous().data_ptr<T>(), w.data(), h);
    } else {
      const at::Tensor wf = weight->to(at::kFloat).contiguous();
      w.assign(wf.data_ptr<float>(), wf.data_ptr<float>() + h);
    }
    for (float& wi : w) wi += static_cast<float>(weight_offset);
  }
  T* rp = resid.data_ptr<T>();
  T* op = weight.has_value() ? out.data_ptr<T>() : nullptr;
  const float epsf = static_cast<float>(eps);

  at::parallel_for(0, t_count, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(h), ubuf(h);
    float* xr = xbuf.data();
    float* u = ubuf.data();
    for (int64_t t = begin; t < end; ++t) {
      load_row(xp + t * h, xr, h);
      if (dp) load_row(dp + t * h, u, h);
      else std::copy(xr, xr + h, u);
      const int32_t s = sp[t];
      if (steered && s != 0)
        steer_row(u, vp + s * k_entries * h, pp + s * k_entries * kNumParams, k_entries, h, posp[t], gp[t],
                  gatesp ? gatesp + t * num_gates : nullptr, num_gates);
      if (dp) axpy(1.f, xr, u, h);
      store_row(u, rp + t * h, h);  // r, rounded to T; the norm reads the rounded values back
      load_row(rp + t * h, u, h);
      if (!op) continue;
      const float inv = 1.f / std::sqrt(dot(u, u, h) / static_cast<float>(h) + epsf);
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) u[i] = u[i] * inv * w[i];
      store_row(u, op + t * h, h);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_steer_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& delta, const c10::optional<at::Tensor>& vecs,
    const c10::optional<at::Tensor>& params, const at::Tensor& slot, const at::Tensor& pos,
    const at::Tensor& gen, const c10::optional<at::Tensor>& weight, double eps, double weight_offset,
    const c10::optional<at::Tensor>& gates) {
  check_fused_steer_args(x, delta, vecs, params, slot, pos, gen, weight, gates);
  const at::Tensor xc = x.contiguous();
  const c10::optional<at::Tensor> dc = delta.has_value() ? c10::optional<at::Tensor>(delta->contiguous()) : delta;
  const c10::optional<at::Tensor> vc = vecs.has_value() ? c10::optional<at::Tensor>(vecs->contiguous()) : vecs;
  const c10::optional<at::Tensor> pc = params.has_value() ? c10::optional<at::Tensor>(params->contiguous()) : params;
  const at::Tensor sc = slot.contiguous(), posc = pos.contiguous(), gc = gen.contiguous();
  const c10::optional<at::Tensor> gtc = gates.has_value() ? c10::optional<at::Tensor>(gates->contiguous()) : gates;
  if (vecs.has_value()) check_fused_steer_slots(sc.data_ptr<int32_t>(), sc.size(0), vecs->size(0));
  at::Tensor resid = at::empty_like(xc);
  at::Tensor out = weight.has_value() ? at::empty_like(xc) : xc.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_steer_cpu", [&] {
    fused_steer_rows<scalar_t>(xc, dc, vc, pc, sc, posc, gc, weight, eps, weight_offset, gtc, resid, out);
  });
  return {resid, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CPU, m) { m.impl("fused_steer", &fused_steer_cpu); }

}  // namespace splice
