"""Activations quantized to int8 in blocks of 32: the ``x̂`` that ``splice::quant_matmul_a8`` multiplies.

For each row of ``x`` [T, K] and each block ``b`` of 32 consecutive values (the last one shorter)::

    d_b  = max|x_b| / 127
    x8_b = round_half_even(x_b · (127 / max|x_b|))  ∈ [−127, 127]     (d_b = 0, x8_b = 0 if x_b = 0)
    x̂_b  = d_b · x8_b

in fp32, the operations in this order (the C++ kernels, csrc/cpu/act_quant.h, compute the same codes
bit for bit). This is llama.cpp's Q8_0 activation format; the error per value is at most d_b / 2.
"""

from __future__ import annotations

import torch

BLOCK = 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, d)``: int8 codes [T, K] and fp32 block scales [T, ceil(K / 32)] of ``x`` [T, K]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, features], got {list(x.shape)}")
    tokens, k = x.shape
    blocks = -(-k // BLOCK)
    xb = torch.nn.functional.pad(x.to(torch.float32), (0, blocks * BLOCK - k)).view(tokens, blocks, BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    x8 = torch.round(xb * inv).to(torch.int8).view(tokens, blocks * BLOCK)[:, :k]
    return x8, (amax / 127.0).squeeze(-1)


def dequantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x̂`` [T, K] fp32: ``x`` through its int8 block codes and back."""
    x8, d = quantize_activations(x)
    return x8.to(torch.float32) * d.repeat_interleave(BLOCK, dim=1)[:, : x.shape[1]]
