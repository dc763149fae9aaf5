"""``quantize_model(model, plan)``: replace every planned ``nn.Linear`` by a :class:`QuantLinear`.

All replacements are built first and swapped in only after every one succeeded, so a failed
quantization (a bad plan, a non-finite weight, ...) leaves the model untouched.

What cannot be undone: a replaced module's dense weight is dropped (the QuantLinear holds only
the packed codes, scales and zero points; ``dequantize()`` gives the quantized value, not the
original). Modules planned at 16 bits are left as they are.

Tied ``lm_head``: ``model.lm_head`` becomes a QuantLinear built from the shared matrix, and the
embedding table stays dense (a lookup reads only a few rows, so quantizing it saves memory but no
time); the two are no longer tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.splice_runtime import ATTRIBUTE
from .linear import QuantLinear
from .plan import DENSE, QuantPlan, quantizable


@dataclass(frozen=True)
class QuantReport:
    """Weight bytes of the planned modules before (dense) and after (packed, padding included)."""

    modules: int
    quantized: int
    bytes_before: int
    bytes_after: int
    bits_per_weight: float

    def __str__(self) -> str:
        return (f"{self.quantized} of {self.modules} planned modules quantized; "
                f"weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB; {self.bits_per_weight:.3f} bits/weight "
                "(scales and zero points included)")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, plan: QuantPlan, method: str = "hqq") -> QuantReport:
    """Quantize every module of ``plan`` below 16 bits with ``method`` (rtn, rtn_sym, rtn_int, hqq), in place."""
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is patched by splice; remove the patch, quantize, then patch again")
    plan.validate_for(model)
    mods = quantizable(model)
    done = [n for n, e in plan.entries.items() if e.bits != DENSE and isinstance(mods[n], QuantLinear)]
    if done:
        raise ValueError(f"modules {done[:3]} are already quantized")
    replacements = {}
    before = after = 0
    for name, e in plan.entries.items():
        m = mods[name]
        dense = m.weight.numel() * m.weight.element_size()
        before += dense
        if e.bits == DENSE:
            after += dense
            continue
        try:
            q = QuantLinear.from_linear(m, e.bits, e.group_size, method)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"quantizing {name} to {e.bits} bits failed (the model is unchanged): {exc}") from exc
        replacements[name] = q.to(m.weight.device)
        after += q.nbytes
    with torch.no_grad():
        for name, q in replacements.items():
            set_module(model, name, q)
    return QuantReport(len(plan.entries), len(replacements), before, after, plan.bits_per_weight())
