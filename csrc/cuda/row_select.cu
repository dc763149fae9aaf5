// ATen launchers of the CUDA kernels of splice::gather_rows and splice::scatter_rows (kernel:
// row_select_kernel.cuh; contract: python/splice/ops/row_select_reference.py). Index values are
// checked on the device, so nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "row_select_checks.h"
#include "row_select_kernel.cuh"

namespace splice {
namespace {

void copy_rows(const at::Tensor& src, at::Tensor& dst, const at::Tensor& idx, int64_t indexed_rows, bool gather) {
  gpu::RowCopyArgs a{};
  a.src = static_cast<const char*>(src.const_data_ptr());
  a.dst = static_cast<char*>(dst.data_ptr());
  a.idx = idx.const_data_ptr<int64_t>();
  a.count = idx.size(0);
  a.indexed_rows = indexed_rows;
  a.row_bytes = row_bytes(src);
  a.gather = gather;
  C10_CUDA_CHECK(gpu::launch_copy_rows(a, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& idx) {
  check_gather_rows_args(x, idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ic = idx.contiguous();
  at::Tensor out = at::empty(gathered_shape(xc, ic), xc.options());
  copy_rows(xc, out, ic, xc.size(0), /*gather=*/true);
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx) {
  check_scatter_rows_args(x, y, idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor yc = y.contiguous(), ic = idx.contiguous();
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  copy_rows(yc, out, ic, out.size(0), /*gather=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace splice
