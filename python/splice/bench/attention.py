"""``splice bench attention``: retrieval, perplexity, KV memory and speed of hybrid attention, in one run.

Configurations: ``full`` attention; ``hybrid25`` / ``hybrid50``, the measured head map keeping
25% / 50% of the KV heads full (the highest head scores, see :mod:`splice.tools.head_profile`);
``random25`` / ``random50``, as many full heads chosen at random (the control, same sinks and
window).

* pass-key accuracy at each context length (greedy exact match, keys at depths 0.1 .. 0.9), every
  configuration;
* WikiText-2 perplexity on windows of ``ppl_length`` tokens, every configuration;
* at the longest context, for full and the measured maps: prefill seconds (batch 1), KV-cache bytes
  after that prefill (the bytes the cache's tensors hold, streaming stores included) and decode
  tokens/s at batch 1 (median of ``repeats`` runs of ``steps`` steps over one prefilled cache); at
  batch 4 too for full and ``hybrid25`` (the ratio's pair: a batch-4 prefill at 8K is minutes here).

Ratios (÷ full, same run): ``hybrid25_kv_bytes``, ``hybrid25_decode_8k_speedup`` (batch 4; ``_b1``
too), ``hybrid25_prefill_8k_speedup``, ``hybrid25_passkey_ratio`` (mean accuracy over the
contexts), ``hybrid25_ppl_ratio``, and ``hybrid{25,50}_beats_random`` (1.0 when the measured map's
mean accuracy is higher, 0.5 when tied).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..tools.passkey import passkey_accuracy, passkey_set
from ..tools.calibration_text import perplexity, wikitext_windows
from ..hybrid.head_map import HeadMap
from ..patch import patch
from ..runtime.kv_cache import kv_bytes
from .output import machine, pyplot, save_figure
from .timing import make_batch

FRACTIONS = (0.25, 0.50)
BATCH4 = ("full", "hybrid25")


def configurations(scored: HeadMap, seed: int = 0) -> dict[str, HeadMap | None]:
    out: dict[str, HeadMap | None] = {"full": None}
    for f in FRACTIONS:
        measured = HeadMap.from_scores(scored.scores, f, scored.sinks, scored.window, scored.model, scored.kind)
        out[f"hybrid{round(f * 100)}"] = measured
        out[f"random{round(f * 100)}"] = measured.random_like(seed)
    return out


@torch.inference_mode()
def long_context(model, ids: torch.Tensor, steps: int, repeats: int) -> dict:
    """Prefill ``ids`` [B, n] once (timed), then ``repeats`` timed runs of ``steps`` greedy decode steps."""
    batch, length = ids.shape
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    nbytes, runs = kv_bytes(cache), []
    for r in range(repeats):
        start = time.perf_counter()
        for step in range(steps):
            position = torch.full((batch, 1), length + r * steps + step, dtype=torch.long)
            out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        runs.append(batch * steps / (time.perf_counter() - start))
    return {"prefill_s": prefill, "kv_bytes": nbytes, "decode_tps": statistics.median(runs), "decode_runs": runs}


def run(model, tokenizer, scored: HeadMap, contexts=(2048, 4096, 8192), samples: int = 3, ppl_windows: int = 2,
        ppl_length: int = 2048, steps: int = 16, repeats: int = 3, progress: bool = True) -> dict:
    """The report (module docstring); ``scored``: a head map holding head scores for this model."""
    adapter = Adapter(model)
    scored.validate_for(adapter)
    if scored.scores is None:
        raise ValueError("the head map holds no scores; make one with 'splice profile heads'")
    configs = configurations(scored)
    tasks = {n: passkey_set(tokenizer, n, samples, seed=100) for n in contexts}
    windows = wikitext_windows(tokenizer, ppl_windows, ppl_length)
    longest = max(contexts)
    vocab = adapter.config.vocab_size
    rows = []
    for name, heads in tqdm(configs.items(), desc="attention configurations", disable=not progress):
        row = {"name": name, "full_fraction": 1.0 if heads is None else heads.full_fraction}
        with patch(model, heads=heads) if heads is not None else nullcontext():
            row["passkey"] = {str(n): passkey_accuracy(model, tokenizer, t) for n, t in tasks.items()}
            row["ppl"] = perplexity(model, windows, batch_size=1)
            if not name.startswith("random"):
                for batch in (1, 4) if name in BATCH4 else (1,):
                    row[f"b{batch}"] = long_context(model, make_batch(batch, longest, vocab), steps, repeats)
        row["passkey_mean"] = statistics.mean(row["passkey"].values())
        rows.append(row)
    by = {r["name"]: r for r in rows}
    full, h25 = by["full"], by["hybrid25"]
    ratios = {
        "hybrid25_kv_bytes": h25["b1"]["kv_bytes"] / full["b1"]["kv_bytes"],
        "hybrid25_decode_8k_speedup": h25["b4"]["decode_tps"] / full["b4"]["decode_tps"],
        "hybrid25_decode_8k_speedup_b1": h25["b1"]["decode_tps"] / full["b1"]["decode_tps"],
        "hybrid25_prefill_8k_speedup": full["b1"]["prefill_s"] / h25["b1"]["prefill_s"],
        "hybrid25_passkey_ratio": (h25["passkey_mean"] / full["passkey_mean"] if full["passkey_mean"]
                                   else float("nan")),
        "hybrid25_ppl_ratio": h25["ppl"] / full["ppl"],
    }
    for f in FRACTIONS:
        tag = round(f * 100)
        ours, control = by[f"hybrid{tag}"]["passkey_mean"], by[f"random{tag}"]["passkey_mean"]
        ratios[f"hybrid{tag}_beats_random"] = 1.0 if ours > control else 0.5 if ours == control else 0.0
    return {
        "benchmark": "attention", "model": adapter.name, "architecture": adapter.describe(), "machine": machine(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "contexts": list(contexts),
        "samples": samples, "sinks": scored.sinks, "window": scored.window, "long_context": longest,
        "ppl_tokens": windows.numel(), "decode_steps": steps, "repeats": repeats, "rows": rows, "ratios": ratios,
    }


def table(report: dict) -> str:
    contexts = report["contexts"]
    head = " | ".join(f"pass-key {n // 1024}K" for n in contexts)
    n = report["long_context"] // 1024
    lines = [f"| attention | full heads | {head} | perplexity | KV MiB at {n}K | prefill s at {n}K | "
             f"decode tok/s {n}K b1 | decode tok/s {n}K b4 |",
             "|---|---:|" + "---:|" * (len(contexts) + 5)]
    for r in report["rows"]:
        acc = " | ".join(f"{r['passkey'][str(c)]:.2f}" for c in contexts)
        b1, b4 = r.get("b1"), r.get("b4")
        long = (f"{b1['kv_bytes'] / 2**20:.1f} | {b1['prefill_s']:.1f} | {b1['decode_tps']:.1f}" if b1 else "— | — | —")
        long += f" | {b4['decode_tps']:.1f}" if b4 else " | —"
        lines.append(f"| {r['name']} | {r['full_fraction']:.0%} | {acc} | {r['ppl']:.2f} | {long} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Pass-key accuracy against context per configuration, and decode tokens/s at the longest context."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    contexts = report["contexts"]
    for i, r in enumerate(report["rows"]):  # shrinking lines and markers: equal accuracies stay visible
        ax1.plot([c // 1024 for c in contexts], [r["passkey"][str(c)] for c in contexts], marker="osD^v"[i % 5],
                 markersize=10 - 1.5 * i, linewidth=3.5 - 0.6 * i, label=r["name"],
                 linestyle="--" if r["name"].startswith("random") else "-")
    ax1.set_xlabel("context (K tokens)")
    ax1.set_ylabel("pass-key accuracy")
    ax1.legend(fontsize=8)
    timed = [r for r in report["rows"] if "b1" in r]
    width = 0.38
    for i, batch in enumerate(("b1", "b4")):
        shown = [(j, r[batch]["decode_tps"]) for j, r in enumerate(timed) if batch in r]
        ax2.bar([j + (i - 0.5) * width for j, _ in shown], [v for _, v in shown], width, label=f"batch {batch[1:]}")
    ax2.set_xticks(range(len(timed)), [r["name"] for r in timed])
    ax2.set_ylabel(f"decode tokens/s at {report['long_context'] // 1024}K")
    ax2.legend(fontsize=8)
    fig.suptitle(f"splice bench attention — {report['model']} ({report['dtype']})")
    save_figure(fig, path)
