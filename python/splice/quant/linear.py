"""``QuantLinear``: an ``nn.Linear`` replacement that keeps only the packed weight (no dense copy).

``forward(x)`` flattens ``x`` [..., in_features] to [T, in_features], runs ``splice::quant_matmul``
(``x @ ((q − z) · s)^T + bias``, computed in fp32, returned in ``x.dtype``) and restores the leading
dimensions. With ``activations = "int8"`` it runs ``splice::quant_matmul_a8`` instead, which multiplies
the int8 block quantization ``x̂`` of ``x`` (llama.cpp's Q8_0) with int8 dot products where the CPU has
them. The setting is a runtime choice of this module object: checkpoints and the vLLM export carry the
weights only. Inference only: no gradient flows through it. The dense weight cannot be recovered
exactly: :meth:`dequantize` gives its quantized value.
"""

from __future__ import annotations

import torch
from torch import nn

from splice.ops.quant_matmul import quant_matmul
from splice.ops.quant_matmul_a8 import quant_matmul_a8

from ..ops.quant_packing import PackedWeight
from .quantizers import quantize


ACTIVATIONS = {"float": quant_matmul, "int8": quant_matmul_a8}


class QuantLinear(nn.Module):
    """A linear layer on a :class:`~splice.ops.quant_packing.PackedWeight`; buffers qweight/scales/zeros/bias.

    ``activations``: ``"float"`` (x as given) or ``"int8"`` (x quantized to int8 blocks of 32)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.bits, self.group_size = packed.bits, packed.group_size
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self.activations = "float"

    @property
    def activations(self) -> str:
        return self._activations

    @activations.setter
    def activations(self, kind: str) -> None:
        if kind not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
        self._activations, self._matmul = kind, ACTIVATIONS[kind]

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, method: str = "hqq") -> QuantLinear:
        """Quantize ``linear.weight`` with ``method`` (see :func:`splice.quant.quantizers.quantize`)."""
        return cls.from_weight(linear.weight, bits, group_size, method, bias=linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int, method: str = "hqq",
                    bias: torch.Tensor | None = None) -> QuantLinear:
        with torch.no_grad():
            return cls(PackedWeight.from_quantized(quantize(weight.detach(), bits, group_size, method)), bias)

    def _apply(self, fn, recurse=True):
        """Follow device moves, but keep the packed format's dtypes when the model is cast
        (``model.to(torch.bfloat16)`` casts the activations, not the codes, scales or zero points)."""
        dtypes = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                            (self.out_features, self.in_features))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this layer multiplies by, ``(q − z) · s`` [out_features, in_features]."""
        return self.packed().dequantize()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (codes, scales, zero points), without the bias."""
        return self.packed().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        with torch.no_grad():  # inference only: packed weights have no gradient and the op no backward
            y = self._matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.bias,
                             self.bits, self.group_size, self.out_features, self.in_features)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, activations={self.activations}")
