"""``splice bench skip``: quality and speed of layer skipping on one model, in one run.

* **Static**: the unpatched model (the baseline of every speed ratio), the model patched with no
  items (the patch's idle cost), and for 10, 25 and 40% of the layers skipped, chosen by each
  importance method (Block Influence, L2 change, single-removal KL, the greedy joint-removal
  search) and at random (the control): WikiText-2 perplexity on held-out windows and decode
  tokens/s (batch 1).
* **Per-request routing** at the 25% budget: continuation perplexity (prompt prefilled by the
  full model, continuation scored with the routing applied) and decode tokens/s at batch 8 for
  the same layers for every request (decode only), the Block-Influence router and the trained
  router; the routed batch runs gather/scatter, compared with running each group of rows that
  share a skip set as its own batch.

Every timed setting runs interleaved with the others round by round after a discarded warm-up
round (:func:`splice.bench.timing.interleaved`).

**Ideal speedup.** Skipping ``k`` layers cannot remove the embedding, final norm, ``lm_head`` and
sampling, so the ideal is ``T_full / (T_full − k·t_layer)``: ``T_full`` is the unpatched model's
decode-step time (batch 1) and ``t_layer`` the mean time one decoder layer's forward takes inside
that decode step, timed from the start to the end of each layer call (forward hooks on the
unpatched model, its own interleaved setting ``layer-timed``, not a ratio).

Ratios (medians, same run, ÷ unpatched): ``skip25_decode_speedup`` (greedy selection),
``skip25_ideal_speedup`` (above), ``skip25_ideal_fraction`` (measured ÷ ideal speedup),
``patch_idle_decode_b1`` (patched with no items), ``skip25_ppl_ratio``,
``routing_gather_vs_grouped``, and ``skip{10,25,40}_measured_beats_random``.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..patch import patch
from ..skipping.routers import FixedRouter
from ..skipping.spec import Skip
from ..tools.calibration_text import evaluate, wikitext_windows
from ..tools.layer_profile import METHODS, layers_for_budget, profile_layers
from ..tools.router_training import fit_influence_router, fit_linear_router, measure_routing_data
from .output import provenance
from .timing import decode_layer_seconds, decode_tps, interleaved

FRACTIONS = (0.0, 0.10, 0.25, 0.40)
LAYER_TIMED = "layer-timed"


def ideal_speedup(step_seconds: float, layer_seconds: float, skipped: int) -> float:
    """``T / (T − k·t)``: the speedup of skipping ``k`` layers of ``t`` seconds each from a step of ``T``."""
    rest = step_seconds - skipped * layer_seconds
    if not (step_seconds > 0 and layer_seconds >= 0 and rest > 0):
        raise ValueError(f"{skipped} layers of {layer_seconds:.3g} s cannot fit in a {step_seconds:.3g} s step")
    return step_seconds / rest


def static_settings(model, rows: list[dict]) -> list:
    """The timed setting of each static row (name, context), plus ``layer-timed`` (unpatched)."""
    def context(row):
        if row["method"] == "unpatched":
            return nullcontext
        return lambda: patch(model, *([Skip(row["layers"])] if row["layers"] else []))

    return [(r["name"], context(r)) for r in rows] + [(LAYER_TIMED, nullcontext)]


def static_rows(model, profile, eval_windows, fractions, repeats, steps, progress) -> tuple[list[dict], list[float]]:
    """The static rows (perplexity, decode tokens/s at batch 1 with their runs) and the ``layer-timed``
    runs (seconds per decoder layer per decode step)."""
    adapter = Adapter(model)
    decode_ids = eval_windows[:1, :64]
    rows = [{"name": "unpatched", "fraction": 0.0, "method": "unpatched", "layers": []},
            {"name": "patch-idle", "fraction": 0.0, "method": "none", "layers": []}]
    for fraction in (f for f in fractions if f):
        count = round(adapter.num_layers * fraction)
        rows += [{"name": f"{m}{round(fraction * 100)}", "fraction": fraction, "method": m,
                  "layers": profile.choose(m, count) if count else []} for m in METHODS]
    settings = static_settings(model, rows)
    for row, (_, context) in tqdm(list(zip(rows, settings)), desc="static skipping: perplexity",
                                  disable=not progress):
        with context():
            row["ppl"], _ = evaluate(model, eval_windows)

    def measure(name):
        if name == LAYER_TIMED:
            return {"layer_s": decode_layer_seconds(model, adapter.layers, decode_ids, steps)}
        return {"decode_b1": decode_tps(model, decode_ids, steps)}

    runs = interleaved(settings, measure, repeats, "static skipping: decode", progress)
    for row in rows:
        row["decode_runs_b1"] = runs[row["name"]]["decode_b1"]
        row["decode_tps_b1"] = statistics.median(row["decode_runs_b1"])
    return rows, runs[LAYER_TIMED]["layer_s"]


@torch.inference_mode()
def continuation_ppl(model, windows: torch.Tensor, prompt_len: int, batch_size: int = 8) -> float:
    """Perplexity of each window's continuation after a prefill of its first ``prompt_len`` tokens."""
    nll, count = 0.0, 0
    for chunk in windows.split(batch_size):
        cache = model(input_ids=chunk[:, :prompt_len], use_cache=True).past_key_values
        positions = torch.arange(prompt_len, chunk.shape[1])[None].expand(chunk.shape[0], -1)
        logits = model(input_ids=chunk[:, prompt_len:-1], past_key_values=cache, position_ids=positions[:, :-1],
                       use_cache=True).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, prompt_len + 1:].flatten(),
                                                       reduction="sum"))
        count += chunk[:, prompt_len + 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def _grouped_decode_tps(model, router, ids, steps) -> float:
    """Decode tokens/s when each group of rows sharing a skip set runs as its own batch."""
    with patch(model, router=router):
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        skip = router.decide()
    groups: dict[tuple, list[int]] = {}
    for row in range(ids.shape[0]):
        groups.setdefault(tuple(skip[row].nonzero().flatten().tolist()), []).append(row)
    seconds = 0.0
    for layers, rows in groups.items():
        fixed = FixedRouter(layers, router.num_layers, router.hidden_size) if layers else None
        with patch(model, router=fixed):
            seconds += len(rows) * steps / decode_tps(model, ids[rows], steps)
    return ids.shape[0] * steps / seconds


def routing_rows(model, calib, evals, static_layers, prompt_len, repeats, steps, progress) -> tuple[list[dict], dict]:
    adapter = Adapter(model)
    data = measure_routing_data(model, calib, prompt_len, progress=progress)
    fraction = len(static_layers) / len(data.layers)
    routers = {"fixed": FixedRouter(static_layers, adapter.num_layers, adapter.hidden_size),
               "influence": fit_influence_router(data, fraction, adapter),
               "linear": fit_linear_router(data, fraction, adapter)}
    batch = evals[:8, :prompt_len]
    rows = [{"router": "none", "ppl": continuation_ppl(model, evals, prompt_len), "mean_skipped": 0.0}]
    for name, router in tqdm(routers.items(), desc="routing: perplexity", disable=not progress):
        with patch(model, router=router):
            ppl = continuation_ppl(model, evals, prompt_len)
            skipped = float(router.decide().sum(1).float().mean())
        rows.append({"router": name, "ppl": ppl, "mean_skipped": skipped})
    settings = [("none", nullcontext)] + [(n, lambda r=r: patch(model, router=r)) for n, r in routers.items()]
    settings.append(("grouped", nullcontext))

    def measure(name):
        if name == "grouped":
            return {"decode_b8": _grouped_decode_tps(model, routers["linear"], batch, steps)}
        return {"decode_b8": decode_tps(model, batch, steps)}

    runs = interleaved(settings, measure, repeats, "routing: decode", progress)
    for row in rows:
        row["decode_runs_b8"] = runs[row["router"]]["decode_b8"]
        row["decode_tps_b8"] = statistics.median(row["decode_runs_b8"])
    linear = next(r for r in rows if r["router"] == "linear")
    grouped = {"router": "linear", "gather_scatter_tps_b8": linear["decode_tps_b8"],
               "grouped_tps_b8": statistics.median(runs["grouped"]["decode_b8"]),
               "grouped_runs_b8": runs["grouped"]["decode_b8"]}
    return rows, grouped


def _row(static: list[dict], name: str) -> dict:
    return next(r for r in static if r["name"] == name)


def static_ratios(static: list[dict], layer_seconds: float) -> dict[str, float]:
    """The static rows' ratios (module docstring); ``layer_seconds``: ``t_layer``."""
    full, idle, greedy25 = _row(static, "unpatched"), _row(static, "patch-idle"), _row(static, "greedy25")
    speedup = greedy25["decode_tps_b1"] / full["decode_tps_b1"]
    ideal = ideal_speedup(1.0 / full["decode_tps_b1"], layer_seconds, len(greedy25["layers"]))
    ratios = {
        "skip25_decode_speedup": speedup,
        "skip25_ideal_speedup": ideal,
        "skip25_ideal_fraction": speedup / ideal,
        "patch_idle_decode_b1": idle["decode_tps_b1"] / full["decode_tps_b1"],
        "skip25_ppl_ratio": greedy25["ppl"] / full["ppl"],
    }
    for fraction in sorted({r["fraction"] for r in static if r["fraction"]}):
        by = {r["method"]: r["ppl"] for r in static if r["fraction"] == fraction}
        ratios[f"skip{round(fraction * 100)}_measured_beats_random"] = float(min(by["kl"], by["greedy"]) < by["random"])
    return ratios


def run(model, tokenizer, calib_windows: int = 4, eval_windows: int = 16, length: int = 128,
        greedy_candidates: int = 14, repeats: int = 3, steps: int = 32,
        progress: bool = True, profile=None) -> dict:
    adapter = Adapter(model)
    calib = wikitext_windows(tokenizer, calib_windows, length)
    evals = wikitext_windows(tokenizer, eval_windows, length, offset=calib_windows)
    k40 = layers_for_budget(adapter.num_layers, layers=round(adapter.num_layers * FRACTIONS[-1]))
    if profile is None:
        profile = profile_layers(model, calib, greedy_layers=k40, candidates=greedy_candidates, progress=progress)
    profile.check_model(adapter)
    static, layer_runs = static_rows(model, profile, evals, FRACTIONS, repeats, steps, progress)
    routing, grouped = routing_rows(model, wikitext_windows(tokenizer, 32, 96, offset=calib_windows + eval_windows),
                                    evals[:, :96], _row(static, "greedy25")["layers"], 64, repeats, steps, progress)
    ratios = static_ratios(static, statistics.median(layer_runs))
    ratios["routing_gather_vs_grouped"] = grouped["gather_scatter_tps_b8"] / grouped["grouped_tps_b8"]
    return {
        "benchmark": "skip", "model": adapter.name, "architecture": adapter.describe(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), **provenance(),
        "eval_tokens": evals.numel(), "calibration_tokens": calib.numel(), "repeats": repeats, "decode_steps": steps,
        "profile": vars(profile), "static": static, "layer_seconds_runs": layer_runs, "routing": routing,
        "routing_layout": grouped, "ratios": ratios,
    }
