"""``splice bench attention --method gemfilter``: GemFilter against the unpatched model, in one run.

The selection layer is chosen first (unless given) by :func:`splice.tools.gemfilter_layer.choose_layer`
on ``calibration`` pass-key prompts at the longest context, seeds the evaluation never uses; the
filter keeps ``keep`` tokens and always the question (``tail``: its tokens).

* pass-key accuracy at each context (greedy exact match, keys at depths 0.1 .. 0.9), ``full`` (the
  unpatched model's ``generate``) and ``gemfilter`` (:func:`splice.gemfilter_generate`);
* at the longest context, batch 1, interleaved round by round after a discarded warm-up round:
  prefill seconds (GemFilter's includes its selection pass: time to the first token), KV-cache
  bytes after it, and decode tokens/s over that cache (``steps`` greedy steps per run).

Perplexity is not reported: GemFilter changes the prompt and has no per-token logits to score.
Ratios (÷ full, same run, medians, at the longest context): ``gemfilter_prefill_speedup``,
``gemfilter_decode_speedup``, ``gemfilter_kv_bytes``, and ``gemfilter_passkey_ratio`` (mean accuracy
over the contexts).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from ..adapters.architecture import Adapter
from ..decoding.gemfilter_generate import gemfilter_generate
from ..longcontext.gemfilter import GemFilter, select
from ..tools.gemfilter_layer import choose_layer
from ..tools.passkey import passkey_accuracy, passkey_set, plain_generate, question_tokens
from .attention import LongContext
from .output import provenance
from .timing import interleaved

NAMES = ("full", "gemfilter")


def timed_rows(model, spec: GemFilter, ids: torch.Tensor, steps: int, repeats: int, progress: bool) -> dict:
    """``{name: {prefill_s, prefill_runs, kv_bytes, decode_tps, decode_runs}}`` for ``ids`` [1, n]."""
    runs = LongContext({name: model for name in NAMES})
    lanes = [(name, nullcontext) for name in NAMES]

    def prefill(name):
        start = time.perf_counter()
        prompt = ids if name == "full" else select(model, ids, None, spec).input_ids
        runs.prefill(name, prompt)
        return {"s": time.perf_counter() - start}

    first = interleaved(lanes, prefill, repeats, "prefill", progress)
    decode = interleaved(lanes, lambda name: {"tps": runs.decode(name, steps)}, repeats, "decode", progress)
    return {name: {"prefill_runs": first[name]["s"], "prefill_s": statistics.median(first[name]["s"]),
                   "kv_bytes": runs.kv_bytes(name), "decode_runs": decode[name]["tps"],
                   "decode_tps": statistics.median(decode[name]["tps"])} for name in NAMES}


def run(model, tokenizer, contexts=(4096, 8192), samples: int = 3, keep: int = 1024, layer: int | None = None,
        calibration: int = 2, steps: int = 16, repeats: int = 3, progress: bool = True) -> dict:
    """The report (module docstring)."""
    adapter = Adapter(model)
    tail, longest = question_tokens(tokenizer), max(contexts)
    choice = None
    if layer is None:
        choice = choose_layer(model, tokenizer, passkey_set(tokenizer, longest, calibration, seed=500), keep, tail)
        if choice.layer is None:
            raise RuntimeError(f"no layer keeps every calibration key with keep={keep}: raise --keep")
        layer = choice.layer
    spec = GemFilter(layer, keep, tail)
    spec.check(adapter)
    tasks = {n: passkey_set(tokenizer, n, samples, seed=100) for n in contexts}

    def filtered(m, ids, mask, **kwargs):
        return gemfilter_generate(m, ids, mask, gemfilter=spec, **kwargs)

    rows = []
    for name, generate in (("full", plain_generate), ("gemfilter", filtered)):
        passkey = {str(n): passkey_accuracy(model, tokenizer, t, generate) for n, t in tasks.items()}
        rows.append({"name": name, "passkey": passkey, "passkey_mean": statistics.mean(passkey.values())})
    by = {r["name"]: r for r in rows}
    for name, timed in timed_rows(model, spec, tasks[longest][0].ids, steps, repeats, progress).items():
        by[name]["b1"] = timed
    full, gem = by["full"], by["gemfilter"]
    ratios = {
        "gemfilter_prefill_speedup": full["b1"]["prefill_s"] / gem["b1"]["prefill_s"],
        "gemfilter_decode_speedup": gem["b1"]["decode_tps"] / full["b1"]["decode_tps"],
        "gemfilter_kv_bytes": gem["b1"]["kv_bytes"] / full["b1"]["kv_bytes"],
        "gemfilter_passkey_ratio": gem["passkey_mean"] / full["passkey_mean"] if full["passkey_mean"] else float("nan"),
    }
    return {
        "benchmark": "attention-gemfilter", "model": adapter.name, "architecture": adapter.describe(), **provenance(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "contexts": list(contexts),
        "samples": samples, "keep": keep, "tail": tail, "layer": layer, "calibration": calibration,
        "layer_kept_share": None if choice is None else choice.kept_share, "long_context": longest,
        "decode_steps": steps, "repeats": repeats, "rows": rows, "ratios": ratios,
    }
