"""Triton kernel of ``splice::index_attention``: one program per (batch, KV head) runs the query heads of
the group together over the slots that ``idx`` names, BLOCK_N entries at a time: it loads the entries,
gathers their key and value rows through computed pointers (a negative entry loads nothing), and takes
one online-softmax step in fp32.

The contract is :mod:`splice.ops.index_attention_reference`. Index values are checked on the host for
CPU tensors, as the reference checks them; on the device by a device assert (compiled in with
``TRITON_DEBUG=1``), and an out-of-range index never reads memory. Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops.attention_reference import check_softcap
from splice.ops.index_attention_reference import check_index_attention, check_slot_indices

from .attention import _fold_group_block, _normalise


@triton.jit
def _index_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr,
    scale, softcap, L, K, HKV, GROUP,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    b = bg // HKV
    g = bg % HKV
    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < D
    q_offs = (bg * GROUP + offs_h)[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
    for start in range(0, K, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        slot = tl.load(idx_ptr + bg * K + offs_n, mask=offs_n < K, other=-1)
        tl.device_assert(slot < L, "index_attention: slot index out of range")
        taken = (slot >= 0) & (slot < L)
        if tl.sum(taken.to(tl.int32)) > 0:
            kv_mask = taken[:, None] & mask_d[None, :]
            k = tl.load(k_base + slot[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + slot[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            acc, m_i, l_i = _fold_group_block(q, k, v, taken, softcap, acc, m_i, l_i)
    out = _normalise(acc, l_i)
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])


def index_attention_triton(q, k, v, idx, scale, softcap=0.0):
    """Same signature and result as ``torch.ops.splice.index_attention``."""
    check_index_attention(q, k, v, idx)
    check_softcap(softcap, "index_attention")
    check_slot_indices(idx, k.shape[2])
    b, hq, d = q.shape
    hkv, length, count = k.shape[1], k.shape[2], idx.shape[2]
    q = q.contiguous()
    k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (k, v))
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = hq // hkv
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _index_attention_kernel[(b * hkv,)](
            q, k, v, idx.contiguous(), out, float(scale), float(softcap), length, count, hkv, group,
            *k.stride()[:3], *v.stride()[:3],
            D=d, GROUP_PAD=triton.next_power_of_2(group), BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out
