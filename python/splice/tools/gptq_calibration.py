"""``gptq_quantize_model(model, plan, windows)``: GPTQ a whole model, layer by layer, on calibration windows.

As in GPTQ's reference code, the model runs one decoder layer at a time. The first layer's inputs
(hidden states and the keyword arguments the model passes its layers) are recorded on every chunk of
``windows``; then, for each layer and each of its quantization units in order (q/k/v, o, gate/up,
down: units of a fused matmul share one input and so one Hessian), the layer runs over the chunks
with the units before it already quantized, the unit's input Hessian ``2 XᵀX / n`` is accumulated
(:class:`splice.quant.gptq.Hessian`; the pass stops at the unit), and each member is quantized by
:func:`splice.quant.gptq.gptq_quantize` at the plan's width and group size. The quantized layer's
outputs are the next layer's inputs ("sequential" in the paper's terms). The ``lm_head``, when
planned, is quantized last with the Hessian of the final norm's outputs.

Memory: one layer's inputs and outputs over all windows (``2 · tokens · hidden`` floats, streamed
chunk by chunk through the layer) and one Hessian at a time, whatever the number of layers.

Errors before effects: while calibrating, quantized units run with their dequantized weights swapped
in as new Parameters (never written in place); they are swapped back whatever happens, and the
:class:`~splice.quant.linear.QuantLinear` replacements are installed only after every module
succeeded, so a failure leaves the model as it was. Modules planned at 16 bits stay dense.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..ops.quant_packing import PackedWeight
from ..quant.apply import QuantReport, set_module
from ..quant.gptq import GPTQSettings, Hessian
from ..quant.linear import QuantLinear
from ..quant.plan import DENSE, QuantPlan, quantizable, unit_of
from ..runtime.splice_runtime import ATTRIBUTE

HEAD = "lm_head"


@dataclass(frozen=True)
class GPTQReport:
    """The quantization report plus calibration tokens, wall seconds and the process's peak resident memory."""

    quant: QuantReport
    tokens: int
    seconds: float
    peak_rss_mib: float
    buffered_mib: float

    def __str__(self) -> str:
        return (f"{self.quant}\nGPTQ calibration on {self.tokens} tokens: {self.seconds:.1f} s; buffered layer "
                f"inputs/outputs {self.buffered_mib:.1f} MiB; process peak RSS {self.peak_rss_mib:.0f} MiB")


class _Stop(Exception):
    """Ends a layer's forward pass once the unit being calibrated has seen its input."""


def _layer_units(plan: QuantPlan, names: list[str], prefix: str) -> list[list[str]]:
    """The planned (below 16 bits) modules of one decoder layer, grouped by unit, in model order (``names``)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(prefix) and name in plan.entries and plan.entries[name].bits != DENSE:
            grouped.setdefault(unit_of(name), []).append(name)
    return list(grouped.values())


def _layer_prefix(model: nn.Module) -> str:
    """The module-name prefix of decoder layer ``i`` without ``i`` (``"model.layers."``)."""
    return ("model." if getattr(model, "model", model) is not model else "") + "layers."


def _check(model: nn.Module, plan: QuantPlan, windows: torch.Tensor, adapter: Adapter) -> None:
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is patched by splice; remove the patch, quantize, then patch again")
    plan.validate_for(model)
    if windows.dim() != 2 or windows.numel() == 0 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"windows must be non-empty [count, length] token ids, got {list(windows.shape)} "
                         f"{windows.dtype}")
    mods = quantizable(model)
    prefixes = tuple(f"{_layer_prefix(model)}{i}." for i in range(adapter.num_layers))
    for name, e in plan.entries.items():
        if e.bits == DENSE:
            continue
        if not isinstance(mods[name], nn.Linear):
            raise ValueError(f"{name} is already quantized")
        if name != HEAD and not name.startswith(prefixes):
            raise ValueError(f"{name}: GPTQ calibrates the decoder layers' Linears and lm_head only")
        if windows.numel() < e.shape[1]:
            raise ValueError(f"{name}: too few calibration tokens ({windows.numel()}) for its {e.shape[1]} inputs "
                             "(its Hessian needs at least as many tokens as inputs); use more or longer windows")


def _record_first_inputs(model, layer0, windows, batch_size):
    """Layer 0's hidden-state input and keyword arguments on every chunk of ``windows``."""
    recorded = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        recorded.append((hidden.detach().clone(), dict(kwargs)))
        raise _Stop

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in windows.split(batch_size):
            try:
                model(input_ids=chunk, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return [r[0] for r in recorded], [r[1] for r in recorded]


def _run(layer, inputs, kwargs) -> list[torch.Tensor]:
    out = []
    for hidden, kw in zip(inputs, kwargs):
        y = layer(hidden, **kw)
        out.append((y[0] if isinstance(y, tuple) else y).detach())
    return out


def _hessian_of(layer, module: nn.Linear, inputs, kwargs) -> Hessian:
    """The Hessian of ``module``'s inputs while ``layer`` runs over the recorded chunks."""
    hessian = Hessian(module.in_features)

    def grab(mod, args):
        hessian.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    try:
        for hidden, kw in zip(inputs, kwargs):
            try:
                layer(hidden, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hessian


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, plan: QuantPlan, windows: torch.Tensor,
                        settings: GPTQSettings = GPTQSettings(), *, batch_size: int = 8,
                        progress: bool = True) -> GPTQReport:
    """Quantize every module of ``plan`` below 16 bits with GPTQ (``settings``) calibrated on ``windows``
    [count, length], in place."""
    adapter = Adapter(model)
    _check(model, plan, windows, adapter)
    start = time.perf_counter()
    mods = quantizable(model)
    replacements: dict[str, QuantLinear] = {}
    swapped: dict[str, nn.Parameter] = {}

    def quantize_unit(names: list[str], hessian: Hessian) -> None:
        for name in names:
            m, e = mods[name], plan.entries[name]
            try:
                h = hessian.matrix()
                q = settings.quantize(m.weight, h, e.bits, e.group_size)
            except (ValueError, RuntimeError) as exc:
                raise type(exc)(f"GPTQ of {name} ({e.bits}-bit, group {e.group_size}) failed (the model is "
                                f"unchanged): {exc}") from exc
            packed = PackedWeight.from_quantized(q)
            replacements[name] = QuantLinear(packed, m.bias).to(m.weight.device)
            swapped[name] = m.weight
            m.weight = nn.Parameter(packed.dequantize().to(m.weight.dtype), requires_grad=False)

    prefix = _layer_prefix(model)
    buffered = 0.0
    try:
        inputs, kwargs = _record_first_inputs(model, adapter.layers[0], windows, batch_size)
        for idx in tqdm(range(adapter.num_layers), desc="GPTQ", unit="layer", disable=not progress):
            layer = adapter.layers[idx]
            for names in _layer_units(plan, list(mods), f"{prefix}{idx}."):
                quantize_unit(names, _hessian_of(layer, mods[names[0]], inputs, kwargs))
            outputs = _run(layer, inputs, kwargs)
            buffered = max(buffered, 2 * sum(t.numel() * t.element_size() for t in inputs) / 2**20)
            inputs = outputs
        if HEAD in plan.entries and plan.entries[HEAD].bits != DENSE:
            hessian = Hessian(mods[HEAD].in_features)
            for hidden in inputs:
                hessian.add(getattr(model, "model", model).norm(hidden))
            quantize_unit([HEAD], hessian)
    finally:
        for name, weight in swapped.items():
            mods[name].weight = weight
    before = after = 0
    for name, m in mods.items():
        if name in plan.entries:
            before += m.weight.numel() * m.weight.element_size()
            after += replacements[name].nbytes if name in replacements else m.weight.numel() * m.weight.element_size()
    for name, q in replacements.items():
        set_module(model, name, q)
    seconds = time.perf_counter() - start
    report = QuantReport(len(plan.entries), len(replacements), before, after, plan.bits_per_weight())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return GPTQReport(report, int(windows.numel()), seconds, peak, buffered)
