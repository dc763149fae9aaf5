// Argument checks shared by the CPU and CUDA kernels of splice::band_attention and
// splice::decode_attention. The contract is python/splice/ops/attention_reference.py, whose checks
// mirror these (same messages).
#pragma once

#include <torch/types.h>

#include <limits>

namespace splice {

inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
                                int64_t q_dims) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.dim() == q_dims, op, ": q must be ", q_dims, "-d, got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, Hkv, L, D], got ", k.sizes());
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " must be ", dt, " like q, got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t->device());
  }
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(-1) == k.size(-1), op,
              ": q and k must agree in batch and head size, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of KV heads (", k.size(1), ")");
}

inline void check_attention_index(const at::Tensor& t, const char* name, at::ScalarType dtype,
                                  at::IntArrayRef shape, const at::Tensor& q, const char* op) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, op, ": ", name, " must be ", dtype, " ", shape,
              ", got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t.device());
}

inline void check_attention_softcap(double softcap, const char* op) {
  TORCH_CHECK(softcap >= 0 && softcap != std::numeric_limits<double>::infinity(), op,
              ": softcap must be 0 (none) or a positive finite number, got ", softcap);
}

inline void check_band_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& pos, const at::Tensor& valid, const at::Tensor& sinks,
                                      const at::Tensor& window) {
  const char* op = "band_attention";
  check_attention_qkv(q, k, v, op, 4);
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k must have the same T, got ", q.sizes(), " and ", k.sizes());
  const int64_t bt[2] = {k.size(0), k.size(2)}, h[1] = {k.size(1)};
  check_attention_index(pos, "pos", at::kLong, bt, q, op);
  check_attention_index(valid, "valid", at::kBool, bt, q, op);
  check_attention_index(sinks, "sinks", at::kLong, h, q, op);
  check_attention_index(window, "window", at::kLong, h, q, op);
}

inline void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& valid) {
  const char* op = "decode_attention";
  check_attention_qkv(q, k, v, op, 3);
  const int64_t bl[2] = {k.size(0), k.size(2)};
  check_attention_index(valid, "valid", at::kBool, bl, q, op);
}

}  // namespace splice
