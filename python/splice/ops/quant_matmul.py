"""``splice::quant_matmul``: x @ W^T for a group-quantized, packed W (math in quant_matmul_reference)."""

from __future__ import annotations

import torch

from . import library
from .quant_matmul_reference import check_quant_matmul, quant_matmul_reference

SCHEMA = (
    "quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, int group_size, "
    "int out_features, int in_features) -> Tensor"
)


def _fake(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features):
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    return x.new_empty((x.shape[0], out_features))


SPEC = library.define(SCHEMA, quant_matmul_reference, _fake, triton="quant_matmul:quant_matmul_triton")


def quant_matmul(
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
    """``y`` [T, out_features] in ``x.dtype`` for ``x`` [T, in_features]; see quant_matmul_reference."""
    return library.call(SPEC, x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
