"""PH3-style head search: which attention heads to prune so the model uses memory (or context).

PH3 (Jin et al. 2024) finds *memory heads* and *context heads* by path patching and prunes the few
with the largest effect on the knowledge-conflict margin. splice searches for them in three
measured stages on a calibration split of :mod:`~splice.tools.knowledge_conflict` prompts, with
the objective ``J = ±mean(m) + ρ·mean(log p_closed(memory answer))`` (``+`` toward context, ``−``
toward memory; ``m`` the context margin; the second term, weight ``retain`` = ρ, keeps the model's
closed-book recall so that a head everything relies on is not the one pruned):

1. *Screening* (attribution patching): one forward and backward pass with a scale ``s_lh = 1`` on
   every query head's output (site ``heads``, before ``o_proj``); ``−∂J/∂s_lh`` is the first-order
   effect of pruning head (l, h). The ``candidates`` heads with the largest effect go on.
2. *Measurement*: each candidate is pruned alone through :class:`splice.HeadScale` (the fused
   kernel) and the real change in ``J`` is recorded.
3. *Greedy selection*: candidates in order of measured gain are added to the pruned set while they
   raise ``J``, up to ``k`` heads.

Where splice departs from PH3: PH3 scores heads by path patching (the head's direct path to the
logits, patched from a corrupted run); splice screens by the gradient of the total effect of zero
ablation and then measures it, and chooses a *set* greedily rather than the top-k singles. The
held-out split reports how often the model follows the context before and after, and the
closed-book accuracy (does pruning cost the model its memory?).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..adapters.architecture import Adapter
from ..patch import patch
from ..steering.maps import HeadScale
from .knowledge_conflict import Conflict, closed_book, context_margins

DIRECTIONS = ("memory", "context")
MIN_CONFLICTS = 8  # in each split


def _sign(toward: str) -> float:
    if toward not in DIRECTIONS:
        raise ValueError(f"toward must be one of {DIRECTIONS}, got {toward!r}")
    return 1.0 if toward == "context" else -1.0


def objective(model, tokenizer, conflicts: Sequence[Conflict], toward: str, retain: float) -> torch.Tensor:
    """``J`` on the model as it is now (module docstring)."""
    value = _sign(toward) * context_margins(model, tokenizer, conflicts).mean()
    if retain:
        value = value + retain * closed_book(model, tokenizer, conflicts)[0].mean()
    return value


def pruning_attribution(model, tokenizer, conflicts: Sequence[Conflict], toward: str, retain: float) -> torch.Tensor:
    """[layers, heads]: ``−∂J/∂s`` at s = 1, the first-order gain in ``J`` from pruning each head."""
    adapter = Adapter(model)
    scales = torch.ones(adapter.num_layers, adapter.num_heads, requires_grad=True)
    hd = adapter.head_dim

    def make(layer):
        def pre_hook(module, args):
            x = args[0]
            s = scales[layer].to(x.dtype).repeat_interleave(hd)
            return (x * s,) + tuple(args[1:])
        return pre_hook

    handles = [adapter.o_proj(l).register_forward_pre_hook(make(l)) for l in range(adapter.num_layers)]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            objective(model, tokenizer, conflicts, toward, retain).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return -scales.grad.detach()


def _as_heads(pruned: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    heads: dict[int, list[int]] = {}
    for layer, head in pruned:
        heads.setdefault(layer, []).append(head)
    return heads


@torch.no_grad()
def objective_with(model, tokenizer, conflicts: Sequence[Conflict], toward: str, retain: float,
                   pruned: Sequence[tuple[int, int]]) -> float:
    """``J`` with the heads ``pruned`` ((layer, head) pairs) zeroed by splice's fused HeadScale."""
    with patch(model, HeadScale(heads=_as_heads(pruned), scale=0.0)) if pruned else nullcontext():
        return float(objective(model, tokenizer, conflicts, toward, retain))


@torch.no_grad()
def conflict_rates(model, tokenizer, conflicts: Sequence[Conflict], items: Sequence = ()) -> dict:
    """Context-follow rate, mean margin and closed-book accuracy, with ``items`` patched in."""
    with patch(model, *items) if items else nullcontext():
        m = context_margins(model, tokenizer, conflicts)
        logprob, known = closed_book(model, tokenizer, conflicts)
    return {"follows_context": float((m > 0).float().mean()), "follows_memory": float((m < 0).float().mean()),
            "mean_margin": float(m.mean()), "closed_book_accuracy": float(known.float().mean()),
            "closed_book_logprob": float(logprob.mean())}


def split_conflicts(conflicts: Sequence[Conflict], held_out: float, seed: int) -> tuple[list, list]:
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    order = list(conflicts)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * (1 - held_out))
    calib, test = order[:cut], order[cut:]
    if min(len(calib), len(test)) < MIN_CONFLICTS:
        raise ValueError(f"the head search needs at least {MIN_CONFLICTS} conflicts in each split, got "
                         f"{len(calib)} calibration and {len(test)} held-out of {len(conflicts)}")
    return calib, test


def search_heads(model, tokenizer, conflicts: Sequence[Conflict], toward: str = "memory", k: int = 8,
                 candidates: int = 24, retain: float = 1.0, held_out: float = 0.34, known_only: bool = True,
                 seed: int = 0,
                 progress: bool = True) -> tuple[HeadScale, dict]:
    """The pruned set (a :class:`HeadScale` at scale 0) and a report (module docstring).
    ``known_only`` keeps the conflicts whose fact the unpatched model answers closed-book, as PH3 does."""
    _sign(toward)
    if not (isinstance(retain, (int, float)) and retain >= 0 and math.isfinite(retain)):
        raise ValueError(f"retain must be a finite number >= 0, got {retain!r}")
    for name, value in (("k", k), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    adapter = Adapter(model)
    total = adapter.num_layers * adapter.num_heads
    if candidates > total or k > candidates:
        raise ValueError(f"need k <= candidates <= {total} (the model's query heads), got k={k}, "
                         f"candidates={candidates}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    was_training = model.training
    model.eval()
    try:
        given = len(conflicts)
        if known_only:
            with torch.no_grad():
                known = closed_book(model, tokenizer, conflicts)[1]
            conflicts = [c for c, ok in zip(conflicts, known.tolist()) if ok]
        calib, test = split_conflicts(conflicts, held_out, seed)
        gain = pruning_attribution(model, tokenizer, calib, toward, retain)
        flat = gain.flatten().topk(candidates).indices.tolist()
        screened = [(i // adapter.num_heads, i % adapter.num_heads) for i in flat]
        base = objective_with(model, tokenizer, calib, toward, retain, [])
        measured = {}
        for lh in tqdm(screened, disable=not progress, desc="PH3 measure", unit="head"):
            measured[lh] = objective_with(model, tokenizer, calib, toward, retain, [lh]) - base
        chosen, current, steps = [], base, []
        for lh in tqdm(sorted(screened, key=lambda h: -measured[h]), disable=not progress, desc="PH3 select",
                       unit="head"):
            if len(chosen) == k or measured[lh] <= 0:
                break
            value = objective_with(model, tokenizer, calib, toward, retain, chosen + [lh])
            if value > current:
                chosen.append(lh)
                current = value
                steps.append({"head": list(lh), "objective": value})
        if not chosen:
            raise ValueError(f"no head's pruning moved the model toward {toward} on the calibration split")
        pruned = HeadScale(heads=_as_heads(chosen), scale=0.0, name=f"ph3_{toward}")
        report = {"toward": toward, "k": k, "candidates": candidates, "retain": retain, "conflicts_given": given,
                  "known_only": known_only, "calibration_conflicts": len(calib),
                  "held_out_conflicts": len(test), "objective_base": base, "objective_pruned": current,
                  "pruned_heads": [list(lh) for lh in chosen], "heads": pruned.heads, "selection": steps,
                  "screened": [{"head": list(lh), "attribution": float(gain[lh]), "measured": measured[lh]}
                               for lh in screened],
                  "held_out": {"unpatched": conflict_rates(model, tokenizer, test),
                               "pruned": conflict_rates(model, tokenizer, test, [pruned])},
                  "calibration": {"unpatched": conflict_rates(model, tokenizer, calib),
                                  "pruned": conflict_rates(model, tokenizer, calib, [pruned])}}
    finally:
        model.train(was_training)
    return pruned, report
