// ATen launcher of the CUDA kernel of splice::index_attention (kernel: index_attention_kernel.cuh;
// contract: python/splice/ops/index_attention_reference.py). Index values are checked on the device,
// so nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "index_attention_checks.h"
#include "index_attention_kernel.cuh"

namespace splice {
namespace {

template <typename T, typename ATenT>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, double scale,
            double softcap, at::Tensor& out) {
  gpu::IndexAttentionArgs<T> a{};
  a.q = reinterpret_cast<const T*>(q.const_data_ptr<ATenT>());
  a.k = reinterpret_cast<const T*>(k.const_data_ptr<ATenT>());
  a.v = reinterpret_cast<const T*>(v.const_data_ptr<ATenT>());
  a.out = reinterpret_cast<T*>(out.data_ptr<ATenT>());
  a.idx = idx.const_data_ptr<int64_t>();
  a.batch = q.size(0);
  a.q_heads = q.size(1);
  a.kv_heads = k.size(1);
  a.slots = k.size(2);
  a.count = idx.size(2);
  a.head_dim = k.size(3);
  for (int i = 0; i < 3; ++i) a.k_stride[i] = k.stride(i), a.v_stride[i] = v.stride(i);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  C10_CUDA_CHECK(gpu::launch_index_attention(a, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor index_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& idx, double scale, double softcap) {
  check_index_attention_args(q, k, v, idx);
  check_attention_softcap(softcap, "index_attention");
  TORCH_CHECK(q.device().is_cuda(), "index_attention: tensors must be CUDA tensors");
  TORCH_CHECK(q.size(-1) <= 32 * gpu::kAttnMaxChunks, "index_attention: the CUDA kernel takes head sizes up to ",
              32 * gpu::kAttnMaxChunks, ", got ", q.size(-1));
  const c10::cuda::CUDAGuard guard(q.device());
  // Rows are read in place: k and v need only unit stride along the head dimension.
  const at::Tensor qc = q.contiguous(), ic = idx.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous(), vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor out = at::empty_like(qc);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float, float>(qc, kc, vc, ic, scale, softcap, out); break;
    case at::kBFloat16: launch<__nv_bfloat16, at::BFloat16>(qc, kc, vc, ic, scale, softcap, out); break;
    default: launch<__half, at::Half>(qc, kc, vc, ic, scale, softcap, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CUDA, m) { m.impl("index_attention", &index_attention_cuda); }

}  // namespace splice
