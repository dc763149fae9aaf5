// Argument checks shared by the CPU and CUDA kernels of splice::fused_steer; the steering-table
// layout itself lives in steer_params.h. python/splice/ops/steer_reference.py mirrors these checks
// (same messages) for the reference and the Triton kernel.
#pragma once

#include <torch/types.h>

#include "steer_params.h"

namespace splice {

// Shapes, dtypes and devices (no values: nothing here reads device memory).
inline void check_fused_steer_args(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                   const c10::optional<at::Tensor>& vecs,
                                   const c10::optional<at::Tensor>& params, const at::Tensor& slot,
                                   const at::Tensor& pos, const at::Tensor& gen,
                                   const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& gates) {
  TORCH_CHECK(x.dim() == 2, "fused_steer: x must be [tokens, hidden], got ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fused_steer: x must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t t = x.size(0), h = x.size(1);
  if (delta.has_value())
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(),
                "fused_steer: delta must match x in shape and dtype");
  TORCH_CHECK(vecs.has_value() == params.has_value(), "fused_steer: vecs and params go together");
  if (vecs.has_value()) {
    TORCH_CHECK(vecs->dim() == 3 && vecs->size(2) == h && vecs->scalar_type() == at::kFloat,
                "fused_steer: vecs must be float32 [slots, entries, hidden]");
    TORCH_CHECK(params->dim() == 3 && params->size(0) == vecs->size(0) &&
                    params->size(1) == vecs->size(1) && params->size(2) == kNumParams &&
                    params->scalar_type() == at::kFloat,
                "fused_steer: params must be float32 [slots, entries, ", int64_t(kNumParams), "]");
  }
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == t && slot.scalar_type() == at::kInt,
              "fused_steer: slot must be int32 [tokens]");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == t && pos.scalar_type() == at::kLong,
              "fused_steer: pos must be int64 [tokens]");
  TORCH_CHECK(gen.dim() == 1 && gen.size(0) == t && gen.scalar_type() == at::kBool,
              "fused_steer: gen must be bool [tokens]");
  if (weight.has_value())
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == h, "fused_steer: weight must be [hidden]");
  if (gates.has_value())
    TORCH_CHECK(gates->dim() == 2 && gates->size(0) == t && gates->scalar_type() == at::kFloat,
                "fused_steer: gates must be float32 [tokens, gates]");
  const auto on_x = [&](const at::Tensor& other, const char* name) {
    TORCH_CHECK(other.device() == x.device(), "fused_steer: ", name, " must be on ", x.device(), ", got ",
                other.device());
  };
  for (const auto& [opt, name] : {std::pair{&delta, "delta"}, std::pair{&vecs, "vecs"},
                                  std::pair{&params, "params"}, std::pair{&weight, "weight"},
                                  std::pair{&gates, "gates"}})
    if (opt->has_value()) on_x(**opt, name);
  on_x(slot, "slot");
  on_x(pos, "pos");
  on_x(gen, "gen");
}

// Raises IndexError unless every slot[i] lies in [0, slots). Reads the values: host memory only.
inline void check_fused_steer_slots(const int32_t* slot, int64_t tokens, int64_t slots) {
  for (int64_t i = 0; i < tokens; ++i)
    TORCH_CHECK_INDEX(slot[i] >= 0 && slot[i] < slots, "fused_steer: slot[", i, "] = ", slot[i],
                      " is out of range for ", slots, " slots");
}

}  // namespace splice
