"""Fitting CAST conditions (Lee et al. 2024) from two prompt sets: a condition direction per
candidate layer, then the (layer, threshold, comparison) with the best F1 on prompts the direction
did not see; reported on a third, held-out part.

* Activations: each prompt's hidden state at the *input* of layer ``l``, pooled by
  :func:`splice.steering.gates.pool` (the function the condition runs at prefill): the mean over
  its tokens but the first, or its last token.
* Direction: ``c_l = mean(positive) − mean(negative)`` over the direction part. CAST takes
  the first principal component of the centred activations instead; with unpaired sets the
  difference of class means is the direction a linear read-out needs (ITI's mass-mean probe),
  and it needs no sign fix.
* Score: CAST's ``cos(h, tanh(⟨h, ĉ⟩ ĉ))`` (:func:`splice.steering.gates.cast_score`).
* Threshold and layer: CAST grid-searches both by F1 on the prompts the direction came from,
  which here gives F1 = 1 at almost every layer (the direction is fitted to those very prompts)
  and says nothing about which layer generalises. splice splits each set three ways: the
  direction is fitted on the first part, the threshold (every midpoint between consecutive
  scores, compared ``above`` and ``below``) and the layer are chosen by F1 on the second (ties:
  the earlier layer, so more layers can be steered on the prompt itself), and the third part,
  never used, gives the reported held-out F1, TPR and FPR. (Refitting the direction on both parts,
  or cross-fitting, moves the scores by more than the classes' margin: CAST's score separates the
  classes by a few thousandths of its range.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..runtime.token_state import prompt_token_mask
from ..steering.gates import REDUCES, Condition, cast_score, pool
from ..vectors.extract import num_layers

MIN_PER_SET = 4  # prompts per set and split: fewer cannot place a threshold


@dataclass
class Rates:
    f1: float
    tpr: float
    fpr: float
    precision: float

    @classmethod
    def of(cls, predicted: torch.Tensor, truth: torch.Tensor) -> "Rates":
        tp = float((predicted & truth).sum())
        fp = float((predicted & ~truth).sum())
        fn = float((~predicted & truth).sum())
        tn = float((~predicted & ~truth).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        tpr = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
        return cls(f1=f1, tpr=tpr, fpr=fp / (fp + tn) if fp + tn else 0.0, precision=precision)


def best_threshold(scores: torch.Tensor, truth: torch.Tensor) -> tuple[float, str, Rates]:
    """The (threshold, compare) with the best F1 of ``scores`` [N] against ``truth`` [N] bool."""
    values = scores.sort().values
    candidates = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    best = None
    for threshold in candidates.tolist():
        for compare in ("above", "below"):
            predicted = scores > threshold if compare == "above" else scores < threshold
            rates = Rates.of(predicted, truth)
            if best is None or rates.f1 > best[2].f1:
                best = (threshold, compare, rates)
    return best


def condition_activations(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], reduce: str,
                          batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """[len(prompts), len(layers), H]: each prompt's input of each layer, pooled as a Condition
    pools it at prefill (left padding, position ids counting real tokens)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="activations"):
                enc = tokenizer(list(prompts[start:start + batch_size]), padding=True, return_tensors="pt")
                ids, attention = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
                positions = (attention.long().cumsum(1) - 1).clamp(min=0)
                hidden = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                               output_hidden_states=True, use_cache=False).hidden_states
                mask = prompt_token_mask(attention.sum(1), ids.shape[1])
                out.append(torch.stack([pool(hidden[l], mask, reduce) for l in layers], 1).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


def split(prompts: Sequence[str], fractions: Sequence[float], generator: torch.Generator) -> list[list[str]]:
    """``prompts`` shuffled and cut into consecutive parts of the given ``fractions``."""
    order = torch.randperm(len(prompts), generator=generator).tolist()
    cuts = [round(len(prompts) * sum(fractions[:i])) for i in range(len(fractions) + 1)]
    return [[prompts[i] for i in order[cuts[k]:cuts[k + 1]]] for k in range(len(fractions))]


def fit_condition(model, tokenizer, positive: Sequence[str], negative: Sequence[str],
                  layers: Sequence[int] | None = None, reduce: str = "mean", held_out: float = 1 / 3,
                  seed: int = 0, batch_size: int = 8, progress: bool = True) -> tuple[Condition, dict]:
    """A :class:`Condition` that is met on prompts like ``positive`` and not on ``negative``, and a
    report (per-layer F1 on the threshold split, the chosen layer's held-out F1, TPR and FPR)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    n_layers = num_layers(model)
    layers = sorted(set(layers)) if layers is not None else list(range(1, n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{n_layers - 1}")
    g = torch.Generator().manual_seed(seed)
    fit = (1.0 - held_out) / 2
    parts = {name: split(prompts, (fit, fit, held_out), g) for name, prompts in (("positive", positive),
                                                                                  ("negative", negative))}
    short = {f"{name} {part}": len(p) for name, ps in parts.items()
             for part, p in zip(("direction", "threshold", "held-out"), ps) if len(p) < MIN_PER_SET}
    if short:
        raise ValueError(f"too few prompts: {short}; each set needs at least {MIN_PER_SET} prompts in each of its "
                         f"three parts (direction, threshold, held-out): {3 * MIN_PER_SET} per set at the defaults")
    (pos_d, pos_t, pos_h), (neg_d, neg_t, neg_h) = parts["positive"], parts["negative"]
    groups = [pos_d, neg_d, pos_t, neg_t, pos_h, neg_h]
    acts = condition_activations(model, tokenizer, [p for grp in groups for p in grp], layers, reduce, batch_size,
                                 progress)
    bounds = torch.tensor([0] + [len(grp) for grp in groups]).cumsum(0).tolist()
    part = [slice(bounds[i], bounds[i + 1]) for i in range(len(groups))]
    truth = torch.tensor([i % 2 == 0 for i, grp in enumerate(groups) for _ in grp])
    thr_rows = slice(bounds[2], bounds[4])
    held_rows = slice(bounds[4], bounds[6])
    per_layer, best = [], None
    for j, layer in enumerate(layers):
        h = acts[:, j]
        c = h[part[0]].mean(0) - h[part[1]].mean(0)
        scores = cast_score(h, c)
        threshold, compare, rates = best_threshold(scores[thr_rows], truth[thr_rows])
        per_layer.append({"layer": layer, "threshold": threshold, "compare": compare, "threshold_split_f1": rates.f1})
        if best is None or rates.f1 > best[0].f1:
            best = (rates, layer, c, threshold, compare, scores)
    rates, layer, c, threshold, compare, scores = best
    condition = Condition(c, layer, threshold, compare, reduce)
    held = Rates.of(condition.met(scores[held_rows]), truth[held_rows])
    report = {
        "layer": layer, "threshold": threshold, "compare": compare, "reduce": reduce,
        "prompts": {"direction": [len(pos_d), len(neg_d)], "threshold": [len(pos_t), len(neg_t)],
                    "held_out": [len(pos_h), len(neg_h)]},
        "threshold_split": vars(rates), "held_out": vars(held), "per_layer": per_layer,
    }
    condition.metadata = {"held_out_f1": f"{held.f1:.4f}", "held_out_tpr": f"{held.tpr:.4f}",
                          "held_out_fpr": f"{held.fpr:.4f}"}
    return condition, report
