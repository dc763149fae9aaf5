"""Triton backend of ``splice::quant_matmul_a8``: quantize ``x`` to int8 blocks and back (one program per
token and 32-value block), then quant_matmul's Triton kernel on ``x̂`` in fp32.

The codes are those of :mod:`splice.ops.act_quant`: ``d = max|x| / 127`` and ``round_half_even(x · (127 /
max|x|))``, with IEEE-rounded division (``div_rn``) and the round-half-even of adding and subtracting
1.5 · 2^23 (exact for |v| ≤ 127; compiled without FMA contraction, so the product is rounded
first, as in the reference). Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops.quant_matmul_reference import check_quant_matmul

from .quant_matmul import quant_matmul_triton

_ROUNDER = tl.constexpr(12582912.0)  # 1.5 · 2^23: v + R − R rounds v half to even in fp32


@triton.jit
def _act_quant_kernel(x_ptr, xq_ptr, K, BLOCKS):
    token = tl.program_id(0) // BLOCKS
    i = (tl.program_id(0) % BLOCKS) * 32 + tl.arange(0, 32)
    mask = i < K
    offs = token.to(tl.int64) * K + i
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=0)
    safe = tl.where(amax > 0, amax, 1.0)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, safe), 0.0)
    code = (v * inv + _ROUNDER) - _ROUNDER
    tl.store(xq_ptr + offs, code * tl.math.div_rn(amax, 127.0), mask=mask)


def quantize_dequantize_triton(x: torch.Tensor) -> torch.Tensor:
    """``x̂`` [T, K] fp32 of ``x`` [T, K] (``splice.ops.act_quant.dequantize_activations``)."""
    x = x.contiguous()
    t, k = x.shape
    xq = torch.empty((t, k), dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(k, 32)
    if t * blocks:
        device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
        with device:
            _act_quant_kernel[(t * blocks,)](x, xq, k, blocks, enable_fp_fusion=False)
    return xq


def quant_matmul_a8_triton(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features):
    """Same signature and result as ``torch.ops.splice.quant_matmul_a8``."""
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    y = quant_matmul_triton(quantize_dequantize_triton(x), qweight, scales, zeros, bias, bits, group_size,
                            out_features, in_features)
    return y.to(x.dtype)
