"""Which activations the quantized linears of a model multiply: ``"float"`` (as given) or ``"int8"``
(quantized to int8 blocks of 32, llama.cpp's Q8_0, multiplied with int8 dot products where the CPU
has them; see :mod:`splice.ops.quant_matmul_a8`)."""

from __future__ import annotations

from torch import nn

from .linear import ACTIVATIONS, QuantLinear


def set_quant_activations(model: nn.Module, kind: str) -> int:
    """Set ``kind`` on every :class:`QuantLinear` of ``model`` and return how many there are.

    Raises ``ValueError``, with the model unchanged, for an unknown kind or a model without quantized
    linears. The setting lives on the module objects only: checkpoints and exports do not record it."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no quantized linears (QuantLinear); quantize it first")
    for m in layers:
        m.activations = kind
    return len(layers)
