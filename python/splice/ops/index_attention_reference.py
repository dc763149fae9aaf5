"""Plain-PyTorch fp32 reference and argument checks for ``splice::index_attention``: decode attention of
one query per row over a chosen subset of the cache slots of each KV head.

Contract (``B`` rows, head size ``D``, ``L`` cache slots, ``K`` chosen per KV head)::

    q       [B, Hq, D]       float32, bfloat16 or float16
    k, v    [B, Hkv, L, D]   q's dtype; Hq a multiple of Hkv; query head h reads KV head g = h // (Hq / Hkv)
    idx     [B, Hkv, K]      int64 slot indices into L; a negative entry means "no slot" and is skipped;
                             the non-negative entries of a row are distinct (a precondition, not checked)
    scale   float; softcap float >= 0 (0: none)

    out[b, h] = softmax over the j = idx[b, g, :] >= 0 of cap(scale · q[b, h] · k[b, g, j]), times v[b, g, j]

``cap`` is the identity for ``softcap = 0`` and Gemma 2's logit soft-capping
``cap(s) = softcap · tanh(s / softcap)`` for ``softcap > 0``. A query with no slot gives 0. Results are
computed in fp32 and rounded once to q's dtype.

The shape, dtype and device checks also run on fake tensors; their messages are those of the C++
kernels (csrc/cpu/index_attention_checks.h). Index values are checked on the host for CPU tensors
(IndexError, :func:`check_slot_indices`, the C++ kernel's message), by a device assert on CUDA (for
Triton, only under ``TRITON_DEBUG=1``), so that nothing waits for the GPU.
"""

from __future__ import annotations

import torch

from .attention_reference import check_qkv, check_softcap, masked_attention

OP = "index_attention"


def check_index_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """Raise RuntimeError unless the arguments fit the contract (shapes, dtypes, devices)."""
    check_qkv(q, k, v, OP, 3)
    b, hkv = k.shape[0], k.shape[1]
    torch._check(
        idx.dtype == torch.int64 and idx.dim() == 3 and idx.shape[0] == b and idx.shape[1] == hkv,
        lambda: f"{OP}: idx must be int64 [B, Hkv, K] with B = {b} and Hkv = {hkv}, got {idx.dtype} "
        f"{list(idx.shape)}",
    )
    torch._check(idx.device == q.device, lambda: f"{OP}: idx must be on {q.device}, got {idx.device}")


def check_slot_indices(idx: torch.Tensor, slots: int) -> None:
    """Raise IndexError naming the first ``idx[b, g, j] >= slots`` (negative entries are skipped slots);
    for CPU tensors outside compilation only, as :func:`splice.ops.host_checks.first_out_of_range`."""
    if idx.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (idx >= slots).nonzero()  # row-major order: the first is the one the C++ kernel names
    if bad.numel():
        at = bad[0].tolist()
        raise IndexError(f"{OP}: idx[{', '.join(map(str, at))}] = {int(idx[tuple(at)])} is out of range "
                         f"for {slots} slots")


def index_attention_reference(q, k, v, idx, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """[B, Hq, D] in q's dtype; see the module docstring."""
    check_index_attention(q, k, v, idx)
    check_softcap(softcap, OP)
    check_slot_indices(idx, k.shape[2])
    if k.shape[2] == 0:  # an empty cache: every entry is "no slot"
        idx = idx[..., :0]
    rows = idx.clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[3])  # [B, Hkv, K, D]
    ks, vs = torch.gather(k, 2, rows), torch.gather(v, 2, rows)
    mask = (idx >= 0)[:, :, None, :]  # [B, Hkv, 1, K], repeated for the query heads of each group
    return masked_attention(q[:, :, None], ks, vs, mask, scale, softcap)[:, :, 0].to(q.dtype)
