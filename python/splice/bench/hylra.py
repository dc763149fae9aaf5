"""``splice bench attention --method hylra``: HyLRA layer reuse against the unpatched model.

Configurations: ``full`` (the unpatched model, the baseline); ``hylra`` (the policy from ``splice
search reuse``); ``random`` (as many full layers chosen at random, the same top-k: the control,
quality only).

* perplexity of WikiText-2 windows of ``ppl_length`` tokens past the policy's calibration tokens
  (held out), read as decoding reads them: the first half prefilled, the second half over the cache
  (:func:`~splice.tools.calibration_text.continuation_perplexity`; reuse acts on decoding only);
* pass-key accuracy at ``contexts`` (the answer is decoded under reuse);
* at the longest context, full and hylra: decode tokens/s at batch 1 and 4 (``steps`` greedy steps
  over one prefilled cache, interleaved round by round after a warm-up round; prefills are not
  timed: reuse leaves them unchanged) and the KV-cache bytes (reuse keeps every layer's cache).

Ratios: ``hylra_decode_8k_speedup`` (batch 4, ÷ full; ``_b1`` too), ``hylra_ppl_ratio`` and
``random_ppl_ratio`` (÷ full), ``hylra_beats_random`` (1.0 when its perplexity is lower),
``hylra_passkey_ratio`` (mean accuracy ÷ full's).
"""

from __future__ import annotations

import copy
import statistics
from contextlib import nullcontext

from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..hybrid.reuse_policy import ReusePolicy
from ..patch import patch
from ..tools.calibration_text import continuation_perplexity, held_out_offset, wikitext_windows
from ..tools.passkey import passkey_accuracy, passkey_set
from .attention import LongContext
from .output import provenance
from .timing import interleaved, make_batch

TIMED = ("full", "hylra")


def decode_rows(model, policy: ReusePolicy, vocab: int, context: int, steps: int, repeats: int,
                progress: bool) -> dict[str, dict]:
    """``{name: {"b1": {...}, "b4": {...}}}`` for full and hylra; hylra runs on a patched copy."""
    reused = copy.deepcopy(model)
    out: dict[str, dict] = {n: {} for n in TIMED}
    with patch(reused, reuse=policy):
        runs = LongContext({"full": model, "hylra": reused})
        for batch in (1, 4):
            ids = make_batch(batch, context, vocab)
            for n in TIMED:
                out[n][f"b{batch}"] = {"prefill_s": runs.prefill(n, ids), "kv_bytes": runs.kv_bytes(n)}
            timed = interleaved([(n, nullcontext) for n in TIMED], lambda n: {"tps": runs.decode(n, steps)},
                                repeats, f"decode b{batch}", progress)
            for n in TIMED:
                out[n][f"b{batch}"].update(decode_runs=timed[n]["tps"], decode_tps=statistics.median(timed[n]["tps"]))
            runs.state.clear()
    return out


def run(model, tokenizer, policy: ReusePolicy, contexts=(2048, 4096, 8192), samples: int = 3, ppl_windows: int = 4,
        ppl_length: int = 4096, ppl_offset: int | None = None, steps: int = 16, repeats: int = 3, seed: int = 0,
        progress: bool = True) -> dict:
    """The report (module docstring); ``ppl_offset``: the first perplexity window (in windows of
    ``ppl_length``; default and minimum: the first past the policy's calibration tokens)."""
    adapter = Adapter(model)
    policy.validate_for(adapter)
    offset = held_out_offset(policy.report, ppl_length, "splice search reuse")
    if ppl_offset is not None:
        if ppl_offset < offset:
            raise ValueError(f"ppl_offset {ppl_offset} would score windows the policy was calibrated on; "
                             f"the first held-out window is {offset}")
        offset = ppl_offset
    windows = wikitext_windows(tokenizer, ppl_windows, ppl_length, offset)
    tasks = {n: passkey_set(tokenizer, n, samples, seed=100) for n in contexts}
    configs = {"full": None, "hylra": policy, "random": policy.random_like(seed)}
    rows = []
    for name, config in tqdm(configs.items(), desc="reuse policies", disable=not progress):
        row = {"name": name, "full_layers": list(config.full_layers) if config else list(range(adapter.num_layers))}
        with patch(model, reuse=config) if config is not None else nullcontext():
            row["ppl"] = continuation_perplexity(model, windows, ppl_length // 2)
            row["passkey"] = {str(n): passkey_accuracy(model, tokenizer, t) for n, t in tasks.items()}
        row["passkey_mean"] = statistics.mean(row["passkey"].values()) if tasks else float("nan")
        rows.append(row)
    by = {r["name"]: r for r in rows}
    longest = max(contexts) if contexts else 8192
    for name, timed in decode_rows(model, policy, adapter.config.vocab_size, longest, steps, repeats,
                                   progress).items():
        by[name].update(timed)
    full, ours = by["full"], by["hylra"]
    ratios = {
        "hylra_decode_8k_speedup": ours["b4"]["decode_tps"] / full["b4"]["decode_tps"],
        "hylra_decode_8k_speedup_b1": ours["b1"]["decode_tps"] / full["b1"]["decode_tps"],
        "hylra_ppl_ratio": ours["ppl"] / full["ppl"],
        "random_ppl_ratio": by["random"]["ppl"] / full["ppl"],
        "hylra_beats_random": float(ours["ppl"] < by["random"]["ppl"]),
        "hylra_passkey_ratio": (ours["passkey_mean"] / full["passkey_mean"] if full["passkey_mean"]
                                else float("nan")),
    }
    return {
        "benchmark": "attention-hylra", "model": adapter.name, "architecture": adapter.describe(), **provenance(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "topk": policy.topk,
        "full_layers": list(policy.full_layers), "calibration": policy.report["calibration"],
        "ppl_windows": ppl_windows, "ppl_length": ppl_length, "ppl_offset_tokens": offset * ppl_length,
        "contexts": list(contexts), "long_context": longest, "samples": samples, "decode_steps": steps,
        "repeats": repeats, "rows": rows, "ratios": ratios,
    }
