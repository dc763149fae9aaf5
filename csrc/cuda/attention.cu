// ATen launchers of the CUDA kernels of splice::band_attention and splice::decode_attention (kernel:
// attention_kernel.cuh; contract: python/splice/ops/attention_reference.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "attention_checks.h"
#include "attention_kernel.cuh"

namespace splice {
namespace {

// Fills the arguments shared by both ops from contiguous tensors and launches the kernel for T.
template <typename T, typename ATenT>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
            const at::Tensor* pos, const at::Tensor* sinks, const at::Tensor* window, double scale, double softcap,
            at::Tensor& out) {
  gpu::AttentionArgs<T> a{};
  a.q = reinterpret_cast<const T*>(q.const_data_ptr<ATenT>());
  a.k = reinterpret_cast<const T*>(k.const_data_ptr<ATenT>());
  a.v = reinterpret_cast<const T*>(v.const_data_ptr<ATenT>());
  a.out = reinterpret_cast<T*>(out.data_ptr<ATenT>());
  a.valid = valid.const_data_ptr<bool>();
  a.batch = q.size(0);
  a.q_heads = q.size(1);
  a.kv_heads = k.size(1);
  a.keys = k.size(2);
  a.head_dim = k.size(3);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (pos != nullptr) {
    a.pos = pos->const_data_ptr<int64_t>();
    a.sinks = sinks->const_data_ptr<int64_t>();
    a.window = window->const_data_ptr<int64_t>();
    a.queries = q.size(2);
    C10_CUDA_CHECK(gpu::launch_band_attention(a, stream));
  } else {
    a.queries = 1;
    C10_CUDA_CHECK(gpu::launch_decode_attention(a, stream));
  }
}

at::Tensor run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
               const at::Tensor* pos, const at::Tensor* sinks, const at::Tensor* window, double scale,
               double softcap) {
  TORCH_CHECK(q.device().is_cuda(), "attention: tensors must be CUDA tensors");
  TORCH_CHECK(q.size(-1) <= 32 * gpu::kAttnMaxChunks, "attention: the CUDA kernel takes head sizes up to ",
              32 * gpu::kAttnMaxChunks, ", got ", q.size(-1));
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = valid.contiguous();
  at::Tensor out = at::empty_like(qc);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float, float>(qc, kc, vc, mc, pos, sinks, window, scale, softcap, out); break;
    case at::kBFloat16:
      launch<__nv_bfloat16, at::BFloat16>(qc, kc, vc, mc, pos, sinks, window, scale, softcap, out);
      break;
    default: launch<__half, at::Half>(qc, kc, vc, mc, pos, sinks, window, scale, softcap, out); break;
  }
  return out;
}

at::Tensor band_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const at::Tensor& valid, const at::Tensor& sinks, const at::Tensor& window,
                               double scale, double softcap) {
  check_band_attention_args(q, k, v, pos, valid, sinks, window);
  check_attention_softcap(softcap, "band_attention");
  const at::Tensor pc = pos.contiguous(), sc = sinks.contiguous(), wc = window.contiguous();
  return run(q, k, v, valid, &pc, &sc, &wc, scale, softcap);
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& valid, double scale, double softcap) {
  check_decode_attention_args(q, k, v, valid);
  check_attention_softcap(softcap, "decode_attention");
  return run(q, k, v, valid, nullptr, nullptr, nullptr, scale, softcap);
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CUDA, m) {
  m.impl("band_attention", &band_attention_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace splice
