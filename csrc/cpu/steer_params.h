// Steering-table layout of splice::fused_steer, free of torch headers so CUDA device code can use
// it. Mirrors python/splice/ops/steer_layout.py: params[slot, k] = alpha, beta, lo, hi, start, end,
// phase (all float32).
#pragma once

#include <cstdint>

namespace splice {

enum Param : int64_t { kAlpha = 0, kBeta, kLo, kHi, kStart, kEnd, kPhase, kNumParams };
constexpr float kPhaseAll = 0.f, kPhasePrompt = 1.f, kPhaseGenerated = 2.f;

}  // namespace splice
