"""Plain-PyTorch fp32 reference for ``splice::quant_matmul``; every backend is tested against it.

Contract (``T`` tokens, ``N = out_features``, ``K = in_features``, ``G = ceil(K / group_size)``)::

    x        [T, K]  float32 or bfloat16
    qweight  uint8 [N, ceil(K / 64) · 64 · bits / 8]   codes q, layout in splice.ops.quant_packing
    scales, zeros   float16 [N, G]
    bias     optional float [N]

    W[n, k] = (q[n, k] − zeros[n, k // group_size]) · scales[n, k // group_size]     (fp32)
    y       = x @ W^T (+ bias), computed in fp32 and rounded once to x.dtype
"""

from __future__ import annotations

import torch

from splice.ops.quant_packing import unpack_codes
from splice.ops.quant_format import dequantize_codes


def quant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ dequantize(W)^T (+ bias)`` in fp32, returned in ``x.dtype``; see the module docstring."""
    w = dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros, group_size)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
