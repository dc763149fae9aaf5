"""Triton kernel of ``splice::fused_steer``: residual add + steering + RMSNorm, one program per token.

The contract is :func:`splice.ops.steer_reference.fused_steer_reference` (fp32 math, ``r`` rounded
once to ``x.dtype``, ``out`` computed from the rounded ``r``); the ``params`` layout is
:mod:`splice.ops.steer_layout`. Arguments are checked as the reference checks them
(:func:`splice.ops.steer_reference.check_fused_steer`; slot values on the host for CPU tensors only);
on the device a token whose slot is out of range fails a device assert (compiled in with
``TRITON_DEBUG=1``), is left unsteered and reads no table row. Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops import steer_layout as L
from splice.ops.steer_reference import check_fused_steer, check_steer_slots

_ALPHA = tl.constexpr(L.ALPHA)
_BETA = tl.constexpr(L.BETA)
_LO = tl.constexpr(L.LO)
_HI = tl.constexpr(L.HI)
_START = tl.constexpr(L.START)
_END = tl.constexpr(L.END)
_PHASE = tl.constexpr(L.PHASE)
_KIND = tl.constexpr(L.KIND)
_GATED = tl.constexpr(L.GATED)
_INDEX = tl.constexpr(L.INDEX)
_NPARAMS = tl.constexpr(L.NPARAMS)
_PHASE_ALL = tl.constexpr(float(L.PHASE_ALL))
_PHASE_PROMPT = tl.constexpr(float(L.PHASE_PROMPT))
_PHASE_GENERATED = tl.constexpr(float(L.PHASE_GENERATED))
_KIND_PROJECT = tl.constexpr(float(L.KIND_PROJECT))
_KIND_GATE = tl.constexpr(float(L.KIND_GATE))
_KIND_SCALE = tl.constexpr(float(L.KIND_SCALE))
_KIND_READ = tl.constexpr(float(L.KIND_READ))
_KIND_WRITE = tl.constexpr(float(L.KIND_WRITE))
_MAX_RANK = tl.constexpr(L.MAX_RANK)
_INF = tl.constexpr(float("inf"))


@triton.jit
def _fused_steer_kernel(
    x_ptr, d_ptr, v_ptr, p_ptr, slot_ptr, pos_ptr, gen_ptr, w_ptr, g_ptr, r_ptr, o_ptr,
    H, K, S, G, eps, weight_offset,
    HAS_DELTA: tl.constexpr, HAS_VECS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    base = row * H
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        u = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        u = x
    if HAS_VECS:
        s = tl.load(slot_ptr + row).to(tl.int64)
        in_range = (s >= 0) & (s < S)
        tl.device_assert(in_range, "fused_steer: slot value out of range")
        if (s != 0) & in_range:
            posf = tl.load(pos_ptr + row).to(tl.float32)
            gen = tl.load(gen_ptr + row)
            ranks = tl.arange(0, _MAX_RANK)
            regs = tl.zeros([_MAX_RANK], dtype=tl.float32)  # reg[0..MAX_RANK)
            g = tl.full([], 1.0, tl.float32)  # the gate register
            for k in range(K):
                p = p_ptr + (s * K + k) * _NPARAMS
                alpha = tl.load(p + _ALPHA)
                beta = tl.load(p + _BETA)
                lo = tl.load(p + _LO)
                kind = tl.load(p + _KIND)
                index = tl.load(p + _INDEX).to(tl.int64)
                f = tl.where(tl.load(p + _GATED) == 1.0, g, 1.0)
                phase = tl.load(p + _PHASE)
                phase_ok = (phase == _PHASE_ALL) | ((phase == _PHASE_PROMPT) & (gen == 0)) | (
                    (phase == _PHASE_GENERATED) & (gen != 0)
                )
                admitted = (tl.load(p + _START) <= posf) & (posf < tl.load(p + _END)) & phase_ok
                reg_ok = (index >= 0) & (index < _MAX_RANK)
                vk = v_ptr + (s * K + k) * H + offs
                if kind == _KIND_GATE:
                    if admitted & (index >= 0):  # row gate; 0 past the last one
                        g = tl.load(g_ptr + row * G + index, mask=index < G, other=0.0).to(tl.float32)
                    elif admitted:  # token gate on <u, v> (beta = 1: the cosine)
                        score = tl.sum(u * tl.load(vk, mask=mask, other=0.0), axis=0)
                        if beta == 1.0:
                            score = score / tl.maximum(tl.sqrt(tl.sum(u * u, axis=0)), 1e-30)
                        hard = tl.abs(alpha) == _INF
                        soft = tl.sigmoid((score - lo) * tl.where(hard, 0.0, alpha))
                        g = tl.where(hard, tl.where(score > lo, 1.0, 0.0), soft)
                    else:
                        g = g * 0.0
                elif admitted & (kind == _KIND_PROJECT) & ((alpha != 0.0) | (beta != 0.0)):
                    v = tl.load(vk, mask=mask, other=0.0)
                    proj = tl.sum(u * v, axis=0)
                    clamped = tl.minimum(tl.maximum(proj, lo), tl.load(p + _HI))
                    u = u + f * (alpha + beta * (clamped - proj)) * v
                elif admitted & (kind == _KIND_SCALE):
                    u = u + f * alpha * tl.load(vk, mask=mask, other=0.0) * u
                elif admitted & (kind == _KIND_READ) & reg_ok:
                    proj = tl.sum(u * tl.load(vk, mask=mask, other=0.0), axis=0)
                    regs = tl.where(ranks == index, proj, regs)
                elif admitted & (kind == _KIND_WRITE) & reg_ok:
                    reg = tl.sum(tl.where(ranks == index, regs, 0.0), axis=0)
                    u = u + f * alpha * (reg - lo) * tl.load(vk, mask=mask, other=0.0)
    if HAS_DELTA:
        u = x + u
    r = u.to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + base + offs, r, mask=mask)
    if HAS_WEIGHT:
        rf = r.to(tl.float32)
        inv = tl.rsqrt(tl.sum(rf * rf, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + weight_offset
        tl.store(o_ptr + base + offs, (rf * inv * w).to(o_ptr.dtype.element_ty), mask=mask)


def fused_steer_triton(x, delta, vecs, params, slot, pos, gen, weight, eps, weight_offset, gates=None):
    """Same signature and results as ``torch.ops.splice.fused_steer``; returns ``(r, out)``."""
    check_fused_steer(x, delta, vecs, params, slot, pos, gen, weight, gates)
    check_steer_slots(slot, vecs)
    return _launch(x, delta, vecs, params, slot, pos, gen, weight, eps, weight_offset, gates)


def _launch(x, delta, vecs, params, slot, pos, gen, weight, eps, weight_offset, gates=None):
    """Run the kernel on checked arguments (slot values unchecked: the kernel guards them)."""
    t, h = x.shape
    x = x.contiguous()
    r = torch.empty_like(x)
    out = torch.empty_like(x) if weight is not None else x.new_empty(0)
    if t == 0 or h == 0:
        return r, out
    has_vecs = vecs is not None
    has_rows = has_vecs and vecs.numel() > 0
    block = triton.next_power_of_2(h)
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        _fused_steer_kernel[(t,)](
            x,
            delta.contiguous() if delta is not None else x,
            vecs.contiguous() if has_rows else x,
            params.contiguous() if has_rows else x,
            slot.contiguous(),
            pos.contiguous(),
            gen.contiguous().view(torch.uint8),
            weight.contiguous() if weight is not None else x,
            gates.contiguous() if gates is not None and gates.numel() > 0 else x,
            r,
            out if weight is not None else r,
            h,
            vecs.shape[1] if has_vecs else 0,
            vecs.shape[0] if has_vecs else 0,
            gates.shape[1] if gates is not None else 0,
            float(eps),
            float(weight_offset),
            HAS_DELTA=delta is not None,
            HAS_VECS=has_vecs,
            HAS_WEIGHT=weight is not None,
            BLOCK=block,
            num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
        )
    return r, out
