// ATen launcher of the CUDA kernel of splice::quant_matmul (kernel: quant_matmul_kernel.cuh; math:
// python/splice/ops/quant_matmul_reference.py). Supports float32 and bfloat16 x.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "quant_matmul_args.h"
#include "quant_matmul_cuda.h"
#include "quant_matmul_kernel.cuh"

namespace splice {
namespace {

template <typename T, typename ATenT>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
            const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, at::Tensor& y) {
  gpu::QuantMatmulArgs<T> a{};
  a.x = reinterpret_cast<const T*>(x.data_ptr<ATenT>());
  a.qweight = qweight.data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const __half*>(scales.data_ptr<at::Half>());
  a.zeros = reinterpret_cast<const __half*>(zeros.data_ptr<at::Half>());
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.y = reinterpret_cast<T*>(y.data_ptr<ATenT>());
  a.tokens = x.size(0);
  a.out_features = qweight.size(0);
  a.in_features = x.size(1);
  a.group_size = group_size;
  a.bits = static_cast<int>(bits);
  C10_CUDA_CHECK(gpu::launch_quant_matmul(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

at::Tensor quant_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                             int64_t group_size, int64_t out_features, int64_t in_features) {
  check_quant_matmul_args(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features);
  TORCH_CHECK(x.device().is_cuda(), "quant_matmul: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const c10::optional<at::Tensor> bf =
      bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : bias;
  at::Tensor y = at::empty({x.size(0), out_features}, xc.options());
  if (x.scalar_type() == at::kFloat)
    launch<float, float>(xc, qc, sc, zc, bf, bits, group_size, y);
  else
    launch<__nv_bfloat16, at::BFloat16>(xc, qc, sc, zc, bf, bits, group_size, y);
  return y;
}

TORCH_LIBRARY_IMPL(splice, CUDA, m) { m.impl("quant_matmul", &quant_matmul_cuda); }

}  // namespace splice
