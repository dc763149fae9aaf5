"""``splice bench attention``: retrieval, perplexity, KV memory and speed of hybrid attention, in one run.

Configurations: ``full``, the unpatched model (the baseline); ``full-splice``, every head full but
run by splice's hybrid attention forward and kernels on every layer (``band_attention`` prefill,
``decode_attention`` decode), so the kernels' difference and the saving from streaming heads are
reported apart; ``hybrid25`` / ``hybrid50``, the measured head map keeping 25% / 50% of the KV
heads full (the highest head scores, see :mod:`splice.tools.head_profile`); ``random25`` /
``random50``, as many full heads chosen at random (the control, same sinks and window).

* pass-key accuracy at each context length (greedy exact match, keys at depths 0.1 .. 0.9), every
  configuration;
* WikiText-2 perplexity on windows of ``ppl_length`` tokens, every configuration;
* at the longest context, for full, full-splice and the measured maps: prefill seconds (batch 1),
  KV-cache bytes after that prefill (the bytes the cache's tensors hold, streaming stores
  included) and decode tokens/s at batch 1 (``steps`` steps per run over one prefilled cache); at
  batch 4 too for full, full-splice and ``hybrid25`` (the ratios' pairs: a batch-4 prefill at 8K
  is minutes here, so it is made once per configuration and not timed). Timed settings are
  interleaved round by round after a discarded warm-up round
  (:func:`splice.bench.timing.interleaved`): the batch-1 prefills, then the decode runs.

Ratios (same run, medians): ÷ full (what a user gains): ``hybrid25_kv_bytes``,
``hybrid25_decode_8k_speedup`` (batch 4; ``_b1`` too), ``hybrid25_prefill_8k_speedup``,
``hybrid25_passkey_ratio`` (mean accuracy over the contexts), ``hybrid25_ppl_ratio``,
``full_splice_decode_8k_vs_full`` (batch 4; ``_b1`` too) and ``full_splice_prefill_8k_vs_full``
(the kernels' difference); ÷ full-splice (the saving from streaming alone):
``hybrid25_decode_8k_vs_full_splice`` (batch 4; ``_b1`` too), ``hybrid25_prefill_8k_vs_full_splice``;
and ``hybrid{25,50}_beats_random`` (1.0 when the measured map's mean accuracy is higher, 0.5 when
tied).
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..hybrid.head_map import HeadMap
from ..patch import patch
from ..runtime.hybrid_attention import make_attention_forward
from ..runtime.kv_cache import kv_bytes
from ..tools.calibration_text import perplexity, wikitext_windows
from ..tools.passkey import passkey_accuracy, passkey_set
from .output import provenance
from .timing import interleaved, make_batch

FRACTIONS = (0.25, 0.50)
FULL_SPLICE = "full-splice"
TIMED = ("full", FULL_SPLICE, "hybrid25", "hybrid50")
BATCH4 = ("full", FULL_SPLICE, "hybrid25")


def configurations(scored: HeadMap, seed: int = 0) -> dict[str, HeadMap | None]:
    """Each configuration's head map (module docstring); None: the unpatched model."""
    every = {layer: set(range(scored.num_kv_heads)) for layer in range(scored.num_layers)}
    out: dict[str, HeadMap | None] = {
        "full": None,
        FULL_SPLICE: HeadMap(scored.num_layers, scored.num_kv_heads, every, scored.sinks, scored.window, scored.model,
                             kind=scored.kind)}
    for f in FRACTIONS:
        measured = HeadMap.from_scores(scored.scores, f, scored.sinks, scored.window, scored.model, scored.kind)
        out[f"hybrid{round(f * 100)}"] = measured
        out[f"random{round(f * 100)}"] = measured.random_like(seed)
    return out


@contextmanager
def splice_every_layer(model, heads: HeadMap):
    """``patch(model, heads=heads)`` with splice's hybrid attention forward on every layer, also on
    those whose heads are all full (which ``patch`` leaves to the model's own attention)."""
    with patch(model, heads=heads) as p:
        forced = [(i, layer.self_attn) for i, layer in enumerate(p.adapter.layers) if "forward" not in
                  vars(layer.self_attn)]
        for i, attn in forced:
            attn.forward = make_attention_forward(p.adapter, i, heads, p.runtime)
        try:
            yield p
        finally:
            for _, attn in forced:
                del attn.forward


def applied(model, name: str, heads: HeadMap | None):
    """The context that runs configuration ``name``."""
    if heads is None:
        return nullcontext()
    return splice_every_layer(model, heads) if name == FULL_SPLICE else patch(model, heads=heads)


class LongContext:
    """One model per configuration (``models[name]``, patched for the whole measurement: a patch
    continues only the cache of its latest prefill), that model's latest prefilled cache, and
    greedy decode runs that continue it."""

    def __init__(self, models: dict):
        self.models, self.state = models, {}

    @torch.inference_mode()
    def prefill(self, name: str, ids: torch.Tensor) -> float:
        """Prefill ``ids`` [B, n] as ``name``'s cache (replacing the earlier one); returns seconds."""
        self.state.pop(name, None)  # free the old cache first
        start = time.perf_counter()
        out = self.models[name](input_ids=ids, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
        self.state[name] = [out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), ids.shape[1]]
        return seconds

    def kv_bytes(self, name: str) -> int:
        return kv_bytes(self.state[name][0])

    @torch.inference_mode()
    def decode(self, name: str, steps: int) -> float:
        """Tokens/s of ``steps`` greedy decode steps continuing ``name``'s cache."""
        entry = self.state[name]
        cache, token, length = entry
        batch = token.shape[0]
        start = time.perf_counter()
        for step in range(steps):
            position = torch.full((batch, 1), length + step, dtype=torch.long)
            out = self.models[name](input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        seconds = time.perf_counter() - start
        entry[1:] = [token, length + steps]
        return batch * steps / seconds


def long_context_rows(model, configs: dict, vocab: int, longest: int, steps: int, repeats: int,
                      progress: bool) -> dict[str, dict]:
    """``{name: {"b1": {...}, "b4": {...}}}`` for the timed configurations (module docstring); each
    patched configuration runs on its own copy of ``model``, the unpatched one on ``model``. Batch 1
    first (prefills then decode runs, each interleaved), then batch 4 on new prefills."""
    def lane(names):
        return [(n, nullcontext) for n in names]

    out: dict[str, dict] = {n: {} for n in TIMED}
    with ExitStack() as patches:
        models = {}
        for n in TIMED:
            models[n] = model if configs[n] is None else copy.deepcopy(model)
            patches.enter_context(applied(models[n], n, configs[n]))
        runs = LongContext(models)
        ids = make_batch(1, longest, vocab)
        prefill = interleaved(lane(TIMED), lambda n: {"s": runs.prefill(n, ids)}, repeats, "prefill b1", progress)
        for n in TIMED:
            out[n]["b1"] = {"prefill_runs": prefill[n]["s"], "prefill_s": statistics.median(prefill[n]["s"]),
                            "kv_bytes": runs.kv_bytes(n)}
        decode = interleaved(lane(TIMED), lambda n: {"tps": runs.decode(n, steps)}, repeats, "decode b1", progress)
        for n in TIMED:
            out[n]["b1"].update(decode_runs=decode[n]["tps"], decode_tps=statistics.median(decode[n]["tps"]))
        ids = make_batch(4, longest, vocab)
        for n in BATCH4:
            out[n]["b4"] = {"prefill_s": runs.prefill(n, ids), "kv_bytes": runs.kv_bytes(n)}
        decode = interleaved(lane(BATCH4), lambda n: {"tps": runs.decode(n, steps)}, repeats, "decode b4", progress)
        for n in BATCH4:
            out[n]["b4"].update(decode_runs=decode[n]["tps"], decode_tps=statistics.median(decode[n]["tps"]))
    return out


def ratios(by: dict[str, dict]) -> dict[str, float]:
    """The report's ratios (module docstring) from its rows by name."""
    full, splice, h25 = by["full"], by[FULL_SPLICE], by["hybrid25"]

    def decode(row, batch="b4"):
        return row[batch]["decode_tps"]

    out = {
        "hybrid25_kv_bytes": h25["b1"]["kv_bytes"] / full["b1"]["kv_bytes"],
        "hybrid25_decode_8k_speedup": decode(h25) / decode(full),
        "hybrid25_decode_8k_speedup_b1": decode(h25, "b1") / decode(full, "b1"),
        "hybrid25_prefill_8k_speedup": full["b1"]["prefill_s"] / h25["b1"]["prefill_s"],
        "hybrid25_passkey_ratio": (h25["passkey_mean"] / full["passkey_mean"] if full["passkey_mean"]
                                   else float("nan")),
        "hybrid25_ppl_ratio": h25["ppl"] / full["ppl"],
        "full_splice_decode_8k_vs_full": decode(splice) / decode(full),
        "full_splice_decode_8k_vs_full_b1": decode(splice, "b1") / decode(full, "b1"),
        "full_splice_prefill_8k_vs_full": full["b1"]["prefill_s"] / splice["b1"]["prefill_s"],
        "hybrid25_decode_8k_vs_full_splice": decode(h25) / decode(splice),
        "hybrid25_decode_8k_vs_full_splice_b1": decode(h25, "b1") / decode(splice, "b1"),
        "hybrid25_prefill_8k_vs_full_splice": splice["b1"]["prefill_s"] / h25["b1"]["prefill_s"],
    }
    for f in FRACTIONS:
        tag = round(f * 100)
        ours, control = by[f"hybrid{tag}"]["passkey_mean"], by[f"random{tag}"]["passkey_mean"]
        out[f"hybrid{tag}_beats_random"] = 1.0 if ours > control else 0.5 if ours == control else 0.0
    return out


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
    rows = []
    for name, heads in tqdm(configs.items(), desc="attention configurations", disable=not progress):
        row = {"name": name, "full_fraction": 1.0 if heads is None else heads.full_fraction}
        with applied(model, name, heads):
            row["passkey"] = {str(n): passkey_accuracy(model, tokenizer, t) for n, t in tasks.items()}
            row["ppl"] = perplexity(model, windows, batch_size=1)
        row["passkey_mean"] = statistics.mean(row["passkey"].values())
        rows.append(row)
    by = {r["name"]: r for r in rows}
    for name, timed in long_context_rows(model, configs, adapter.config.vocab_size, longest, steps, repeats,
                                         progress).items():
        by[name].update(timed)
    return {
        "benchmark": "attention", "model": adapter.name, "architecture": adapter.describe(), **provenance(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "contexts": list(contexts),
        "samples": samples, "sinks": scored.sinks, "window": scored.window, "long_context": longest,
        "ppl_tokens": windows.numel(), "decode_steps": steps, "repeats": repeats, "rows": rows, "ratios": ratios(by),
    }
