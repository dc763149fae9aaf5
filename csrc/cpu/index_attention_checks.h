// Argument checks shared by the CPU and CUDA kernels of splice::index_attention. The contract is
// python/splice/ops/index_attention_reference.py, whose checks mirror these (same messages).
#pragma once

#include <torch/types.h>

#include "attention_checks.h"

namespace splice {

inline void check_index_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& idx) {
  const char* op = "index_attention";
  check_attention_qkv(q, k, v, op, 3);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 3 && idx.size(0) == k.size(0) &&
                  idx.size(1) == k.size(1),
              op, ": idx must be int64 [B, Hkv, K] with B = ", k.size(0), " and Hkv = ", k.size(1), ", got ",
              idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(idx.device() == q.device(), op, ": idx must be on ", q.device(), ", got ", idx.device());
}

}  // namespace splice
