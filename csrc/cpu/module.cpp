// splice._C: the Python module that carries the C++ kernels. Kernels register themselves with
// the dispatcher (TORCH_LIBRARY_IMPL) when the library loads; the op schemas are defined in
// python/splice/ops/library.py. This module only reports what was compiled in
// (CUDA kernels; int8 dot products in quant_matmul_a8).
#include <torch/extension.h>

#include "quant_matmul_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef SPLICE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("int8_dot_products") = splice::int8_dot_products();
}
