// Steering-table layout of splice::fused_steer, free of torch headers so CUDA device code can use
// it. Mirrors python/splice/ops/steer_layout.py (which states what each kind does):
// params[slot, k] = alpha, beta, lo, hi, start, end, phase, kind, gated, index (all float32).
#pragma once

#include <cstdint>

namespace splice {

enum Param : int64_t { kAlpha = 0, kBeta, kLo, kHi, kStart, kEnd, kPhase, kKind, kGated, kIndex, kNumParams };
constexpr float kPhaseAll = 0.f, kPhasePrompt = 1.f, kPhaseGenerated = 2.f;
constexpr int kKindProject = 0, kKindGate = 1, kKindScale = 2, kKindRead = 3, kKindWrite = 4;
constexpr int kMaxRank = 16;  // registers per token (KIND_READ / KIND_WRITE indices)

}  // namespace splice
