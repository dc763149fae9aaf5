"""G-ACT (Sharma et al. 2025): per-prompt activation differences clustered into a few steering
directions, and a light probe that picks, at prefill, which direction each request gets.

1. For each contrastive pair ``i``, ``d_i[l] = a_l(positive_i) − a_l(negative_i)`` at site
   ``out`` of each steered layer (the last token, as :func:`splice.vectors.extract.extract_vectors`
   reads it). The pairs are clustered by k-means (cosine: each layer's difference unit-normalised,
   layers concatenated, k-means++ seeding); vector ``k`` at layer ``l`` is the mean of ``d_i[l]``
   over cluster ``k`` (a mean difference within the cluster).
2. The probe: a softmax regression on standardised pooled inputs of a probe layer
   (:func:`splice.steering.gates.pool`, the function it runs at prefill), trained on both prompts of
   each pair labelled with the pair's cluster. Each candidate layer is scored on held-out pairs and
   the most accurate one is kept. G-ACT trains a probe per layer, each choosing the vector of its
   own layer; splice keeps the single best layer's probe for every steered layer, so a request
   gets one coherent vector, decided once (the probe layer should precede the steered layers: on
   the prompt, layers up to the probe's are not steered).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..steering.probe_select import ProbeSelect
from ..steering.spec import Steer
from ..vectors.extract import num_layers, prompt_activations
from ..vectors.vector_set import VectorSet
from .condition_fit import condition_activations

MIN_PER_CLUSTER = 2


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """[N] cluster labels of the rows of ``x`` [N, D] (Lloyd's algorithm, k-means++ seeding)."""
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    centers = torch.stack(centers)
    labels = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        centers = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)])
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2, steps: int = 100):
    """(weight [K, D], bias [K], mean [D], std [D]) of an L2-regularised softmax regression."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def fit_gact(model, tokenizer, positive: Sequence[str], negative: Sequence[str], clusters: int = 3,
             layers: Sequence[int] = tuple(range(12, 19)), probe_layers: Sequence[int] | None = None,
             reduce: str = "mean", held_out: float = 0.25, seed: int = 0,
             progress: bool = True) -> tuple[list[Steer], ProbeSelect, dict]:
    """The bank (one :class:`Steer` per cluster, each gated by the probe's choice) and the probe."""
    n = num_layers(model)
    layers = sorted(set(layers))
    probe_layers = sorted(set(probe_layers)) if probe_layers is not None else list(range(1, layers[0]))
    bad = [l for l in [*layers, *probe_layers] if not 0 <= l < n]
    if bad or not probe_layers:
        raise ValueError(f"layers {bad or probe_layers} out of range or empty: the model has layers 0..{n - 1}")
    if len(positive) != len(negative):
        raise ValueError(f"positive and negative must be pairs, got {len(positive)} and {len(negative)}")
    if not isinstance(clusters, int) or clusters < 2:
        raise ValueError(f"clusters must be an int >= 2, got {clusters!r}")
    if len(positive) < 2 * MIN_PER_CLUSTER * clusters:
        raise ValueError(f"{clusters} clusters need at least {2 * MIN_PER_CLUSTER * clusters} pairs, got {len(positive)}")
    acts = prompt_activations(model, tokenizer, [*positive, *negative], layers, "out", "last", progress=progress)
    diffs = acts[:len(positive)] - acts[len(positive):]  # [pairs, layers, H]
    labels = kmeans(F.normalize(diffs, dim=-1).flatten(1), clusters, seed)
    sizes = [int((labels == k).sum()) for k in range(clusters)]
    if min(sizes) < MIN_PER_CLUSTER:
        raise ValueError(f"a cluster got fewer than {MIN_PER_CLUSTER} pairs (sizes {sizes}); ask for fewer clusters")
    feats = condition_activations(model, tokenizer, [*positive, *negative], probe_layers, reduce, progress=progress)
    pair_labels = torch.cat([labels, labels])
    g = torch.Generator().manual_seed(seed)
    test_pairs = torch.randperm(len(positive), generator=g)[:max(1, round(held_out * len(positive)))]
    is_test = torch.zeros(len(positive), dtype=torch.bool)
    is_test[test_pairs] = True
    is_test = torch.cat([is_test, is_test])
    per_layer, best = [], None
    for j, layer in enumerate(probe_layers):
        w, b, mu, sd = fit_softmax(feats[~is_test, j], pair_labels[~is_test], clusters)
        predicted = (((feats[is_test, j] - mu) / sd) @ w.T + b).argmax(-1)
        accuracy = float((predicted == pair_labels[is_test]).float().mean())
        per_layer.append({"layer": layer, "held_out_accuracy": accuracy})
        if best is None or accuracy > best[0]:
            best = (accuracy, j, layer)
    accuracy, j, layer = best
    w, b, mu, sd = fit_softmax(feats[:, j], pair_labels, clusters)
    probe = ProbeSelect(w, b, mu, sd, layer, reduce, name="gact_probe")
    bank = [Steer(VectorSet({l: diffs[labels == k, i].mean(0) for i, l in enumerate(layers)}, site="out",
                            method="gact"), gate=probe.choice(k), name=f"gact{k}") for k in range(clusters)]
    report = {"clusters": clusters, "cluster_sizes": sizes, "layers": layers, "probe_layer": layer,
              "probe_held_out_accuracy": accuracy, "chance": max(sizes) / sum(sizes), "per_layer": per_layer}
    return bank, probe, report
