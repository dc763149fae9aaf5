// ATen launcher of the CUDA kernel of splice::fused_steer (kernel: fused_steer_kernel.cuh; math:
// python/splice/ops/steer_reference.py). Supports float32, bfloat16 and float16 x. Slot values are
// checked by the kernel (a device assert), so nothing here waits for the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "fused_steer_kernel.cuh"
#include "steer_layout.h"

namespace splice {
namespace {

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : t;
}

template <typename T, typename ATenT>
void launch(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
            const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& params,
            const at::Tensor& slot, const at::Tensor& pos, const at::Tensor& gen,
            const c10::optional<at::Tensor>& weight, double eps, double weight_offset,
            const c10::optional<at::Tensor>& gates, at::Tensor& resid, at::Tensor& out) {
  const bool steered = vecs.has_value() && vecs->size(1) > 0;
  gpu::SteerArgs<T> a{};
  a.x = reinterpret_cast<const T*>(x.data_ptr<ATenT>());
  a.delta = delta.has_value() ? reinterpret_cast<const T*>(delta->data_ptr<ATenT>()) : nullptr;
  a.vecs = steered ? vecs->data_ptr<float>() : nullptr;
  a.params = steered ? params->data_ptr<float>() : nullptr;
  a.slot = slot.data_ptr<int32_t>();
  a.pos = pos.data_ptr<int64_t>();
  a.gen = gen.data_ptr<bool>();
  a.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.num_gates = gates.has_value() ? gates->size(1) : 0;
  a.gates = a.num_gates > 0 ? gates->data_ptr<float>() : nullptr;
  a.resid = reinterpret_cast<T*>(resid.data_ptr<ATenT>());
  a.out = weight.has_value() ? reinterpret_cast<T*>(out.data_ptr<ATenT>()) : nullptr;
  a.tokens = x.size(0);
  a.hidden = x.size(1);
  a.entries = steered ? vecs->size(1) : 0;
  a.slots = vecs.has_value() ? vecs->size(0) : -1;
  a.eps = static_cast<float>(eps);
  a.weight_offset = static_cast<float>(weight_offset);
  C10_CUDA_CHECK(gpu::launch_fused_steer(a, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> fused_steer_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& delta, const c10::optional<at::Tensor>& vecs,
    const c10::optional<at::Tensor>& params, const at::Tensor& slot, const at::Tensor& pos,
    const at::Tensor& gen, const c10::optional<at::Tensor>& weight, double eps, double weight_offset,
    const c10::optional<at::Tensor>& gates) {
  check_fused_steer_args(x, delta, vecs, params, slot, pos, gen, weight, gates);
  TORCH_CHECK(x.device().is_cuda(), "fused_steer: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const auto dc = contiguous(delta), vc = contiguous(vecs), pc = contiguous(params), gtc = contiguous(gates);
  const at::Tensor sc = slot.contiguous(), posc = pos.contiguous(), gc = gen.contiguous();
  const c10::optional<at::Tensor> wf =
      weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous().to(at::kFloat)) : weight;
  at::Tensor resid = at::empty_like(xc);
  at::Tensor out = weight.has_value() ? at::empty_like(xc) : xc.new_empty({0});
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float, float>(xc, dc, vc, pc, sc, posc, gc, wf, eps, weight_offset, gtc, resid, out);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16, at::BFloat16>(xc, dc, vc, pc, sc, posc, gc, wf, eps, weight_offset, gtc, resid,
                                          out);
      break;
    case at::kHalf:
      launch<__half, at::Half>(xc, dc, vc, pc, sc, posc, gc, wf, eps, weight_offset, gtc, resid, out);
      break;
    default:
      TORCH_CHECK(false, "fused_steer (CUDA): x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return {resid, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(splice, CUDA, m) { m.impl("fused_steer", &fused_steer_cuda); }

}  // namespace splice
