"""``splice bench quant``: quality, size and decode speed of quantized models, in one run.

Rows, every one scored on the same held-out WikiText-2 windows:

* ``fp32`` (the loaded model, the reference of every KL) and ``bf16`` (it cast to bfloat16: the
  baseline of every ratio);
* ``uniform`` 8, 4 and 3 bits (group 64), every unit at that width;
* ``uniform4-a8``: the uniform 4-bit model with int8 activations (``splice::quant_matmul_a8``,
  :func:`splice.quant.activations.set_quant_activations`), its own perplexity and KL;
* ``bf16-splice-attention`` and ``uniform4-a8-splice-attention``: those models decoding with splice's
  attention (:func:`splice.use_splice_attention`; timing only: the prefill, and so the perplexity, is
  SDPA's). The first is the control that shows what the attention alone buys;
* ``mixed`` at 3.5 and 4.25 bits per weight by each allocation method: ``measured`` (choosing
  2, 3 or 4 bits and group size 32, 64 or 128), ``measured-g64`` (bits only, group 64: the same costs
  without the group-size choice), ``lim``, ``zd`` and ``random`` (the control; perplexity is the
  median over seeds, speed and bytes are the first seed's).
* ``gptq``: GPTQ rows (activation order, float min-max zero points, clipping:
  :class:`splice.quant.gptq.GPTQSettings` ``GPTQ``), calibrated on ``GPTQ_WINDOWS`` × ``GPTQ_LENGTH`` WikiText-2 tokens after the held-out
  ones: ``gptq-uniform3`` and ``gptq-uniform4`` (group 64), and ``gptq-measured3.5`` / ``4.25``, the
  measured allocation with costs measured by GPTQ-quantizing each unit alone
  (:func:`splice.tools.quant_sensitivity.measure` with ``gptq``); plus ``uniform4-g32`` (HQQ at 4 bits
  in groups of 32, 5.0 bits per weight: the grid the default model's Q4_1 weights already sit on).
  These rows report quality and bytes, not decode speed: they run the same kernels as the formats
  above.
* ``sliderquant`` (with ``gptq``): ``sliderquant-uniform3`` and ``sliderquant-measured3.5`` (the GPTQ
  costs' plan), SliderQuant-calibrated (:class:`splice.quant.sliderquant.SliderQuantSettings` ``SLIDER``;
  ``lm_head`` by ``GPTQ``) on the same calibration windows; quality only, with each calibration's wall
  seconds (``calibration_s``).

Quantized rows are planned and quantized from the fp32 weights, then cast to bfloat16 like the
baseline (activations and dense weights in bf16; codes, fp16 scales and zero points as packed).
Each row reports perplexity, KL to fp32, ``model_bytes`` (every parameter and buffer the model
holds, shared storage once; the input embedding stays dense), ``linear_bytes`` (the Linear
weights only), decode tokens/s at batch 1, 8 and 16, and per batch the bytes a decode step reads
per token and the fraction of the machine's read bandwidth that is (:mod:`.bandwidth`; the
bandwidth is timed among the rows in every round). ``decode_only``: the fp32, bf16 and
uniform rows alone (no sensitivity measurement, no mixed rows, no ratios that need them).
``profile_decode``: ``decode_split``, where a decode step of bf16, uniform 4-bit and
``uniform4-a8-splice-attention`` at batch 1 and 8 spends its time (:mod:`.step_profile`), profiled
after the timing so it does not disturb it.
``compiled``: the rows ``uniform4-compiled``, ``uniform4-a8-compiled`` and
``uniform4-a8-splice-attention-compiled``, those models decoded by
:func:`splice.compile_decode` (batch 1, 8 and 16; they compile in the warm-up round). ``llamacpp_gguf``:
the row ``llamacpp-q4_1``, llama.cpp on that GGUF of the same model at batch 1 (:mod:`.llamacpp`;
skipped, with the reason in ``skipped_rows``, when llama-cpp-python is not installed).

Decode is timed after every row is built, all models interleaved round by round after a discarded
warm-up round (:func:`splice.bench.timing.interleaved`); each row keeps its runs.

Ratios (medians, same run, ÷ bf16 unless named): ``q4_decode_speedup`` (and ``_b8``, ``_b16``),
``q4_compiled_vs_eager_b1`` / ``_b8`` / ``_b16`` (compiled ÷ eager uniform 4-bit),
``q4_best_decode_speedup_b1`` / ``_b8`` / ``_b16`` (splice's fastest uniform 4-bit row at that batch,
:func:`best_q4_row`, named in the report's ``best_q4_rows``), ``splice_attention_speedup_b1`` / ``_b8`` /
``_b16`` (``bf16-splice-attention`` ÷ bf16), ``q4_vs_llamacpp_b1`` (the fastest uniform 4-bit row at
batch 1 ÷ llama.cpp Q4_1), ``q4a8_vs_llamacpp_b1`` (the same with
int8 activations, llama.cpp's own activation format), ``q4a8_decode_speedup`` / ``_b8`` / ``_b16``
(the fastest int8-activation 4-bit row ÷ bf16), ``q4a8_vs_q4_b1`` / ``_b8`` / ``_b16`` (eager int8 ÷
eager float activations), ``q4a8_ppl_ratio`` (its perplexity ÷ uniform 4-bit's),
``q4_decode_vs_fp32_b1`` / ``_b8`` (÷ fp32: plain ``F.linear`` in fp32 is faster than bf16 on
CPU), ``uniform3_ppl_ratio``, ``mixed35_ppl_ratio`` and ``mixed425_ppl_ratio`` (measured),
``mixed35_bytes_ratio``; per budget ``B``, against the uniform rows on both sides of it (the
largest with bits per weight ≤ ``B``, the smallest with ≥ ``B``; named in the report's
``uniform_neighbours``; a side without one is left out):
``measured{35,425}_ppl_vs_uniform_{below,above}`` (perplexity ÷ that row's) and
``measured{35,425}_beats_uniform_{below,above}``; and ``measured{35,425}_beats_random`` (1.0 when
measured allocation has the lower perplexity). With ``gptq``: ``gptq_uniform3_ppl_ratio``,
``gptq_mixed35_ppl_ratio``, ``gptq_mixed425_ppl_ratio`` (÷ bf16), ``gptq_mixed425_vs_hqq`` (÷ the HQQ
``measured4.25`` row, when present) and ``gptq_mixed425_vs_grid`` (÷ ``uniform4-g32``). With
``sliderquant``: ``sliderquant_uniform3_ppl_ratio``, ``sliderquant_mixed35_ppl_ratio`` (÷ bf16) and
``sliderquant_uniform3_vs_gptq``, ``sliderquant_mixed35_vs_gptq`` (÷ the GPTQ row of the same plan kind).
"""

from __future__ import annotations

import copy
import statistics
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..decoding.compiled_decode import compile_decode
from ..quant.activations import set_quant_activations
from ..quant.allocate import plan_for
from ..quant.apply import quantize_model
from ..quant.gptq import GPTQSettings
from ..quant.sliderquant import SliderQuantSettings
from ..quant.linear import QuantLinear
from ..quant.plan import QuantPlan, quantizable
from ..runtime.decode_attention import use_splice_attention
from ..tools.calibration_text import evaluate, log_probs, wikitext_windows
from ..tools.gptq_calibration import gptq_quantize_model
from ..tools.quant_sensitivity import GPTQ as GPTQ_COSTS
from ..tools.quant_sensitivity import reuse_or_measure
from ..tools.sliderquant_calibration import sliderquant_model
from .bandwidth import bandwidth_fraction, bytes_per_step, kv_bytes_per_token, read_bandwidth
from .llamacpp import LlamaCpp, gguf_bytes, unavailable
from .output import provenance
from .step_profile import decode_step_split
from .timing import compiled_decode_tps, decode_tps, interleaved

BUDGETS = (3.5, 4.25)
UNIFORM = (8, 4, 3)
GROUP = 64
MEASURED_GROUPS = (32, 64, 128)
MEASURED_WIDTHS = (2, 3, 4)  # 8 bits (8.5+ bits/weight) cannot pay for itself under these budgets
SCORED = ("lim", "zd", "random")
BATCHES = (1, 8, 16)
MEMORY = "memory-read"  # the bandwidth setting timed among the rows
PROFILED = ("bf16", "uniform4", "uniform4-a8-splice-attention")  # profile_decode: their steps at batch 1 and 8
A8, LLAMACPP = "uniform4-a8", "llamacpp-q4_1"
SPLICE_ATTENTION = {"bf16": "bf16-splice-attention", A8: "uniform4-a8-splice-attention"}  # decode attention rows
FAST = SPLICE_ATTENTION[A8]
CALIBRATED = ("gptq-", "sliderquant-")  # prefixes of the calibrated rows' methods
COMPILED = {"uniform4": "uniform4-compiled", A8: "uniform4-a8-compiled",
            FAST: f"{FAST}-compiled"}  # compiled row of each model
GPTQ = GPTQSettings(act_order=True, grid="rtn", clip=True)
GPTQ_WINDOWS, GPTQ_LENGTH = 16, 512
GRID = "uniform4-g32"  # HQQ 4-bit in groups of 32: the default model's own Q4_1 grid
SLIDER = SliderQuantSettings()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (a tied head is one matrix)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def linear_bytes(model: torch.nn.Module) -> int:
    return sum(m.nbytes if isinstance(m, QuantLinear) else m.weight.numel() * m.weight.element_size()
               for m in quantizable(model).values())


def _row(name, model, evals, reference, plan=None) -> dict:
    ppl, kl = evaluate(model, evals, reference)
    row = {"name": name, "ppl": ppl, "kl": kl, "model_bytes": model_bytes(model), "linear_bytes": linear_bytes(model)}
    if plan is not None:
        row.update(bits_per_weight=plan.bits_per_weight(), plan=plan.summary())
    return row


def _time_rows(rows: list[dict], models: dict, decode_ids, steps: int, repeats: int, progress: bool,
               others: dict | None = None) -> list[float]:
    """Decode tokens/s of every model in ``models`` (by row name), of each ``others`` row (name:
    (measure(ids) -> tok/s, batches, weight bytes, KV bytes per token)) and the machine's read
    bandwidth, interleaved; adds runs, medians, bytes per token and bandwidth fractions to the rows,
    and returns the bandwidth runs (bytes/s)."""
    others = others or {}

    def measure(name):
        if name == MEMORY:
            return {"read": read_bandwidth()}
        if name in others:
            tps, batches = others[name][:2]
            return {f"b{ids.shape[0]}": tps(ids) for ids in decode_ids if ids.shape[0] in batches}
        return {f"b{ids.shape[0]}": decode_tps(models[name], ids, steps) for ids in decode_ids}

    runs = interleaved([(name, nullcontext) for name in [*models, *others, MEMORY]], measure, repeats,
                       "decode timing", progress)
    bandwidth = statistics.median(runs[MEMORY]["read"])
    context = decode_ids[0].shape[1] + (steps - 1) / 2  # mean cached positions over the timed steps
    for row in rows:
        if row["name"] not in others and row["name"] not in models:
            continue  # a quality-only row
        if row["name"] in others:
            weights, kv = others[row["name"]][2:]
        else:
            model = models[row["name"]]
            weights, kv = linear_bytes(model), kv_bytes_per_token(model)
        for batch, values in runs[row["name"]].items():
            b = int(batch.removeprefix("b"))
            step = bytes_per_step(weights, kv, b, context)
            row[f"decode_runs_{batch}"] = values
            row[f"decode_tps_{batch}"] = statistics.median(values)
            row[f"bytes_per_token_{batch}"] = step / b
            row[f"bandwidth_fraction_{batch}"] = bandwidth_fraction(step, row[f"decode_tps_{batch}"], b, bandwidth)
    return runs[MEMORY]["read"]


def _quantized(model, plan, quantizer, windows=None):
    """A bf16 copy of ``model`` quantized by ``plan`` with ``quantizer``; ``gptq`` and ``sliderquant`` calibrate
    on ``windows``. Also the calibration's wall seconds (None for the others)."""
    q = copy.deepcopy(model)
    seconds = None
    if quantizer == "gptq":
        seconds = gptq_quantize_model(q, plan, windows, GPTQ, progress=False).seconds
    elif quantizer == "sliderquant":
        seconds = sliderquant_model(q, plan, windows, SLIDER, gptq=GPTQ, progress=False).seconds
    else:
        quantize_model(q, plan, quantizer)
    return q.to(torch.bfloat16), seconds


def run(model, tokenizer, calib_windows: int = 2, calib_length: int = 128, eval_windows: int = 4,
        eval_length: int = 512, steps: int = 32, repeats: int = 3, seeds: int = 3, quantizer: str = "hqq",
        measurements_path=None, progress: bool = True, decode_only: bool = False,
        profile_decode: bool = False, compiled: bool = False, llamacpp_gguf=None, gptq: bool = False,
        gptq_measurements_path=None, sliderquant: bool = False) -> dict:
    """The report (module docstring); ``model`` is the fp32 model (left unchanged).

    ``measurements_path``: a measurement file to reuse when it exists (refused unless measured on
    the same calibration windows with the same quantizer, widths 2, 3, 4 and group sizes 32, 64,
    128), else where the measurements made here are written. ``gptq_measurements_path``: the same for
    the GPTQ costs (refused unless also made with the same GPTQ settings and Hessian windows).
    """
    if sliderquant and not gptq:
        raise ValueError("the sliderquant rows need gptq (their allocation costs, start and lm_head)")
    adapter = Adapter(model)
    calib = wikitext_windows(tokenizer, calib_windows, calib_length)
    offset = -(-calib_windows * calib_length // eval_length)  # held-out windows start after the calibration text
    evals = wikitext_windows(tokenizer, eval_windows, eval_length, offset=offset)
    decode_ids = [evals[torch.arange(b) % eval_windows, :64] for b in BATCHES]
    measurements = None if decode_only else reuse_or_measure(
        measurements_path, model, calib, MEASURED_WIDTHS, MEASURED_GROUPS, quantizer, progress=progress)[0]
    gptq_windows = gptq_costs = None
    if gptq:  # GPTQ's calibration text: after the held-out windows
        seen = (offset + eval_windows) * eval_length
        gptq_windows = wikitext_windows(tokenizer, GPTQ_WINDOWS, GPTQ_LENGTH, offset=-(-seen // GPTQ_LENGTH))
        gptq_costs, _ = reuse_or_measure(gptq_measurements_path, model, calib, MEASURED_WIDTHS, MEASURED_GROUPS,
                                         GPTQ_COSTS, gptq=GPTQ, hessian_windows=gptq_windows, progress=progress)
    reference = log_probs(model, evals)
    jobs = [("fp32", None, None), ("bf16", None, None)]
    jobs += [(f"uniform{b}", "uniform", b + 32 / GROUP) for b in UNIFORM]
    if not decode_only:
        jobs += [(f"{m}{t}", m, t) for t in BUDGETS for m in ("measured", "measured-g64", *SCORED)]
    if gptq:
        jobs += [(GRID, "uniform-g32", 5.0), *[(f"gptq-uniform{b}", "gptq-uniform", b + 32 / GROUP) for b in (3, 4)],
                 *[(f"gptq-measured{t}", "gptq-measured", t) for t in BUDGETS]]
    if sliderquant:
        jobs += [("sliderquant-uniform3", "sliderquant-uniform", 3 + 32 / GROUP),
                 ("sliderquant-measured3.5", "sliderquant-measured", 3.5)]
    rows, timed = [], {}
    for name, method, target in tqdm(jobs, desc="quantized models", disable=not progress):
        if method is None:
            timed[name] = model if name == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
            rows.append(_row(name, timed[name], evals, reference))
            continue
        seeds_here = range(seeds) if method == "random" else [0]
        found = []
        for seed in seeds_here:
            groups = MEASURED_GROUPS if method.endswith("measured") else (GROUP,)
            calibrated, _, base = method.rpartition("-") if method.startswith(CALIBRATED) else ("", "", method)
            if base == "uniform":
                plan = QuantPlan.uniform(model, int(name[-1]), GROUP)
            elif method == "uniform-g32":
                plan = QuantPlan.uniform(model, 4, 32)
            else:
                costs = gptq_costs if calibrated else measurements
                plan = plan_for(model, base.removesuffix("-g64"), target, costs, GROUP, seed=seed,
                                group_sizes=groups)
            quantized, seconds = _quantized(model, plan, calibrated or quantizer, gptq_windows)
            found.append({**_row(name, quantized, evals, reference, plan),
                          **({"calibration_s": seconds} if calibrated else {})})
            quality_only = bool(calibrated) or method == "uniform-g32"
            if seed == 0 and not quality_only:  # speed and bytes are the first seed's
                timed[name] = quantized
        row = found[0]
        if len(found) > 1:
            row["ppl_by_seed"] = [r["ppl"] for r in found]
            row["ppl"] = statistics.median(row["ppl_by_seed"])
        rows.append({**row, "method": method, "target_bpw": target})
    timed[A8] = copy.deepcopy(timed["uniform4"])
    set_quant_activations(timed[A8], "int8")
    q4 = next(r for r in rows if r["name"] == "uniform4")
    rows.append({**_row(A8, timed[A8], evals, reference), "bits_per_weight": q4["bits_per_weight"],
                 "same_plan_as": "uniform4", "activations": "int8"})
    for source, name in SPLICE_ATTENTION.items():  # prefill stays on SDPA: the perplexity is the source's
        timed[name] = copy.deepcopy(timed[source])
        use_splice_attention(timed[name])
        rows.append({"name": name, "same_model_as": source, "attention": "splice"})
    others, skipped, engine = _other_rows(rows, timed, decode_ids, steps, compiled, llamacpp_gguf)
    try:
        bandwidth_runs = _time_rows(rows, timed, decode_ids, steps, repeats, progress, others)
    finally:
        if engine is not None:
            engine.close()
    splits = {f"{name} b{ids.shape[0]}": decode_step_split(timed[name], ids, steps)
              for name in PROFILED for ids in decode_ids[:2]} if profile_decode else None
    return {
        "benchmark": "quant", "model": adapter.name, "architecture": adapter.describe(), **provenance(),
        "quantizer": quantizer, "eval_tokens": evals.numel(), "calibration_tokens": calib.numel(),
        **({"gptq": {**asdict(GPTQ), "calibration_tokens": gptq_windows.numel()}} if gptq else {}),
        **({"sliderquant": asdict(SLIDER)} if sliderquant else {}),
        "repeats": repeats, "decode_steps": steps, "random_seeds": seeds, "decode_only": decode_only,
        "skipped_rows": skipped,
        "read_bandwidth": statistics.median(bandwidth_runs), "read_bandwidth_runs": bandwidth_runs,
        **({"decode_split": splits} if splits else {}), "rows": rows,
        "best_q4_rows": {f"b{b}": best_q4_row(rows, b) for b in BATCHES},
        "uniform_neighbours": {str(t): {side: r and r["name"] for side, r in zip(("below", "above"),
                                                                                 uniform_neighbours(rows, t))}
                               for t in BUDGETS},
        "ratios": ratios(rows),
    }


def _other_rows(rows, timed, decode_ids, steps, compiled, llamacpp_gguf):
    """The compiled 4-bit and llama.cpp rows (appended to ``rows``) as ``_time_rows``'s ``others``,
    the rows skipped (with why), and the llama.cpp engine (None without it), to close after timing."""
    others, skipped, llama = {}, {}, None
    for source, name in COMPILED.items() if compiled else ():
        model = timed[source]
        decoder = compile_decode(model, max_cache_len=decode_ids[0].shape[1] + steps + 1)
        others[name] = (lambda ids, d=decoder: compiled_decode_tps(d, ids, steps), BATCHES, linear_bytes(model),
                        kv_bytes_per_token(model))
        rows.append({"name": name, "same_model_as": source})
    reason = unavailable() if llamacpp_gguf is not None else "no GGUF of this model given"
    if reason is None:
        llama = LlamaCpp(llamacpp_gguf, torch.get_num_threads(), decode_ids[0].shape[1] + steps + 8)
        others[LLAMACPP] = (lambda ids: llama.decode_tps(ids[0].tolist(), steps), (1,),
                            gguf_bytes(llamacpp_gguf), llama.kv_bytes_per_token())
        rows.append({"name": LLAMACPP, "gguf": str(llamacpp_gguf), "threads": torch.get_num_threads()})
    else:
        skipped[LLAMACPP] = reason
    return others, skipped, llama


def uniform_neighbours(rows: list[dict], budget: float) -> tuple[dict | None, dict | None]:
    """The uniform rows on both sides of ``budget``: the largest with bits per weight ≤ ``budget`` and
    the smallest with ≥ ``budget`` (the same row when one sits exactly on it; None where no row is)."""
    uniform = [r for r in rows if r.get("method") == "uniform"]
    if not uniform:
        raise ValueError("no uniform rows to compare with")
    below = [r for r in uniform if r["bits_per_weight"] <= budget]
    above = [r for r in uniform if r["bits_per_weight"] >= budget]
    return (max(below, key=lambda r: r["bits_per_weight"]) if below else None,
            min(above, key=lambda r: r["bits_per_weight"]) if above else None)


def best_q4_row(rows: list[dict], batch: int) -> str:
    """The name of splice's fastest uniform 4-bit row at ``batch`` (eager or compiled, float or int8
    activations, either attention)."""
    names = ("uniform4", A8, FAST, *(COMPILED[n] for n in ("uniform4", A8, FAST)))
    timed = [r for r in rows if r["name"] in names and f"decode_tps_b{batch}" in r]
    return max(timed, key=lambda r: r[f"decode_tps_b{batch}"])["name"]


def ratios(rows: list[dict]) -> dict[str, float]:
    """The report's ratios (module docstring) from its rows (those of mixed rows only when present)."""
    by = {r["name"]: r for r in rows}
    bf16, fp32, q4 = by["bf16"], by["fp32"], by["uniform4"]
    out = {"q4_decode_speedup": q4["decode_tps_b1"] / bf16["decode_tps_b1"]}
    out |= {f"q4_decode_speedup_b{b}": q4[f"decode_tps_b{b}"] / bf16[f"decode_tps_b{b}"]
            for b in BATCHES[1:] if f"decode_tps_b{b}" in q4}
    a8 = by[A8]

    def fastest(name: str, b: int) -> float:  # the eager row or its compiled row, whichever is faster
        return max(by[n][f"decode_tps_b{b}"] for n in (name, COMPILED[name]) if n in by)

    timed_batches = [b for b in BATCHES if f"decode_tps_b{b}" in a8]
    out |= {f"q4a8_decode_speedup{'' if b == 1 else f'_b{b}'}": fastest(A8, b) / bf16[f"decode_tps_b{b}"]
            for b in timed_batches}
    out |= {f"q4a8_vs_q4_b{b}": a8[f"decode_tps_b{b}"] / q4[f"decode_tps_b{b}"] for b in timed_batches}
    out["q4a8_ppl_ratio"] = a8["ppl"] / q4["ppl"]
    if COMPILED["uniform4"] in by:
        out |= {f"q4_compiled_vs_eager_b{b}": by[COMPILED["uniform4"]][f"decode_tps_b{b}"] / q4[f"decode_tps_b{b}"]
                for b in BATCHES}
    if FAST in by:
        out |= {f"splice_attention_speedup_b{b}": by[SPLICE_ATTENTION["bf16"]][f"decode_tps_b{b}"]
                / bf16[f"decode_tps_b{b}"] for b in timed_batches}
        out |= {f"q4_best_decode_speedup_b{b}": by[best_q4_row(rows, b)][f"decode_tps_b{b}"] / bf16[f"decode_tps_b{b}"]
                for b in timed_batches}
    if LLAMACPP in by:
        out["q4_vs_llamacpp_b1"] = by[best_q4_row(rows, 1)]["decode_tps_b1"] / by[LLAMACPP]["decode_tps_b1"]
        out["q4a8_vs_llamacpp_b1"] = fastest(A8, 1) / by[LLAMACPP]["decode_tps_b1"]
    out |= {"q4_decode_vs_fp32_b1": q4["decode_tps_b1"] / fp32["decode_tps_b1"],
            "q4_decode_vs_fp32_b8": q4["decode_tps_b8"] / fp32["decode_tps_b8"],
            "uniform3_ppl_ratio": by["uniform3"]["ppl"] / bf16["ppl"]}
    if "gptq-measured3.5" in by:
        out |= {"gptq_uniform3_ppl_ratio": by["gptq-uniform3"]["ppl"] / bf16["ppl"],
                "gptq_mixed35_ppl_ratio": by["gptq-measured3.5"]["ppl"] / bf16["ppl"],
                "gptq_mixed425_ppl_ratio": by["gptq-measured4.25"]["ppl"] / bf16["ppl"],
                "gptq_mixed425_vs_grid": by["gptq-measured4.25"]["ppl"] / by[GRID]["ppl"]}
        if "measured4.25" in by:
            out["gptq_mixed425_vs_hqq"] = by["gptq-measured4.25"]["ppl"] / by["measured4.25"]["ppl"]
    if "sliderquant-measured3.5" in by:
        slider3, slider35 = by["sliderquant-uniform3"]["ppl"], by["sliderquant-measured3.5"]["ppl"]
        out |= {"sliderquant_uniform3_ppl_ratio": slider3 / bf16["ppl"],
                "sliderquant_mixed35_ppl_ratio": slider35 / bf16["ppl"],
                "sliderquant_uniform3_vs_gptq": slider3 / by["gptq-uniform3"]["ppl"],
                "sliderquant_mixed35_vs_gptq": slider35 / by["gptq-measured3.5"]["ppl"]}
    if "measured3.5" not in by:
        return out
    out |= {"mixed35_ppl_ratio": by["measured3.5"]["ppl"] / bf16["ppl"],
            "mixed425_ppl_ratio": by["measured4.25"]["ppl"] / bf16["ppl"],
            "mixed35_bytes_ratio": by["measured3.5"]["model_bytes"] / bf16["model_bytes"]}
    for t in BUDGETS:
        tag, measured = str(t).replace(".", ""), by[f"measured{t}"]["ppl"]
        for side, row in zip(("below", "above"), uniform_neighbours(rows, t)):
            if row is None:
                continue
            out[f"measured{tag}_ppl_vs_uniform_{side}"] = measured / row["ppl"]
            out[f"measured{tag}_beats_uniform_{side}"] = float(measured < row["ppl"])
        out[f"measured{tag}_beats_random"] = float(measured < by[f"random{t}"]["ppl"])
    return out
