"""Triton kernels of ``splice::band_attention`` and ``splice::decode_attention``.

The contract is :mod:`splice.ops.attention_reference` (fp32 math, one rounding to q's dtype).
``band_attention``: one program per (block of queries, batch · query head), a flash-style online
softmax over blocks of keys up to the diagonal; a key block that no query of the block may read (all
padding, or outside the head's sinks and window) is skipped before its scores are computed.
``decode_attention``: one program per (batch, KV head) runs the query heads of the group together over
the cache. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops.attention_reference import check_band_attention, check_decode_attention, check_softcap


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step for scores ``s`` [rows, keys] (−inf where not readable): the weights
    ``p``, the factor ``alpha`` that rescales what was summed so far, and the new running max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have read nothing yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _softcapped(s, softcap):
    """``softcap · tanh(s / softcap)`` (Gemma 2's logit soft-capping), ``s`` itself for softcap 0;
    tanh written as 2·sigmoid(2x) − 1."""
    if softcap > 0:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


@triton.jit
def _normalise(acc, l_i):
    """``acc / l_i`` per row, 0 for a row that read no key."""
    return tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)


@triton.jit
def _fold_group_block(q, k, v, readable, softcap, acc, m_i, l_i):
    """One decode step of a KV head's query group ``q`` [GROUP_PAD, D] over a block of keys and values
    ``k``, ``v`` [BLOCK_N, D] (fp32) of which ``readable`` [BLOCK_N] may be read: soft-capped scores
    (a sum over D: too few query rows for ``tl.dot``), then one online-softmax step into ``acc``."""
    s = _softcapped(tl.sum(q[:, None, :] * k[None, :, :], axis=2), softcap)
    s = tl.where(readable[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
    return acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1), m_new, l_i


@triton.jit
def _band_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, valid_ptr, sinks_ptr, window_ptr, out_ptr,
    scale, softcap, T, HQ, HKV, GROUP,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    g = (bh % HQ) // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < D
    q = tl.load(q_ptr + (bh * T + offs_m)[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32) * scale
    qpos = tl.load(pos_ptr + b * T + offs_m, mask=mask_m, other=0)
    q_min = tl.min(tl.where(mask_m, qpos, 9223372036854775807))
    sinks = tl.load(sinks_ptr + g)
    window = tl.load(window_ptr + g)
    full = window <= 0
    kv_base = (b * HKV + g) * T
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < T
        kpos = tl.load(pos_ptr + b * T + offs_n, mask=mask_n, other=0)
        kvalid = tl.load(valid_ptr + b * T + offs_n, mask=mask_n, other=0) != 0
        near = full | (kpos < sinks) | (q_min - kpos < window)
        if tl.sum((kvalid & near).to(tl.int32)) > 0:  # some query of the block may read some key here
            kv_mask = mask_n[:, None] & mask_d[None, :]
            kv_offs = (kv_base + offs_n)[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
            s = _softcapped(tl.dot(q, tl.trans(k), input_precision="ieee"), softcap)
            dist = qpos[:, None] - kpos[None, :]
            allowed = (kvalid[None, :] & (offs_n[None, :] <= offs_m[:, None])
                       & (full | (dist < window) | (kpos[None, :] < sinks)))
            s = tl.where(allowed, s, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    out = _normalise(acc, l_i)
    tl.store(out_ptr + (bh * T + offs_m)[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr,
    scale, softcap, L, HKV, GROUP,
    D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    b = bg // HKV
    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < D
    q_offs = (bg * GROUP + offs_h)[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        slot = tl.load(valid_ptr + b * L + offs_n, mask=mask_n, other=0) != 0
        if tl.sum(slot.to(tl.int32)) > 0:
            kv_mask = slot[:, None] & mask_d[None, :]
            kv_offs = (bg * L + offs_n)[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
            acc, m_i, l_i = _fold_group_block(q, k, v, slot, softcap, acc, m_i, l_i)
    out = _normalise(acc, l_i)
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])


def _device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def band_attention_triton(q, k, v, pos, valid, sinks, window, scale, softcap=0.0):
    """Same signature and result as ``torch.ops.splice.band_attention``."""
    check_band_attention(q, k, v, pos, valid, sinks, window)
    check_softcap(softcap, "band_attention")
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block = 16 if t <= 16 else 32 if block_d > 64 else 64
    with _device(q):
        _band_attention_kernel[(triton.cdiv(t, block), b * hq)](
            q, k, v, pos.contiguous(), valid.contiguous(), sinks.contiguous(), window.contiguous(), out,
            float(scale), float(softcap), t, hq, hkv, hq // hkv, D=d, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
        )
    return out


def decode_attention_triton(q, k, v, valid, scale, softcap=0.0):
    """Same signature and result as ``torch.ops.splice.decode_attention``."""
    check_decode_attention(q, k, v, valid)
    check_softcap(softcap, "decode_attention")
    b, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = hq // hkv
    with _device(q):
        _decode_attention_kernel[(b * hkv,)](
            q, k, v, valid.contiguous(), out, float(scale), float(softcap), length, hkv, group,
            D=d, GROUP_PAD=triton.next_power_of_2(group), BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out
