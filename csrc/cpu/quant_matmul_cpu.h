// The CPU kernels of splice::quant_matmul and splice::quant_matmul_a8, callable from C++.
#pragma once

#include <torch/types.h>

namespace splice {

// y = x @ ((q − z) · s)^T (+ bias) in fp32, returned in x.dtype (quant_matmul.cpp).
at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                            int64_t group_size, int64_t out_features, int64_t in_features);

// Whether quant_matmul_a8 was compiled with int8 dot products (AVX-512 VNNI) (quant_matmul_a8.cpp).
bool int8_dot_products();

}  // namespace splice
