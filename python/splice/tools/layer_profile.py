"""Per-layer importance on calibration text, and the search for layers to skip.

For decoder layer ``l`` with input ``x`` and output ``y`` (per token, averaged over tokens):

* Block Influence (ShortGPT):    ``BI_l = 1 - cos(x, y)``
* relative L2 change:            ``L2_l = |y - x| / |x|``
* removal cost (measured):       ``KL_l = KL(p_full || p_without_l)`` of next-token
  distributions, and the perplexity with layer ``l`` alone skipped.

:func:`greedy_skip_set` grows a skip set one layer at a time, each time adding the layer whose
*joint* removal with those already chosen costs the least measured KL.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..skipping.spec import Skip
from ..utils.atomic import write_atomic
from .calibration_text import evaluate, log_probs, run_hooked
from .plotting import pyplot, save_figure

METHODS = ("bi", "l2", "kl", "greedy", "random")


@dataclass
class LayerProfile:
    """Importance of every layer of one model on one calibration set (lists indexed by layer)."""

    model: str
    num_layers: int
    tokens: int
    block_influence: list[float]
    l2_change: list[float]
    removal_kl: list[float] = field(default_factory=list)
    removal_ppl: list[float] = field(default_factory=list)
    full_ppl: float | None = None
    greedy_order: list[int] = field(default_factory=list)
    greedy_kl: list[float] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LayerProfile":
        return cls(**json.loads(Path(path).read_text()))

    def check_model(self, adapter: Adapter) -> None:
        if self.num_layers != adapter.num_layers:
            raise ValueError(f"this layer profile is for a {self.num_layers}-layer model ({self.model}); "
                             f"the model has {adapter.num_layers} layers")

    def choose(self, method: str, count: int, seed: int = 0) -> list[int]:
        """The ``count`` layers ``method`` would skip (sorted)."""
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r}; choose one of {METHODS}")
        check_count(count, self.num_layers)
        if method == "random":
            return sorted(random.Random(seed).sample(range(self.num_layers), count))
        if method == "greedy":
            if len(self.greedy_order) < count:
                raise ValueError(f"the greedy search in this profile chose {len(self.greedy_order)} layers; "
                                 f"{count} were asked for (profile again with a larger budget)")
            return sorted(self.greedy_order[:count])
        scores = {"bi": self.block_influence, "l2": self.l2_change, "kl": self.removal_kl}[method]
        if not scores:
            raise ValueError(f"method {method!r} needs removal costs: profile with measure_removal=True")
        return sorted(sorted(range(self.num_layers), key=lambda l: scores[l])[:count])


def check_count(count: int, num_layers: int) -> None:
    if not 0 <= count < num_layers:
        raise ValueError(f"cannot skip {count} of {num_layers} layers: keep at least one")


def layers_for_budget(num_layers: int, layers: int | None = None, speedup: float | None = None) -> int:
    """Layer count for a budget given as a count or as an ideal speedup ``L / (L - k)``."""
    if (layers is None) == (speedup is None):
        raise ValueError("give the budget as layers=K or speedup=S (not both)")
    if speedup is not None:
        if not speedup >= 1.0:
            raise ValueError(f"a speedup budget must be >= 1, got {speedup}")
        layers = math.ceil(num_layers * (1 - 1 / speedup) - 1e-9)
    check_count(layers, num_layers)
    return layers


@torch.inference_mode()
def influence(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Block Influence and relative L2 change of every layer, averaged over all tokens."""
    adapter = Adapter(model)
    bi = torch.zeros(adapter.num_layers, dtype=torch.float64)
    l2 = torch.zeros_like(bi)

    def hook(idx):
        def record(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            y = (output[0] if isinstance(output, tuple) else output).float()
            bi[idx] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())
            l2[idx] += float(((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    run_hooked(model, windows, handles, batch_size)
    return (bi / windows.numel()).tolist(), (l2 / windows.numel()).tolist()


def skip_cost(model, layers, windows, reference, batch_size: int = 8) -> tuple[float, float]:
    """``(KL to reference, perplexity)`` of ``model`` with ``layers`` skipped."""
    from ..patch import patch

    with patch(model, Skip(layers)):
        ppl, kl = evaluate(model, windows, reference, batch_size)
    return kl, ppl


def profile_layers(model, windows: torch.Tensor, measure_removal: bool = True, greedy_layers: int = 0,
                   candidates: int | None = None, batch_size: int = 8, progress: bool = True) -> LayerProfile:
    """Profile every layer of ``model`` on ``windows`` [count, length].

    ``greedy_layers > 0`` also runs :func:`greedy_skip_set` for that many layers over the
    ``candidates`` layers of lowest removal KL (all layers when None).
    """
    adapter = Adapter(model)
    bi, l2 = influence(model, windows, batch_size)
    result = LayerProfile(adapter.name, adapter.num_layers, windows.numel(), bi, l2)
    if not (measure_removal or greedy_layers):
        return result
    reference = log_probs(model, windows, batch_size)
    result.full_ppl = evaluate(model, windows, None, batch_size)[0]
    for layer in tqdm(range(adapter.num_layers), desc="removal cost", disable=not progress):
        kl, ppl = skip_cost(model, [layer], windows, reference, batch_size)
        result.removal_kl.append(kl)
        result.removal_ppl.append(ppl)
    if greedy_layers:
        pool = sorted(range(adapter.num_layers), key=lambda l: result.removal_kl[l])[:candidates]
        result.greedy_order, result.greedy_kl = greedy_skip_set(model, windows, greedy_layers, pool, reference,
                                                                batch_size, progress)
    return result


def greedy_skip_set(model, windows, count: int, pool: list[int], reference: torch.Tensor,
                    batch_size: int = 8, progress: bool = True) -> tuple[list[int], list[float]]:
    """Greedy measured search: returns the layers in the order chosen and the joint KL after each."""
    adapter = Adapter(model)
    check_count(count, adapter.num_layers)
    if count > len(pool):
        raise ValueError(f"cannot choose {count} layers from a pool of {len(pool)}")
    chosen, costs = [], []
    steps = sum(len(pool) - i for i in range(count))
    with tqdm(total=steps, desc="greedy skip search", disable=not progress) as bar:
        for _ in range(count):
            best = None
            for layer in pool:
                if layer in chosen:
                    continue
                kl, _ = skip_cost(model, chosen + [layer], windows, reference, batch_size)
                bar.update()
                if best is None or kl < best[1]:
                    best = (layer, kl)
            chosen.append(best[0])
            costs.append(best[1])
    return chosen, costs


def plot_profile(profile: LayerProfile, path: str | Path) -> Path:
    plt = pyplot()
    rows = [("Block Influence (1 - cos)", profile.block_influence), ("relative L2 change", profile.l2_change)]
    if profile.removal_kl:
        rows.append(("KL when removed alone", profile.removal_kl))
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.3 * len(rows)), sharex=True, squeeze=False)
    layers = list(range(profile.num_layers))
    for ax, (label, values) in zip(axes[:, 0], rows):
        colors = ["#d9534f" if l in profile.greedy_order else "#3b7dd8" for l in layers]
        ax.bar(layers, values, color=colors)
        ax.set_ylabel(label, fontsize=8)
        if "KL" in label:
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("layer (red: chosen by the greedy joint-removal search)")
    fig.suptitle(f"layer importance — {profile.model} ({profile.tokens} tokens)")
    return save_figure(fig, path)
