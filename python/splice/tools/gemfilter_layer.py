"""Choose GemFilter's selection layer by measurement: the earliest layer whose kept tokens hold the
pass key on every calibration prompt.

For each calibration prompt (:mod:`splice.tools.passkey`, seeds the evaluation never uses) and each
layer, the key is *kept* when at least one of its two occurrences in the needle sentence has every
token among the tokens the filter keeps. The paper picks its layer (13 of 32 for Llama 3.1 8B) by
inspecting needle retrieval the same way; here the search is automatic and reported per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.architecture import Adapter
from ..longcontext.gemfilter import GemFilter, kept_tokens, token_scores
from .passkey import Passkey


@dataclass
class LayerChoice:
    layer: int | None  # None: no layer keeps every key
    kept_share: list[float]  # per layer, the share of calibration prompts whose key was kept


def key_runs(tokenizer, task: Passkey) -> list[list[int]]:
    """The key's occurrences in ``task``'s prompt, each as the run of consecutive token indices whose
    text holds digits (the filler, intro and question hold none)."""
    digits = [j for j in range(task.ids.shape[1]) if any(c.isdigit() for c in tokenizer.decode(task.ids[0, j]))]
    runs: list[list[int]] = []
    for j in digits:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


def choose_layer(model, tokenizer, tasks: list[Passkey], keep: int, tail: int) -> LayerChoice:
    """The earliest layer at which a ``GemFilter(layer, keep, tail)`` keeps every task's key."""
    if not tasks:
        raise ValueError("choose_layer needs at least one calibration prompt")
    layers = list(range(Adapter(model).num_layers))
    hits = torch.zeros(len(layers))
    for task in tasks:
        mask = torch.ones_like(task.ids)
        scores = token_scores(model, task.ids, mask, layers)
        runs = key_runs(tokenizer, task)
        for layer in layers:
            kept = set(kept_tokens(scores[layer], mask, GemFilter(layer, keep, tail))[0].tolist())
            hits[layer] += any(all(j in kept for j in run) for run in runs)
    share = (hits / len(tasks)).tolist()
    return LayerChoice(next((layer for layer in layers if share[layer] == 1.0), None), share)
