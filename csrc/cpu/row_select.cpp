// CPU kernels of splice::gather_rows and splice::scatter_rows: row copies by memcpy, split across
// threads in byte ranges. The contract is python/splice/ops/row_select_reference.py.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "row_select_checks.h"

namespace splice {
namespace {

// Bytes below which a copy stays on the calling thread: waking another one costs more.
constexpr int64_t kTaskBytes = 256 * 1024;

// Raises IndexError, before anything is copied, unless every index lies in [0, rows).
void check_indices(const int64_t* idx, int64_t count, int64_t rows, const char* op) {
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < rows, op, ": idx[", i, "] = ", idx[i], " is out of range for ",
                      rows, " rows");
}

// Copies count rows of rb bytes, row i from src_row(i) to dst_row(i), splitting the count * rb bytes
// into per-thread ranges so that a few large rows are spread over the threads as well as many small.
template <typename SrcRow, typename DstRow>
void copy_rows(int64_t count, int64_t rb, const SrcRow& src_row, const DstRow& dst_row) {
  at::parallel_for(0, count * rb, kTaskBytes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin / rb; i * rb < end; ++i) {
      const int64_t lo = std::max(begin - i * rb, int64_t{0}), hi = std::min(end - i * rb, rb);
      std::memcpy(dst_row(i) + lo, src_row(i) + lo, static_cast<size_t>(hi - lo));
    }
  });
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& idx) {
  check_gather_rows_args(x, idx);
  const at::Tensor xc = x.contiguous(), ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  check_indices(ip, ic.size(0), xc.size(0), "gather_rows");
  at::Tensor out = at::empty(gathered_shape(xc, ic), xc.options());
  const int64_t rb = row_bytes(xc);
  const char* xp = static_cast<const char*>(xc.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  copy_rows(
      ic.size(0), rb, [&](int64_t i) { return xp + ip[i] * rb; }, [&](int64_t i) { return op + i * rb; });
  return out;
}

// One pass over the rows of out: row r comes from y where idx names it, from x elsewhere.
at::Tensor scatter_rows_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx) {
  check_scatter_rows_args(x, y, idx);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), ic = idx.contiguous();
  const int64_t rows = xc.size(0), count = ic.size(0);
  const int64_t* ip = ic.data_ptr<int64_t>();
  check_indices(ip, count, rows, "scatter_rows");
  std::vector<int64_t> from_y(rows, -1);  // row of y that lands in each row of out, or -1
  for (int64_t i = 0; i < count; ++i) from_y[ip[i]] = i;
  at::Tensor out = at::empty_like(xc);
  const int64_t rb = row_bytes(xc);
  const char* xp = static_cast<const char*>(xc.const_data_ptr());
  const char* yp = static_cast<const char*>(yc.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  copy_rows(
      rows, rb, [&](int64_t r) { return from_y[r] < 0 ? xp + r * rb : yp + from_y[r] * rb; },
      [&](int64_t r) { return op + r * rb; });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace splice
