"""The quantized weight format: widths, group sizes, codes with per-group scales and zero points.

A weight ``W`` [N, K] is cut along K into groups of ``group_size`` columns; each group has a float16
scale ``s`` and zero point ``z`` and each weight an integer code ``q`` in ``[0, 2**bits − 1]``, with
``w ≈ (q − z) · s``. The quantizers (:mod:`splice.quant.quantizers`) produce it; the packed layout
(:mod:`splice.ops.quant_packing`) and the kernels read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantized:
    """Codes ``q`` uint8 [N, K] and float16 ``scales`` / ``zeros`` [N, ceil(K / group_size)]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int


def check_bits_group(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 ``(q − z) · s`` [N, K] from codes [N, K] and per-group scales / zeros [N, G]."""
    k = codes.shape[1]
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.to(torch.float32) - z) * s
