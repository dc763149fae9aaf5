// The CUDA kernel of splice::quant_matmul, callable from C++ (quant_matmul.cu).
#pragma once

#include <torch/types.h>

namespace splice {

// y = x @ ((q − z) · s)^T (+ bias) in fp32, returned in x.dtype; x float32 or bfloat16 on CUDA.
at::Tensor quant_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                             int64_t group_size, int64_t out_features, int64_t in_features);

}  // namespace splice
