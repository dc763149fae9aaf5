"""Triton kernel of ``splice::quant_matmul``: dequantize packed codes in registers, then ``tl.dot``.

The contract is :func:`splice.ops.quant_matmul_reference.quant_matmul_reference` (fp32 math, ``y``
rounded once to ``x.dtype``); the packed layout is :mod:`splice.ops.quant_packing`. One program computes a
``BLOCK_T × BLOCK_N`` tile of ``y``, walking K in steps of ``BLOCK_K``. Arguments are checked as the
reference checks them (:func:`splice.ops.quant_matmul_reference.check_quant_matmul`). Runs on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops.quant_matmul_reference import check_quant_matmul
from splice.ops.quant_packing import padded_k


@triton.jit
def _code(row_ptr, k, mask, KP, BITS: tl.constexpr):
    """Codes ``k`` [1, BLOCK_K] of the packed rows at ``row_ptr`` [BLOCK_N, 1] (0 where not ``mask``)."""
    if BITS == 8:
        return tl.load(row_ptr + k, mask=mask, other=0).to(tl.int32)
    if BITS == 4:
        byte = tl.load(row_ptr + (k // 32) * 16 + k % 16, mask=mask, other=0).to(tl.int32)
        return (byte >> (4 * ((k // 16) % 2))) & 15
    byte = tl.load(row_ptr + (k // 64) * 16 + k % 16, mask=mask, other=0).to(tl.int32)
    low = (byte >> (2 * ((k // 16) % 4))) & 3
    if BITS == 2:
        return low
    high = tl.load(row_ptr + KP // 4 + k // 8, mask=mask, other=0).to(tl.int32)
    return low | (((high >> (k % 8)) & 1) << 2)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    T, N, K, KP, ROW_BYTES, GROUPS,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    rows = q_ptr + offs_n.to(tl.int64)[:, None] * ROW_BYTES
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * K + k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        code = _code(rows, k[None, :], wmask, KP, BITS)
        g = offs_n.to(tl.int64)[:, None] * GROUPS + (k // GROUP)[None, :]
        s = tl.load(s_ptr + g, mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=wmask, other=0.0).to(tl.float32)
        w = tl.where(wmask, (code.to(tl.float32) - z) * s, 0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


def quant_matmul_triton(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features):
    """Same signature and result as ``torch.ops.splice.quant_matmul``."""
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    t = x.shape[0]
    x = x.contiguous()
    y = x.new_empty((t, out_features))
    if t == 0:
        return y
    block_t = 16 if t <= 16 else 32
    block_n, block_k = 32, 64
    grid = (triton.cdiv(t, block_t), triton.cdiv(out_features, block_n))
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        _quant_matmul_kernel[grid](
            x, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
            bias.to(torch.float32).contiguous() if bias is not None else x, y,
            t, out_features, in_features, padded_k(in_features), qweight.shape[1], scales.shape[1],
            BITS=bits, GROUP=group_size, HAS_BIAS=bias is not None,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return y
