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

import contextlib
import time

import torch
from torch import nn
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..ops.quant_format import Quantized, dequantize_codes
from ..ops.quant_packing import PackedWeight
from ..quant.gptq import GPTQSettings, Hessian
from ..quant.linear import QuantLinear
from ..quant.plan import DENSE, QuantPlan, quantizable
from .layerwise_calibration import (HEAD, CalibrationReport, Stop, buffered_mib, check_calibration, install,
                                    layer_prefix, layer_units, peak_rss_mib, record_first_inputs, run_layers)


def _hessian_of(layer, module: nn.Linear, inputs, kwargs) -> Hessian:
    """The Hessian of ``module``'s inputs while ``layer`` runs over the recorded chunks."""
    hessian = Hessian(module.in_features)

    def grab(mod, args):
        hessian.add(args[0])
        raise Stop

    handle = module.register_forward_pre_hook(grab)
    try:
        for hidden, kw in zip(inputs, kwargs):
            with contextlib.suppress(Stop):
                layer(hidden, **kw)
    finally:
        handle.remove()
    return hessian


def head_hessian(model: nn.Module, final_hidden: list[torch.Tensor]) -> Hessian:
    """The Hessian of ``lm_head``'s inputs: the final norm of the last decoder layer's outputs."""
    hessian = Hessian(quantizable(model)[HEAD].in_features)
    for hidden in final_hidden:
        hessian.add(getattr(model, "model", model).norm(hidden))
    return hessian


def gptq_solution(name: str, module: nn.Linear, bits: int, group_size: int, hessian: Hessian,
                  settings: GPTQSettings) -> tuple[Quantized, torch.Tensor]:
    """``module`` GPTQ-quantized with ``hessian`` and its compensated weight (:func:`gptq_compensated`);
    errors name the module."""
    try:
        return settings.compensated(module.weight, hessian.matrix(), bits, group_size)
    except (ValueError, RuntimeError) as exc:
        raise type(exc)(f"GPTQ of {name} ({bits}-bit, group {group_size}) failed (the model is unchanged): "
                        f"{exc}") from exc


def gptq_replacement(name: str, module: nn.Linear, bits: int, group_size: int, hessian: Hessian,
                     settings: GPTQSettings) -> QuantLinear:
    """``module`` GPTQ-quantized with ``hessian`` as a :class:`QuantLinear`."""
    q = gptq_solution(name, module, bits, group_size, hessian, settings)[0]
    return QuantLinear(PackedWeight.from_quantized(q), module.bias).to(module.weight.device)


@torch.no_grad()
def gptq_layers(model: nn.Module, plan: QuantPlan, inputs: list[torch.Tensor], kwargs: list[dict],
                settings: GPTQSettings, progress: bool = True) -> tuple[dict, list[torch.Tensor], float]:
    """GPTQ every planned decoder-layer module, layer by layer from layer 0's recorded ``inputs``: returns
    ``{name: (Quantized, compensated weight)}``, the last layer's outputs and the buffered MiB. The model is
    left as it was (quantized weights are swapped in as new Parameters while later layers calibrate)."""
    adapter = Adapter(model)
    mods = quantizable(model)
    solutions: dict[str, tuple[Quantized, torch.Tensor]] = {}
    swapped: dict[str, nn.Parameter] = {}
    prefix = layer_prefix(model)
    buffered = 0.0
    try:
        for idx in tqdm(range(adapter.num_layers), desc="GPTQ", unit="layer", disable=not progress):
            layer = adapter.layers[idx]
            for names in layer_units(plan, list(mods), f"{prefix}{idx}."):
                hessian = _hessian_of(layer, mods[names[0]], inputs, kwargs)
                for name in names:
                    m, e = mods[name], plan.entries[name]
                    solutions[name] = gptq_solution(name, m, e.bits, e.group_size, hessian, settings)
                    swapped[name] = m.weight
                    q = solutions[name][0]
                    deq = dequantize_codes(q.codes, q.scales, q.zeros, q.group_size)
                    m.weight = nn.Parameter(deq.to(m.weight.dtype), requires_grad=False)
            outputs = [run_layers([layer], h, kw).detach() for h, kw in zip(inputs, kwargs)]
            buffered = max(buffered, buffered_mib(inputs, outputs))
            inputs = outputs
    finally:
        for name, weight in swapped.items():
            mods[name].weight = weight
    return solutions, inputs, buffered


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, plan: QuantPlan, windows: torch.Tensor,
                        settings: GPTQSettings = GPTQSettings(), *, batch_size: int = 8,
                        progress: bool = True) -> CalibrationReport:
    """Quantize every module of ``plan`` below 16 bits with GPTQ (``settings``) calibrated on ``windows``
    [count, length], in place."""
    adapter = Adapter(model)
    check_calibration(model, plan, windows, adapter, "GPTQ")
    start = time.perf_counter()
    mods = quantizable(model)
    inputs, kwargs = record_first_inputs(model, adapter.layers[0], windows, batch_size)
    solutions, final, buffered = gptq_layers(model, plan, inputs, kwargs, settings, progress)
    replacements = {name: QuantLinear(PackedWeight.from_quantized(q), mods[name].bias).to(mods[name].weight.device)
                    for name, (q, _) in solutions.items()}
    if HEAD in plan.entries and plan.entries[HEAD].bits != DENSE:  # on the quantized layers' outputs
        e = plan.entries[HEAD]
        replacements[HEAD] = gptq_replacement(HEAD, mods[HEAD], e.bits, e.group_size, head_hessian(model, final),
                                              settings)
    report = install(model, plan, replacements)
    return CalibrationReport("GPTQ", report, int(windows.numel()), time.perf_counter() - start, peak_rss_mib(),
                             buffered)
