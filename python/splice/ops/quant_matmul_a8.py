"""``splice::quant_matmul_a8``: x̂ @ W^T for a packed W and the int8 block quantization x̂ of x.

The same arguments and packed format as ``splice::quant_matmul``; the activations are first
quantized to int8 in blocks of 32 (:mod:`splice.ops.act_quant`, llama.cpp's Q8_0), so that CPU
kernels can multiply int8 activations with the integer codes (AVX-512 VNNI's ``vpdpbusd``, 64
multiply-adds per instruction) and scale each block's integer sum once::

    y = Σ_b s_g d_b (q_b · x8_b) − Σ_b s_g z_g d_b Σ x8_b      (+ bias)

which is ``x̂ @ ((q − z) · s)^T``. ``splice.ops.library.int8_dot_products()`` says whether the CPU kernel was
built with them; without, it multiplies ``x̂`` with quant_matmul's float kernel (same result up to
fp32 rounding). On CUDA the Triton and CUDA backends quantize ``x`` and run quant_matmul's kernels
(GPU decode is bound by weight reads; int8 activations change no byte read there).
"""

from __future__ import annotations

import torch

from . import library
from .act_quant import dequantize_activations
from .quant_matmul_reference import check_quant_matmul, quant_matmul_reference

SCHEMA = (
    "quant_matmul_a8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
    "int group_size, int out_features, int in_features) -> Tensor"
)


def quant_matmul_a8_reference(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features):
    """``x̂ @ dequantize(W)^T (+ bias)`` in fp32, returned in ``x.dtype``."""
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    y = quant_matmul_reference(dequantize_activations(x), qweight, scales, zeros, bias, bits, group_size,
                               out_features, in_features)
    return y.to(x.dtype)


def _fake(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features):
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    return x.new_empty((x.shape[0], out_features))


SPEC = library.define(SCHEMA, quant_matmul_a8_reference, _fake, triton="quant_matmul_a8:quant_matmul_a8_triton")


def quant_matmul_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: torch.Tensor | None, bits: int, group_size: int, out_features: int,
                    in_features: int) -> torch.Tensor:
    """``y`` [T, out_features] in ``x.dtype`` for ``x`` [T, in_features]; see the module docstring."""
    return library.call(SPEC, x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
