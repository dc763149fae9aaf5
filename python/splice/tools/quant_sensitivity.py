"""How much each quantization unit matters: two weight/activation scores and a measured cost.

For decoder layer ``l`` with input ``x`` and output ``y`` (hidden states, per token) and unit ``u``
(see :mod:`splice.quant.plan`: ``<layer>.self_attn.qkv``, ``o_proj``, ``<layer>.mlp.gate_up``,
``down_proj``, ``lm_head``), after Dumitru et al., "Layer-Wise Quantization: A Pragmatic and
Effective Method for Quantizing LLMs Beyond Integer Bit-Levels" (2024):

* LIM (layer input modification): ``LIM_l = 1 − mean_tokens cos(x, y)``; every unit of layer ``l``
  gets ``LIM_l``, and ``lm_head`` (no layer) the largest ``LIM`` of the model.
* ZD (z-score distribution): the fraction of the unit's weights ``w`` with ``|w − μ| > k·σ``
  (``μ``, ``σ`` over that unit's weights; ``k = 1``).
* measured cost: ``KL_u(f) = mean_tokens KL(p_full || p_u@f)`` of next-token distributions when
  unit ``u`` alone is quantized in format ``f = (bits, group_size)`` (everything else full
  precision), on calibration text. Layers before ``u``'s are unchanged, so each run starts from
  that layer's recorded input (:class:`LayerInputs`) instead of running the whole model.
  The quantizer is one of :data:`splice.quant.quantizers.METHODS` or ``gptq``: the unit's members
  are then quantized by GPTQ with the Hessian of the unit's input in the unquantized model
  (:func:`unit_hessians`, on separate ``hessian_windows``: GPTQ needs at least as many tokens as
  inputs), which is the input it sees when it alone is quantized.

A :class:`Measurements` file holds all three with the model's signature and the settings they were
measured with (calibration windows: count, length and a hash of their token ids; quantizer; widths;
group sizes; for GPTQ its settings and Hessian windows). :meth:`Measurements.check_reuse` refuses it
for another model or other settings, and a file without those settings (an older one) is refused on
load. The measured costs feed :func:`splice.quant.allocate.plan_for` (method ``measured``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..ops.quant_format import Quantized, dequantize_codes
from ..quant.gptq import GPTQSettings, Hessian
from ..quant.plan import DENSE, check_width, model_signature, module_shape, quantizable, units
from ..quant.quantizers import METHODS, quantize
from ..utils.atomic import write_atomic
from .calibration_text import evaluate, log_probs, run_hooked

ZD_K = 1.0
GPTQ = "gptq"
COST_QUANTIZERS = (*METHODS, GPTQ)


def format_key(bits: int, group_size: int) -> str:
    return f"{bits}g{group_size}"


def format_of(key: str) -> tuple[int, int]:
    bits, _, group = key.partition("g")
    return int(bits), int(group)


def calibration_of(windows: torch.Tensor) -> dict:
    """What identifies calibration windows [count, length]: their shape and a SHA-256 of the token ids."""
    if windows.dim() != 2:
        raise ValueError(f"calibration windows must be [count, length] token ids, got shape {list(windows.shape)}")
    digest = hashlib.sha256(windows.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"windows": int(windows.shape[0]), "length": int(windows.shape[1]), "tokens_sha256": digest}


@dataclass
class Measurements:
    """Scores and measured costs of every unit of one model (``kl[unit]["<bits>g<group_size>"]``)."""

    model: dict
    units: dict[str, list[str]]
    params: dict[str, int]
    lim: dict[str, float]
    zd: dict[str, float]
    layer_lim: list[float]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)
    method: str = "hqq"
    group_sizes: list[int] = field(default_factory=lambda: [64])
    tokens: int = 0
    full_ppl: float | None = None
    widths: list[int] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    gptq: dict = field(default_factory=dict)

    def costs(self) -> dict[str, dict[tuple[int, int], float]]:
        """``cost[unit][(bits, group_size)]``, the measured KL (raises if this file holds none)."""
        if not self.kl:
            raise ValueError("these measurements hold no measured KL costs (measure with widths)")
        return {u: {format_of(k): v for k, v in per.items()} for u, per in self.kl.items()}

    def check_model(self, model: nn.Module) -> None:
        sig = model_signature(model)
        if sig != self.model:
            raise ValueError(f"these measurements are for {self.model}; the model is {sig}")
        if units(model) != self.units:
            raise ValueError("these measurements list other quantization units than the model has")

    def check_reuse(self, model: nn.Module, windows: torch.Tensor, method: str | None = None,
                    widths=None, group_sizes=None, gptq: dict | None = None) -> None:
        """Refuse these measurements for ``model`` unless they were made on the same calibration
        ``windows`` and, for each setting given (None: the use does not depend on it), with the same
        quantizer ``method``, ``widths``, ``group_sizes`` and ``gptq`` record (:func:`gptq_record`).
        Raises ValueError naming the first difference."""
        self.check_model(model)
        wanted = calibration_of(windows)
        for key in ("windows", "length", "tokens_sha256"):
            if self.calibration.get(key) != wanted[key]:
                raise ValueError(f"these measurements were made on other calibration windows ({key}: "
                                 f"{self.calibration.get(key)} here, {wanted[key]} asked for); re-measure")
        settings = {"quantizer": (self.method, method),
                    "widths": (sorted(self.widths), None if widths is None else sorted(int(b) for b in widths)),
                    "group sizes": (sorted(self.group_sizes),
                                    None if group_sizes is None else sorted({int(g) for g in group_sizes})),
                    "GPTQ settings and Hessian windows": (self.gptq, gptq)}
        for name, (have, want) in settings.items():
            if want is not None and have != want:
                raise ValueError(f"these measurements were made with {name} {have}; this run asks for {want}: "
                                 "re-measure")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Measurements:
        data = json.loads(Path(path).read_text())
        missing = [k for k in ("calibration", "widths") if not isinstance(data, dict) or k not in data]
        if missing and isinstance(data, dict) and "kl" in data:
            raise ValueError(f"{path} does not record the settings it was measured with ({', '.join(missing)}; "
                             "made by an older splice): re-measure")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{path} is not a splice quantization measurement file: {exc}") from exc


@torch.inference_mode()
def layer_lim(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """``LIM_l = 1 − mean cos(x_l, y_l)`` over every token of ``windows``, per decoder layer."""
    adapter = Adapter(model)
    sums = [0.0] * adapter.num_layers

    def hook(idx):
        def fn(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            sums[idx] += float(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    run_hooked(model, windows, handles, batch_size)
    return [1.0 - s / windows.numel() for s in sums]


def zd_score(weights: list[torch.Tensor], k: float = ZD_K) -> float:
    """Fraction of the weights (all tensors pooled) further than ``k`` standard deviations from the mean."""
    w = torch.cat([t.detach().float().reshape(-1) for t in weights])
    return float(((w - w.mean()).abs() > k * w.std()).float().mean())


def _layer_of(unit: str, num_layers: int) -> int | None:
    parts = unit.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit() and int(parts[i + 1]) < num_layers:
            return int(parts[i + 1])
    return None


class LayerInputs:
    """Every decoder layer's input hidden states on ``windows`` (per chunk of ``batch_size``), recorded
    in one forward pass; :meth:`starting_at` then runs the model from a layer's recorded input.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.adapter = Adapter(model)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(self.adapter.num_layers)]

        def record(idx):
            def fn(module, args, kwargs):
                self.inputs[idx].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            return fn

        layers = self.adapter.layers
        handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
        with torch.inference_mode():
            run_hooked(model, windows, handles, batch_size)

    @contextmanager
    def starting_at(self, layer: int):
        """Within the block, a forward pass over the same chunks, in order, skips layers ``< layer``
        and gives layer ``layer`` its recorded input: the model's output is unchanged while
        nothing before ``layer`` changes."""
        if layer == 0:
            yield
            return
        base = getattr(self.adapter.model, "model", self.adapter.model)
        full = base.layers
        calls = iter(self.inputs[layer])

        def inject(module, args, kwargs):
            hidden = next(calls)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = full[layer].register_forward_pre_hook(inject, with_kwargs=True)
        base.layers = nn.ModuleList(list(full)[layer:])
        try:
            yield
        finally:
            base.layers = full
            handle.remove()


@contextmanager
def fake_quantized(modules: list[nn.Linear], bits: int, group_size: int, method: str,
                   quantizer: Callable[[torch.Tensor], Quantized] | None = None):
    """Within the block, each module's weight is its quantized value ``(q − z) · s``: by ``method``, or
    by ``quantizer(weight)`` when one is given.

    The weight *Parameter* is swapped (never written), so a tied ``lm_head`` leaves the embedding as it was.
    """
    originals = [m.weight for m in modules]
    try:
        for m, w in zip(modules, originals):
            q = quantizer(w.detach()) if quantizer else quantize(w.detach(), bits, group_size, method)
            deq = dequantize_codes(q.codes, q.scales, q.zeros, group_size).to(w.dtype)
            m.weight = nn.Parameter(deq, requires_grad=False)
        yield
    finally:
        for m, w in zip(modules, originals):
            m.weight = w


def gptq_record(settings: GPTQSettings, hessian_windows: torch.Tensor) -> dict:
    """What a GPTQ cost measurement depends on besides the KL windows: the settings and Hessian windows."""
    return {**asdict(settings), "hessian": calibration_of(hessian_windows)}


@torch.inference_mode()
def unit_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, Hessian]:
    """The Hessian ``2 XᵀX / n`` of every unit's input (its members share it) on ``windows``, in one
    forward pass of the model as it is."""
    mods = quantizable(model)
    hessians: dict[str, Hessian] = {}
    handles = []
    for unit, names in units(model).items():
        hessians[unit] = Hessian(mods[names[0]].in_features)
        handles.append(mods[names[0]].register_forward_pre_hook(lambda m, args, h=hessians[unit]: h.add(args[0])))
    run_hooked(model, windows, handles, batch_size)
    return hessians


def measure(model: nn.Module, windows: torch.Tensor, widths=(2, 3, 4, 8), group_sizes=(64,),
            method: str = "hqq", batch_size: int = 8, progress: bool = True, *,
            gptq: GPTQSettings | None = None, hessian_windows: torch.Tensor | None = None) -> Measurements:
    """LIM, ZD and (for each width in ``widths`` at each of ``group_sizes``; no widths: skip) the
    measured KL of every unit, quantized by ``method`` (one of :data:`COST_QUANTIZERS`; ``gptq``
    uses ``gptq`` settings, default :class:`GPTQSettings`, and Hessians on ``hessian_windows``).

    Costs ``len(units) · len(widths) · len(group_sizes)`` partial forward passes over ``windows``
    (from the unit's layer on): keep it to a few hundred tokens.
    """
    if method not in COST_QUANTIZERS:
        raise ValueError(f"method must be one of {COST_QUANTIZERS}, got {method!r}")
    if method == GPTQ and widths and hessian_windows is None:
        raise ValueError("method gptq needs hessian_windows")
    if method != GPTQ and (gptq is not None or hessian_windows is not None):
        raise ValueError(f"GPTQ settings or Hessian windows given for method {method!r}")
    gptq = gptq or GPTQSettings()
    calibration = calibration_of(windows)
    group_sizes = sorted({int(g) for g in group_sizes})
    if not group_sizes:
        raise ValueError("measure at least one group size")
    for b in widths:
        if b == DENSE:
            raise ValueError("16 (dense) has no quantization cost to measure; measure widths in 2, 3, 4, 8")
        for g in group_sizes:
            check_width(b, g)
    adapter = Adapter(model)
    mods = quantizable(model)
    done = [n for n, m in mods.items() if not isinstance(m, nn.Linear)]
    if done:
        raise ValueError(f"measure the unquantized model: {done[:3]} are already quantized")
    members = units(model)
    hessians, record = {}, {}
    if method == GPTQ and widths:
        record = gptq_record(gptq, hessian_windows)
        hessians = unit_hessians(model, hessian_windows, batch_size)
        for unit, names in members.items():
            need = module_shape(mods[names[0]])[1]
            if hessians[unit].tokens < need:
                raise ValueError(f"{unit}: too few Hessian tokens ({hessians[unit].tokens}) for its {need} inputs; "
                                 "use more or longer hessian_windows")
    lim_l = layer_lim(model, windows, batch_size)
    lim, zd, params = {}, {}, {}
    for unit, names in members.items():
        layer = _layer_of(unit, adapter.num_layers)
        lim[unit] = lim_l[layer] if layer is not None else max(lim_l)
        zd[unit] = zd_score([mods[n].weight for n in names])
        params[unit] = sum(module_shape(mods[n])[0] * module_shape(mods[n])[1] for n in names)
    reference = log_probs(model, windows, batch_size)
    full_ppl, _ = evaluate(model, windows, None, batch_size)
    kl: dict[str, dict[str, float]] = {}
    jobs = [(u, b, g) for u in members for b in widths for g in group_sizes]
    inputs = LayerInputs(model, windows, batch_size) if jobs else None
    for unit, bits, group in tqdm(jobs, desc="quantization sensitivity", unit="run", disable=not progress):
        layer = _layer_of(unit, adapter.num_layers)
        gptq_of = None
        if method == GPTQ:
            gptq_of = partial(gptq.quantize, hessian=hessians[unit].matrix(), bits=bits, group_size=group)
        try:
            with fake_quantized([mods[n] for n in members[unit]], bits, group, method, gptq_of), \
                    inputs.starting_at(layer if layer is not None else adapter.num_layers - 1):
                # KL ≥ 0; float sums of near-identical distributions can land a hair below
                cost = max(0.0, evaluate(model, windows, reference, batch_size)[1])
        except ValueError as exc:
            raise ValueError(f"{unit} ({bits}-bit, group {group}, {method}): {exc}") from exc
        kl.setdefault(unit, {})[format_key(bits, group)] = cost
    return Measurements(model_signature(model), members, params, lim, zd, lim_l, kl, method, group_sizes,
                        int(windows.numel()), full_ppl, sorted(int(b) for b in widths), calibration, record)



def reuse_or_measure(path, model: nn.Module, windows: torch.Tensor, widths, group_sizes, method: str = "hqq", *,
                     gptq: GPTQSettings | None = None, hessian_windows: torch.Tensor | None = None,
                     progress: bool = True) -> tuple[Measurements, bool]:
    """``(measurements, reused)``: the file at ``path`` when it exists, refused (ValueError) unless made
    for ``model`` on ``windows`` with the same settings (without ``widths`` the use reads no KL, so only
    the model and windows are compared); else :func:`measure` here, written to ``path`` when given."""
    if method == GPTQ and widths and hessian_windows is None:
        raise ValueError("method gptq needs hessian_windows")
    if path is not None and Path(path).is_file():
        found = Measurements.load(path)
        if widths:
            record = gptq_record(gptq or GPTQSettings(), hessian_windows) if method == GPTQ else {}
            found.check_reuse(model, windows, method, widths, group_sizes, record)
        else:
            found.check_reuse(model, windows)
        return found, True
    found = measure(model, windows, widths, group_sizes, method, progress=progress, gptq=gptq,
                    hessian_windows=hessian_windows)
    if path is not None:
        found.save(path)
    return found, False
