"""What the layer-by-layer calibrations (GPTQ, SliderQuant) share: checks, recorded layer inputs, the report.

Both run the model one decoder layer (or one window of layers) at a time on recorded hidden states:
:func:`record_first_inputs` catches layer 0's inputs (hidden states and the keyword arguments the
model passes its layers: position embeddings, masks) on every chunk of the calibration windows, and
:func:`run_layers` carries them through layers. :func:`install` swaps the packed replacements in only
after every module succeeded, so a failure leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.architecture import Adapter
from ..quant.apply import QuantReport, set_module
from ..quant.linear import QuantLinear
from ..quant.plan import DENSE, QuantPlan, quantizable, unit_of
from ..runtime.splice_runtime import ATTRIBUTE

HEAD = "lm_head"


@dataclass(frozen=True)
class CalibrationReport:
    """The quantization report plus calibration tokens, wall seconds and the process's peak resident memory."""

    method: str
    quant: QuantReport
    tokens: int
    seconds: float
    peak_rss_mib: float
    buffered_mib: float

    def __str__(self) -> str:
        return (f"{self.quant}\n{self.method} calibration on {self.tokens} tokens: {self.seconds:.1f} s; buffered "
                f"layer inputs/outputs {self.buffered_mib:.1f} MiB; process peak RSS {self.peak_rss_mib:.0f} MiB")


class Stop(Exception):
    """Ends a forward pass once the module of interest has seen its input."""


def layer_prefix(model: nn.Module) -> str:
    """The module-name prefix of decoder layer ``i`` without ``i`` (``"model.layers."``)."""
    return ("model." if getattr(model, "model", model) is not model else "") + "layers."


def layer_units(plan: QuantPlan, names: list[str], prefix: str) -> list[list[str]]:
    """The planned (below 16 bits) modules under ``prefix``, grouped by unit, in model order (``names``)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(prefix) and name in plan.entries and plan.entries[name].bits != DENSE:
            grouped.setdefault(unit_of(name), []).append(name)
    return list(grouped.values())


def check_calibration(model: nn.Module, plan: QuantPlan, windows: torch.Tensor, adapter: Adapter,
                      method: str) -> None:
    """The plan fits the model, names only decoder-layer Linears and ``lm_head``, and ``windows`` are token ids
    with at least as many tokens as any planned module has inputs (a Hessian of full rank needs them)."""
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is patched by splice; remove the patch, quantize, then patch again")
    plan.validate_for(model)
    if windows.dim() != 2 or windows.numel() == 0 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"windows must be non-empty [count, length] token ids, got {list(windows.shape)} "
                         f"{windows.dtype}")
    mods = quantizable(model)
    prefixes = tuple(f"{layer_prefix(model)}{i}." for i in range(adapter.num_layers))
    for name, e in plan.entries.items():
        if e.bits == DENSE:
            continue
        if not isinstance(mods[name], nn.Linear):
            raise ValueError(f"{name} is already quantized")
        if name != HEAD and not name.startswith(prefixes):
            raise ValueError(f"{name}: {method} calibrates the decoder layers' Linears and lm_head only")
        if windows.numel() < e.shape[1]:
            raise ValueError(f"{name}: too few calibration tokens ({windows.numel()}) for its {e.shape[1]} inputs "
                             "(its Hessian needs at least as many tokens as inputs); use more or longer windows")


def record_first_inputs(model, layer0, windows, batch_size):
    """Layer 0's hidden-state input and keyword arguments on every chunk of ``windows``."""
    recorded = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        recorded.append((hidden.detach().clone(), dict(kwargs)))
        raise Stop

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in windows.split(batch_size):
            with contextlib.suppress(Stop):
                model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    return [r[0] for r in recorded], [r[1] for r in recorded]


def run_layers(layers, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``hidden`` through ``layers`` in order (one chunk)."""
    for layer in layers:
        y = layer(hidden, **kwargs)
        hidden = y[0] if isinstance(y, tuple) else y
    return hidden


def buffered_mib(*chunk_lists: list[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for chunks in chunk_lists for t in chunks) / 2**20


def install(model: nn.Module, plan: QuantPlan, replacements: dict[str, QuantLinear]) -> QuantReport:
    """Swap ``replacements`` into ``model``; the report counts planned weight bytes before and after."""
    mods = quantizable(model)
    before = after = 0
    for name, m in mods.items():
        if name in plan.entries:
            dense = m.weight.numel() * m.weight.element_size()
            before += dense
            after += replacements[name].nbytes if name in replacements else dense
    for name, q in replacements.items():
        set_module(model, name, q)
    return QuantReport(len(plan.entries), len(replacements), before, after, plan.bits_per_weight())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
