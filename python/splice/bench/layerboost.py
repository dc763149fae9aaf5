"""``splice bench attention --method layerboost``: a searched per-layer attention policy against
controls of the same cost, on quality (no timed rows).

Configurations: ``full`` (the unpatched model); ``layerboost`` (the policy from ``splice search
attention``); ``tiered`` (the paper's rule at the same cost: layers ranked by the KL of removing
their attention, see :func:`~splice.tools.layer_policy_search.tiered_like`); ``random{s}`` (the
policy's choices shuffled over layers with seed ``s``: the same cost, since every layer costs the
same).

* WikiText-2 perplexity on ``ppl_windows`` windows of ``ppl_length`` tokens that start after the
  policy's calibration tokens (held out), and the KL to the unpatched model there;
* pass-key accuracy at ``contexts`` (none: skipped).

Ratios: ``layerboost_ppl_ratio`` and ``tiered_ppl_ratio`` (÷ full), ``random_ppl_ratio_median``,
``layerboost_beats_random`` (the share of random seeds whose perplexity is higher than the
policy's) and ``layerboost_beats_tiered`` (1.0 or 0.0).
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..hybrid.layer_policy import LayerPolicy, choice_costs
from ..patch import patch
from ..tools.calibration_text import held_out_offset, log_probs, wikitext_windows
from ..tools.layer_policy_search import policy_quality, tiered_like
from ..tools.passkey import passkey_accuracy, passkey_set
from .output import provenance


def configurations(policy: LayerPolicy, seeds: int) -> dict[str, LayerPolicy | None]:
    """Each configuration's policy (module docstring); None: the unpatched model."""
    out = {"full": None, "layerboost": policy, "tiered": tiered_like(policy)}
    out.update({f"random{s}": policy.shuffled(s) for s in range(seeds)})
    return out


def run(model, tokenizer, policy: LayerPolicy, seeds: int = 3, ppl_windows: int = 4, ppl_length: int = 512,
        contexts=(), samples: int = 3, batch_size: int = 4, progress: bool = True) -> dict:
    """The report (module docstring)."""
    adapter = Adapter(model)
    policy.validate_for(adapter)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    configs = configurations(policy, seeds)
    offset = held_out_offset(policy.report, ppl_length, "splice search attention")
    windows = wikitext_windows(tokenizer, ppl_windows, ppl_length, offset)
    tasks = {n: passkey_set(tokenizer, n, samples, seed=100) for n in contexts}
    reference = log_probs(model, windows, batch_size)
    costs = choice_costs(adapter, policy.report.get("context", 8192), policy.sinks, policy.window)
    full_cost = costs["full"] * adapter.num_layers
    rows = []
    for name, config in tqdm(configs.items(), desc="layer policies", disable=not progress):
        ppl, kl = policy_quality(model, config, windows, reference, batch_size)
        row = {"name": name, "choices": (config or LayerPolicy(adapter.num_layers)).choices, "ppl": ppl, "kl": kl,
               "cost_fraction": 1.0 if config is None else config.cost(costs) / full_cost}
        if tasks:
            with patch(model, policy=config) if config is not None else nullcontext():
                row["passkey"] = {str(n): passkey_accuracy(model, tokenizer, t) for n, t in tasks.items()}
        rows.append(row)
    by = {r["name"]: r for r in rows}
    full, ours, randoms = by["full"]["ppl"], by["layerboost"]["ppl"], [by[f"random{s}"]["ppl"] for s in range(seeds)]
    ratios = {"layerboost_ppl_ratio": ours / full, "tiered_ppl_ratio": by["tiered"]["ppl"] / full,
              "random_ppl_ratio_median": statistics.median(randoms) / full,
              "layerboost_beats_random": sum(r > ours for r in randoms) / seeds,
              "layerboost_beats_tiered": float(by["tiered"]["ppl"] > ours)}
    return {
        "benchmark": "attention-layerboost", "model": adapter.name, "architecture": adapter.describe(), **provenance(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "sinks": policy.sinks,
        "window": policy.window, "budget": policy.report.get("budget"), "context": policy.report.get("context"),
        "calibration": policy.report["calibration"], "ppl_windows": ppl_windows, "ppl_length": ppl_length,
        "ppl_offset_tokens": offset * ppl_length,
        "contexts": list(contexts), "samples": samples, "seeds": seeds, "rows": rows, "ratios": ratios,
        "timing": "not measured (quality only)",
    }
