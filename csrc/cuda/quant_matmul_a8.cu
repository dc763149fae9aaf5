// ATen launcher of splice::quant_matmul_a8 on CUDA (math: python/splice/ops/quant_matmul_a8.py): x is
// quantized to int8 blocks and back (act_quant_kernel.cuh), then multiplied by quant_matmul's kernel in
// fp32. GPU decode is bound by weight reads, which int8 activations leave unchanged; this backend gives
// CUDA users the same results as the CPU's int8 dot products.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "act_quant_kernel.cuh"
#include "quant_matmul_args.h"
#include "quant_matmul_cuda.h"

namespace splice {
namespace {

at::Tensor quant_matmul_a8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                                int64_t group_size, int64_t out_features, int64_t in_features) {
  check_quant_matmul_args(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features);
  TORCH_CHECK(x.device().is_cuda(), "quant_matmul_a8: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor xq = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (xc.scalar_type() == at::kFloat)
    C10_CUDA_CHECK(gpu::launch_act_quant(xc.data_ptr<float>(), xq.data_ptr<float>(), xc.size(0), xc.size(1), stream));
  else
    C10_CUDA_CHECK(gpu::launch_act_quant(reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr<at::BFloat16>()),
                                         xq.data_ptr<float>(), xc.size(0), xc.size(1), stream));
  return quant_matmul_cuda(xq, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
      .to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CUDA, m) { m.impl("quant_matmul_a8", &quant_matmul_a8_cuda); }

}  // namespace splice
