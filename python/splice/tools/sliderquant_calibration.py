"""``sliderquant_model(model, plan, windows)``: SliderQuant calibration, window of layers by window.

Each planned decoder-layer Linear becomes a :class:`~splice.quant.sliderquant.LearnableQuantLinear`
(learnable clipping and a rank-r LoRA) for the calibration. Two streams of hidden states start at
layer 0's recorded inputs: the full-precision model's and the quantized model's. For each rate
(``0.5`` then ``1``: the intra-layer sliding) and each window of :func:`window_schedule` (the
inter-layer sliding), the window's full-precision output on the full-precision stream is the target;
AdamW trains the window's clipping logits and LoRAs for ``epochs`` passes over the calibration
chunks (linear learning-rate decay to 0) on

    loss = MSE(window_quantized(h_quantized), window_full_precision(h_full_precision))

as the reference code's ``use_base_loss=last``. Then both streams advance past the layers the next
window no longer holds (the quantized stream through the quantized layers). Matmuls run in bfloat16
autocast (``settings.autocast``), as the reference code trains; the weights, clipping and LoRA stay fp32.

With ``settings.init == "gptq"`` a sequential GPTQ pass (:func:`~splice.tools.gptq_calibration.gptq_layers`)
runs first, and each quantizer starts from its GPTQ solution (splice's addition: SliderQuant on top
of GPTQ's error compensation). ``lm_head``, when planned, is GPTQ-quantized last (:mod:`splice.tools.gptq_calibration`) on the
quantized model's final hidden states: SliderQuant trains decoder layers only.

Memory: three streams of ``tokens · hidden`` floats (two inputs and the targets) and one window's
activations for the backward pass, whatever the number of layers; every Linear's learnable
parameters (``2 · N · G`` logits and ``r · (N + K)`` LoRA weights) and an fp32 copy of its weight (two
with a GPTQ start).

Errors before effects: the Linears are swapped back, and every parameter's ``requires_grad`` restored,
whatever happens; the packed replacements are installed only after every module succeeded.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..ops.quant_packing import PackedWeight
from ..quant.apply import set_module
from ..quant.gptq import GPTQSettings
from ..quant.linear import QuantLinear
from ..quant.plan import DENSE, QuantPlan, quantizable
from ..quant.sliderquant import LearnableQuantLinear, SliderQuantSettings, check_start, window_schedule
from .gptq_calibration import gptq_layers, gptq_replacement, head_hessian
from .layerwise_calibration import (HEAD, CalibrationReport, buffered_mib, check_calibration, install, layer_prefix,
                                    layer_units, peak_rss_mib, record_first_inputs, run_layers)


class _Streams:
    """The recorded chunks' keyword arguments and the two hidden-state streams of the calibration."""

    def __init__(self, inputs: list[torch.Tensor], kwargs: list[dict]):
        self.kwargs = kwargs
        self.full = [h.clone() for h in inputs]
        self.quantized = [h.clone() for h in inputs]

    def through(self, layers, hidden: list[torch.Tensor], wrappers, rate, autocast: bool) -> list[torch.Tensor]:
        for w in wrappers:
            w.rate = rate
        if not layers:
            return hidden
        with torch.no_grad(), _autocast(autocast):
            return [run_layers(layers, h, kw).detach() for h, kw in zip(hidden, self.kwargs)]


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _train_window(layers, wrappers, streams: _Streams, targets, rate: float, settings: SliderQuantSettings,
                  generator: torch.Generator, label: str) -> float:
    """Train the window's clipping and LoRA; returns the last epoch's mean loss."""
    for w in wrappers:
        w.rate = rate
    clipping = [p for w in wrappers for p in (w.upper, w.lower)]
    lora = [p for w in wrappers for p in (w.lora_a, w.lora_b)]
    optimizer = torch.optim.AdamW([{"params": clipping, "lr": settings.lwc_lr},
                                   {"params": lora, "lr": settings.lora_lr}], weight_decay=0.0)
    steps = settings.epochs * len(targets)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    mean = math.nan
    for _ in range(settings.epochs):
        total = 0.0
        for c in torch.randperm(len(targets), generator=generator).tolist():
            with torch.enable_grad(), _autocast(settings.autocast):
                out = run_layers(layers, streams.quantized[c], streams.kwargs[c])
                loss = F.mse_loss(out.float(), targets[c].float())
            if not math.isfinite(loss.item()):
                raise ValueError(f"SliderQuant's loss is not finite in window {label} (the model is unchanged); "
                                 "lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        mean = total / len(targets)
    return mean


def sliderquant_model(model: nn.Module, plan: QuantPlan, windows: torch.Tensor,
                      settings: SliderQuantSettings = SliderQuantSettings(), *, gptq: GPTQSettings = GPTQSettings(),
                      progress: bool = True) -> CalibrationReport:
    """Quantize every module of ``plan`` below 16 bits with SliderQuant (``settings``) calibrated on ``windows``
    [count, length], in place. GPTQ (``gptq``) quantizes a planned ``lm_head``, and every decoder Linear first
    when ``settings.init`` is ``gptq``."""
    adapter = Adapter(model)
    check_calibration(model, plan, windows, adapter, "SliderQuant")
    schedule = window_schedule(adapter.num_layers, settings.fill, settings.window, settings.stride)
    check_start(settings, gptq.grid)
    start = time.perf_counter()
    mods = quantizable(model)
    prefix = layer_prefix(model)
    by_layer = [[n for unit in layer_units(plan, list(mods), f"{prefix}{i}.") for n in unit]
                for i in range(adapter.num_layers)]
    with torch.no_grad():
        inputs, kwargs = record_first_inputs(model, adapter.layers[0], windows, settings.batch_size)
    starts = {}
    if settings.init == "gptq":
        starts = gptq_layers(model, plan, inputs, kwargs, gptq, progress)[0]
    wrappers = {}
    for n in (n for names in by_layer for n in names):
        try:
            wrappers[n] = LearnableQuantLinear(mods[n], plan.entries[n].bits, plan.entries[n].group_size,
                                               settings.rank, settings.init, starts.get(n))
        except ValueError as exc:
            raise ValueError(f"SliderQuant of {n} failed (the model is unchanged): {exc}") from exc
    trainable = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(settings.seed)
    replacements: dict[str, QuantLinear] = {}
    buffered = 0.0
    try:
        for p in trainable:
            p.requires_grad_(False)
        for name, w in wrappers.items():
            set_module(model, name, w)
        bar = tqdm(total=len(settings.rates) * len(schedule), desc="SliderQuant", unit="window",
                   disable=not progress)
        for rate in settings.rates:
            streams = _Streams(inputs, kwargs)
            for r, ids in enumerate(schedule):
                layers = [adapter.layers[i] for i in ids]
                ws = [wrappers[n] for i in ids for n in by_layer[i]]
                # the layers the next window drops: their full-precision output is the next full stream
                slide = schedule[r + 1][0] - ids[0] if r + 1 < len(schedule) else 0
                dropped = sum(len(by_layer[i]) for i in ids[:slide])
                advanced = streams.through(layers[:slide], streams.full, ws[:dropped], None, settings.autocast)
                targets = streams.through(layers[slide:], advanced, ws[dropped:], None, settings.autocast)
                buffered = max(buffered, buffered_mib(streams.full, streams.quantized, targets))
                label = f"{ids[0]}-{ids[-1]} at rate {rate}"
                loss = _train_window(layers, ws, streams, targets, rate, settings, generator, label) if ws else 0.0
                bar.set_postfix_str(f"layers {label}: mse {loss:.3g}")
                bar.update()
                if slide:
                    streams.full = advanced
                    streams.quantized = streams.through(layers[:slide], streams.quantized, ws[:dropped], rate,
                                                        settings.autocast)
        bar.close()
        if HEAD in plan.entries and plan.entries[HEAD].bits != DENSE:  # on the quantized model's final states
            last = range(schedule[-1][0], adapter.num_layers)
            final = streams.through([adapter.layers[i] for i in last], streams.quantized,
                                    [wrappers[n] for i in last for n in by_layer[i]], 1.0, settings.autocast)
            e = plan.entries[HEAD]
            replacements[HEAD] = gptq_replacement(HEAD, mods[HEAD], e.bits, e.group_size,
                                                  head_hessian(model, final), gptq)
        for name, w in wrappers.items():
            replacements[name] = QuantLinear(PackedWeight.from_quantized(w.quantized()), w.bias).to(w.weight.device)
    finally:
        for name in wrappers:
            set_module(model, name, mods[name])
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    report = install(model, plan, replacements)
    return CalibrationReport("SliderQuant", report, int(windows.numel()), time.perf_counter() - start,
                             peak_rss_mib(), buffered)
