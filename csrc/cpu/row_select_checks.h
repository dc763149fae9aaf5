// Argument checks shared by the CPU and CUDA kernels of splice::gather_rows / splice::scatter_rows.
// The contract is python/splice/ops/row_select_reference.py, whose checks mirror these.
#pragma once

#include <torch/types.h>

#include <vector>

namespace splice {

// Shape of gather_rows(x, idx): x's, with the leading dim replaced by the index count.
inline std::vector<int64_t> gathered_shape(const at::Tensor& x, const at::Tensor& idx) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = idx.size(0);
  return shape;
}

// Bytes of one row of x: the elements of its trailing dims.
inline int64_t row_bytes(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(1)) * static_cast<int64_t>(x.element_size());
}

inline void check_gather_rows_args(const at::Tensor& x, const at::Tensor& idx, const char* op = "gather_rows") {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [rows, ...], got a 0-d tensor");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": idx must be int64 [indices], got ",
              idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(idx.device() == x.device(), op, ": idx must be on ", x.device(), ", got ", idx.device());
}

inline void check_scatter_rows_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx) {
  check_gather_rows_args(x, idx, "scatter_rows");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "scatter_rows: y must be ", x.scalar_type(), " like x, got ",
              y.scalar_type());
  const std::vector<int64_t> want = gathered_shape(x, idx);
  TORCH_CHECK(y.sizes() == at::IntArrayRef(want), "scatter_rows: y must be [indices, ...x's trailing shape] = ",
              at::IntArrayRef(want), ", got ", y.sizes());
  TORCH_CHECK(y.device() == x.device(), "scatter_rows: y must be on ", x.device(), ", got ", y.device());
}

}  // namespace splice
