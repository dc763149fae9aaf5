// splice._C: the Python module that carries the C++ kernels. Kernels register themselves with
// the dispatcher (TORCH_LIBRARY_IMPL) when the library loads; the op schemas are defined in
// python/splice/ops/library.py. This module only reports what was compiled in.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef SPLICE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
