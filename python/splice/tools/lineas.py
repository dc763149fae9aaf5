"""LinEAS (Rodriguez et al. 2025): per-layer maps learned end to end with a distributional loss.

At each chosen layer ``l`` (site ``out``) a map moves the row ``u``. Two forms:

* ``affine`` (LinEAS's own): ``u ← a_l ⊙ u + b_l``;
* ``lowrank`` (LoReFT's form, trained with LinEAS's loss): ``u ← u + B_l (A_lᵀu − c_l)``, rank r ≤ 16,
  ``A_l`` starting from orthonormal columns and ``B_l``, ``c_l`` from zero (so training starts at
  the identity). LoReFT trains this form against a task's cross-entropy with ``A`` orthonormal;
  here ``A`` is free and the loss is the distributional one below.

All maps are trained jointly: the source prompts run through the model *with every map applied*, so
each layer's loss sees what the maps before it did. The loss compares, per layer and per hidden
coordinate, the distribution of the transported source activations with the target activations by
the 1-D Wasserstein-2 distance (sorted samples at ``quantiles`` matched levels; 1-D optimal
transport between marginals is a sort), normalised by the target's per-coordinate variance and
averaged over coordinates and layers::

    L = mean_l mean_i W2²(map_l(X)_i, Y_li) / var(Y_li)  +  λ Σ_l √p ‖θ_l‖₂

with θ_l the p parameters that move layer l off the identity (``(a_l − 1, b_l)``, or ``B_l``). The
group-lasso term (``sparsity`` = λ) is applied as a proximal step after each Adam step on the W2
term, ``θ_l ← θ_l · max(0, 1 − lr·λ·√p / ‖θ_l‖)`` (Adam moves a group by about lr·√p a step, so λ
near 1 is where the penalty starts to win), which sets whole layers exactly back to the identity; layers whose group norm ends at or below ``layer_tolerance`` are switched off (left out
of the returned map). Each prompt's
first token (the attention sink, whose activations are orders of magnitude larger) is left out of
both distributions. Training runs on CPU with Adam; the model's weights do not change. The result
is a :class:`splice.Affine` or :class:`splice.LowRank`; ``scale`` t applies ``u + t·Δ(u)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..adapters.architecture import Adapter
from ..ops.steer_layout import MAX_RANK
from ..steering.maps import Affine, LowRank

MIN_SAMPLES = 4  # prompts per side
FORMS = ("affine", "lowrank")

Delta = Callable[[torch.Tensor], torch.Tensor]


def _layer_outputs(model, tokenizer, prompts, layers, maps: dict[int, Delta] | None = None):
    """Per layer [tokens, H] outputs of ``layers`` over the real tokens (first token dropped), with
    ``u ← u + maps[layer](u)`` applied at those layers' outputs."""
    adapter = Adapter(model)
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    mask = enc["attention_mask"].to(adapter.device)
    keep = mask.bool() & (mask.cumsum(1) > 1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    captured = {}
    handles = []

    def make(layer):
        def hook(module, args, out):
            u = out[0] if isinstance(out, tuple) else out
            if maps is not None:
                u = u + maps[layer](u)
            captured[layer] = u[keep].float()
            return (u,) + tuple(out[1:]) if isinstance(out, tuple) else u
        return hook

    for layer in layers:
        handles.append(adapter.layers[layer].register_forward_hook(make(layer)))
    try:
        model(input_ids=enc["input_ids"].to(adapter.device), attention_mask=mask, position_ids=position_ids,
              use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [captured[l] for l in layers]


def _quantiles(x: torch.Tensor, levels: int) -> torch.Tensor:
    """[levels, H]: each column's sorted samples at ``levels`` evenly spaced ranks."""
    idx = torch.linspace(0, x.shape[0] - 1, levels, device=x.device).round().long()
    return x.sort(0).values[idx]


class _AffineMaps:
    """``Δ_j(u) = α_j ⊙ u + b_j`` (a = 1 + α), identity at zero."""

    def __init__(self, count: int, hidden: int):
        self.alpha = torch.zeros(count, hidden, requires_grad=True)
        self.bias = torch.zeros(count, hidden, requires_grad=True)
        self.params = [self.alpha, self.bias]
        self.group_size = 2 * hidden

    def delta(self, j: int) -> Delta:
        return lambda u: self.alpha[j] * u + self.bias[j]

    def group_norms(self) -> torch.Tensor:
        return torch.cat([self.alpha, self.bias], dim=1).norm(dim=1)

    def shrink(self, factor: torch.Tensor) -> None:
        self.alpha.mul_(factor[:, None])
        self.bias.mul_(factor[:, None])

    def build(self, rows: dict[int, int]) -> Affine:
        return Affine(a={l: 1.0 + self.alpha[j].detach() for l, j in rows.items()},
                      b={l: self.bias[j].detach() for l, j in rows.items()}, site="out")


class _LowRankMaps:
    """``Δ_j(u) = B_j (A_jᵀu − c_j)``, identity at B = 0."""

    def __init__(self, count: int, hidden: int, rank: int):
        self.A = torch.linalg.qr(torch.randn(count, hidden, rank)).Q.clone().requires_grad_(True)
        self.B = torch.zeros(count, hidden, rank, requires_grad=True)
        self.c = torch.zeros(count, rank, requires_grad=True)
        self.params = [self.A, self.B, self.c]
        self.group_size = hidden * rank

    def delta(self, j: int) -> Delta:
        return lambda u: (u @ self.A[j] - self.c[j]) @ self.B[j].T

    def group_norms(self) -> torch.Tensor:
        return self.B.flatten(1).norm(dim=1)

    def shrink(self, factor: torch.Tensor) -> None:
        self.B.mul_(factor[:, None, None])

    def build(self, rows: dict[int, int]) -> LowRank:
        return LowRank(A={l: self.A[j].detach() for l, j in rows.items()},
                       B={l: self.B[j].detach() for l, j in rows.items()},
                       c={l: self.c[j].detach() for l, j in rows.items()}, site="out")


def _check(adapter, layers, source, target, steps, quantiles, lr, sparsity, form, rank, tokenizer) -> list[int]:
    layers = sorted(set(layers)) if layers is not None else list(range(adapter.num_layers))
    bad = [l for l in layers if not 0 <= l < adapter.num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{adapter.num_layers - 1}")
    for name, prompts in (("source", source), ("target", target)):
        if isinstance(prompts, str) or len(prompts) < MIN_SAMPLES:
            raise ValueError(f"LinEAS needs at least {MIN_SAMPLES} {name} prompts, got "
                             f"{len(prompts) if not isinstance(prompts, str) else 'a string'}")
    for name, value in (("steps", steps), ("quantiles", quantiles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)) or not (sparsity >= 0 and math.isfinite(sparsity)):
        raise ValueError(f"lr must be > 0 and sparsity >= 0 (finite), got {lr} and {sparsity}")
    if form not in FORMS:
        raise ValueError(f"unknown map form {form!r}; choose one of {FORMS}")
    if form == "lowrank" and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK):
        raise ValueError(f"rank must be an int in 1..{MAX_RANK}, got {rank!r}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    return layers


def train_lineas(model, tokenizer, source: Sequence[str], target: Sequence[str], layers: Sequence[int] | None = None,
                 steps: int = 150, lr: float = 5e-3, sparsity: float = 0.0, quantiles: int = 32,
                 layer_tolerance: float = 1e-3, form: str = "affine", rank: int = 8, seed: int = 0,
                 progress: bool = True) -> tuple[Affine | LowRank, dict]:
    """Maps of ``form`` that move ``source`` prompts' activations to the ``target`` prompts' (module
    docstring); returns the map and a report (loss curve, per-layer group norms, layers kept)."""
    adapter = Adapter(model)
    layers = _check(adapter, layers, source, target, steps, quantiles, lr, sparsity, form, rank, tokenizer)
    torch.manual_seed(seed)
    maps = _AffineMaps(len(layers), adapter.hidden_size) if form == "affine" else \
        _LowRankMaps(len(layers), adapter.hidden_size, rank)
    was_training = model.training
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            target_q = [_quantiles(y, quantiles) for y in _layer_outputs(model, tokenizer, target, layers)]
        scale = [q.var(0).clamp_min(1e-6) for q in target_q]
        opt = torch.optim.Adam(maps.params, lr=lr)
        curve = []
        for _ in tqdm(range(steps), disable=not progress, desc=f"LinEAS ({form})", unit="step"):
            opt.zero_grad()
            outs = _layer_outputs(model, tokenizer, source, layers, {l: maps.delta(j) for j, l in enumerate(layers)})
            w2 = torch.stack([(((_quantiles(x, quantiles) - q) ** 2) / s).mean()
                              for x, q, s in zip(outs, target_q, scale)]).mean()
            w2.backward()
            opt.step()
            with torch.no_grad():
                norms = maps.group_norms()
                if sparsity:
                    maps.shrink((1 - lr * sparsity * maps.group_size ** 0.5 / norms.clamp_min(1e-12)).clamp_min(0))
                    norms = maps.group_norms()
            penalty = sparsity * maps.group_size ** 0.5 * float(norms.sum())
            curve.append({"loss": float(w2.detach()) + penalty, "w2": float(w2.detach())})
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    norms = maps.group_norms().detach()
    rows = {l: j for j, l in enumerate(layers) if float(norms[j]) > layer_tolerance}
    if not rows:
        raise ValueError(f"the sparsity penalty {sparsity} switched every layer off; lower it")
    report = {"form": form, "rank": rank if form == "lowrank" else None, "layers": layers, "kept_layers": list(rows),
              "steps": steps, "lr": lr, "sparsity": sparsity, "quantiles": quantiles, "source_prompts": len(source),
              "target_prompts": len(target), "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"],
              "w2_first": curve[0]["w2"], "w2_last": curve[-1]["w2"],
              "group_norms": {l: float(norms[j]) for j, l in enumerate(layers)}, "curve": curve}
    return maps.build(rows), report
