"""``splice bench quant``: quality, size and decode speed of quantized models, in one run.

Rows, every one scored on the same held-out WikiText-2 windows:

* ``fp32`` (the loaded model, the reference of every KL) and ``bf16`` (it cast to bfloat16: the
  baseline of every ratio);
* ``uniform`` 8, 4 and 3 bits (group 64);
* ``mixed`` at 3.5 and 4.25 bits per weight by each allocation method: ``measured`` (choosing
  2, 3 or 4 bits and group size 32, 64 or 128), ``measured-g64`` (bits only, group 64: the same costs
  without the group-size choice), ``lim``, ``zd`` and ``random`` (the control; perplexity is the
  median over seeds, speed and bytes are the first seed's).

Quantized rows are planned and quantized from the fp32 weights, then cast to bfloat16 like the
baseline (activations and dense weights in bf16; codes, fp16 scales and zero points as packed).
Each row reports perplexity, KL to fp32, ``model_bytes`` (every parameter and buffer the model
holds, shared storage once; the input embedding stays dense), ``linear_bytes`` (the Linear
weights only) and decode tokens/s at batch 1 and 8.

Ratios (medians, same run, ÷ bf16): ``q4_decode_speedup`` (and ``_b8``), ``uniform3_ppl_ratio``,
``mixed35_ppl_ratio`` and ``mixed425_ppl_ratio`` (measured), ``mixed35_bytes_ratio``, and
``measured{35,425}_beats_{uniform,random}`` (1.0 when measured allocation has the lower perplexity).
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..tools.calibration_text import evaluate, log_probs, wikitext_windows
from ..quant.allocate import plan_for
from ..quant.apply import quantize_model
from ..quant.linear import QuantLinear
from ..quant.plan import quantizable
from ..tools.quant_sensitivity import Measurements, measure
from .output import machine, pyplot, save_figure
from .timing import decode_tps

BUDGETS = (3.5, 4.25)
UNIFORM = (8, 4, 3)
GROUP = 64
MEASURED_GROUPS = (32, 64, 128)
MEASURED_WIDTHS = (2, 3, 4)  # 8 bits (8.5+ bits/weight) cannot pay for itself under these budgets
SCORED = ("lim", "zd", "random")


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


def _speed(model, decode_ids, steps: int, repeats: int) -> dict:
    return {f"decode_tps_b{ids.shape[0]}": statistics.median(decode_tps(model, ids, steps) for _ in range(repeats))
            for ids in decode_ids}


def _row(name, model, evals, reference, decode_ids, steps, repeats, plan=None, timed=True) -> dict:
    ppl, kl = evaluate(model, evals, reference)
    row = {"name": name, "ppl": ppl, "kl": kl, "model_bytes": model_bytes(model), "linear_bytes": linear_bytes(model)}
    if plan is not None:
        row.update(bits_per_weight=plan.bits_per_weight(), plan=plan.summary())
    if timed:
        row.update(_speed(model, decode_ids, steps, repeats))
    return row


def _quantized(model, plan, quantizer):
    q = copy.deepcopy(model)
    quantize_model(q, plan, quantizer)
    return q.to(torch.bfloat16)


def run(model, tokenizer, calib_windows: int = 2, calib_length: int = 128, eval_windows: int = 4,
        eval_length: int = 512, steps: int = 32, repeats: int = 3, seeds: int = 3, quantizer: str = "hqq",
        measurements_path=None, progress: bool = True) -> dict:
    """The report (module docstring); ``model`` is the fp32 model (left unchanged).

    ``measurements_path``: a measurement file to reuse when it exists (widths 2, 3, 4 at group sizes
    32, 64, 128; measured allocation chooses among the formats it holds), else where the
    measurements made here are written.
    """
    adapter = Adapter(model)
    calib = wikitext_windows(tokenizer, calib_windows, calib_length)
    offset = -(-calib_windows * calib_length // eval_length)  # held-out windows start after the calibration text
    evals = wikitext_windows(tokenizer, eval_windows, eval_length, offset=offset)
    decode_ids = [evals[:1, :64], evals[torch.arange(8) % eval_windows, :64]]
    if measurements_path is not None and Path(measurements_path).is_file():
        measurements = Measurements.load(measurements_path)
        measurements.check_model(model)
    else:
        measurements = measure(model, calib, MEASURED_WIDTHS, MEASURED_GROUPS, quantizer, progress=progress)
        if measurements_path is not None:
            measurements.save(measurements_path)
    reference = log_probs(model, evals)
    jobs = [("fp32", None, None), ("bf16", None, None)]
    jobs += [(f"uniform{b}", "uniform", b + 32 / GROUP) for b in UNIFORM]
    jobs += [(f"{m}{t}", m, t) for t in BUDGETS for m in ("measured", "measured-g64", *SCORED)]
    rows = []
    for name, method, target in tqdm(jobs, desc="quantized models", disable=not progress):
        if method is None:
            m = model if name == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
            rows.append(_row(name, m, evals, reference, decode_ids, steps, repeats))
            continue
        seeds_here = range(seeds) if method == "random" else [0]
        found = []
        for seed in seeds_here:
            groups = MEASURED_GROUPS if method == "measured" else (GROUP,)
            plan = plan_for(model, method.removesuffix("-g64"), target, measurements, GROUP, seed=seed,
                            group_sizes=groups)
            found.append(_row(name, _quantized(model, plan, quantizer), evals, reference, decode_ids, steps, repeats,
                              plan, timed=seed == 0))
        row = found[0]
        if len(found) > 1:
            row["ppl_by_seed"] = [r["ppl"] for r in found]
            row["ppl"] = statistics.median(row["ppl_by_seed"])
        rows.append({**row, "method": method, "target_bpw": target})
    by = {r["name"]: r for r in rows}
    bf16 = by["bf16"]
    ratios = {
        "q4_decode_speedup": by["uniform4"]["decode_tps_b1"] / bf16["decode_tps_b1"],
        "q4_decode_speedup_b8": by["uniform4"]["decode_tps_b8"] / bf16["decode_tps_b8"],
        "uniform3_ppl_ratio": by["uniform3"]["ppl"] / bf16["ppl"],
        "mixed35_ppl_ratio": by["measured3.5"]["ppl"] / bf16["ppl"],
        "mixed425_ppl_ratio": by["measured4.25"]["ppl"] / bf16["ppl"],
        "mixed35_bytes_ratio": by["measured3.5"]["model_bytes"] / bf16["model_bytes"],
    }
    for t in BUDGETS:
        tag = str(t).replace(".", "")
        uniform = max((r for r in rows if r.get("method") == "uniform" and r["bits_per_weight"] <= t),
                      key=lambda r: r["bits_per_weight"])
        ratios[f"measured{tag}_beats_uniform"] = float(by[f"measured{t}"]["ppl"] < uniform["ppl"])
        ratios[f"measured{tag}_beats_random"] = float(by[f"measured{t}"]["ppl"] < by[f"random{t}"]["ppl"])
    return {
        "benchmark": "quant", "model": adapter.name, "architecture": adapter.describe(), "machine": machine(),
        "quantizer": quantizer, "eval_tokens": evals.numel(), "calibration_tokens": calib.numel(),
        "repeats": repeats, "decode_steps": steps, "random_seeds": seeds, "rows": rows, "ratios": ratios,
    }


def table(report: dict) -> str:
    lines = ["| model | bits/weight | perplexity | KL to fp32 | model MiB | decode tok/s b1 | decode tok/s b8 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ("32" if r["name"] == "fp32" else "16")
        lines.append(f"| {r['name']} | {bpw} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['model_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tps_b1']:.1f} | {r['decode_tps_b8']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Perplexity against bits per weight: uniform widths, each mixed method, bf16 as a line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bf16 = next(r for r in report["rows"] if r["name"] == "bf16")
    ax.axhline(bf16["ppl"], color="#888888", linestyle=":", label="bf16")
    methods = dict.fromkeys(r["method"] for r in report["rows"] if "method" in r)
    for method in methods:
        rows = sorted((r for r in report["rows"] if r.get("method") == method), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], marker="o", label=method,
                linestyle="--" if method == "random" else "-")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales and zero points included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=8)
    ax.set_title(f"splice bench quant — {report['model']}")
    save_figure(fig, path)
