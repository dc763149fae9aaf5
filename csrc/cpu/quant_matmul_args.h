// Argument checks shared by the CPU and CUDA kernels of splice::quant_matmul (layout: quant_layout.h).
#pragma once

#include <torch/types.h>

#include "quant_layout.h"

namespace splice {

inline void check_quant_matmul_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                    const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                                    int64_t group_size, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quant_matmul: bits must be 2, 3, 4 or 8, got ",
              bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "quant_matmul: group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(out_features > 0 && in_features > 0, "quant_matmul: out_features and in_features must be positive");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "quant_matmul: x must be [tokens, ", in_features, "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t groups = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(0) == out_features &&
                  qweight.size(1) == quant_row_bytes(in_features, static_cast<int>(bits)),
              "quant_matmul: qweight must be uint8 [", out_features, ", ",
              quant_row_bytes(in_features, static_cast<int>(bits)), "], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  for (const auto& [t, name] : {std::pair{&scales, "scales"}, std::pair{&zeros, "zeros"}})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == out_features &&
                    t->size(1) == groups,
                "quant_matmul: ", name, " must be float16 [", out_features, ", ", groups, "], got ",
                t->scalar_type(), " ", t->sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->is_floating_point(),
                "quant_matmul: bias must be a float [", out_features, "] tensor");
  for (const at::Tensor* t : {&qweight, &scales, &zeros})
    TORCH_CHECK(t->device() == x.device(), "quant_matmul: all tensors must be on ", x.device());
  if (bias.has_value()) TORCH_CHECK(bias->device() == x.device(), "quant_matmul: bias must be on ", x.device());
}

}  // namespace splice
