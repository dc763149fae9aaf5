"""LinEAS (Rodriguez et al. 2025): per-layer affine maps learned end to end with a distributional loss.

At each chosen layer ``l`` (site ``out``) the map is ``u ← a_l ⊙ u + b_l``. All maps are trained
jointly: the source prompts run through the model *with every map applied*, so each layer's loss
sees what the maps before it did. The loss compares, per layer and per hidden coordinate, the
distribution of the transported source activations with the target activations by the 1-D
Wasserstein-2 distance (sorted samples at ``quantiles`` matched levels; a diagonal map moves each
coordinate's marginal, and 1-D optimal transport between marginals is a sort), normalised by the
target's per-coordinate variance and averaged over coordinates and layers::

    L = mean_l mean_i W2²(a_li · X_li + b_li, Y_li) / var(Y_li)  +  λ Σ_l ‖(a_l − 1, b_l)‖₂

The group-lasso term (``sparsity`` = λ) pushes whole layers back to the identity; layers whose
group norm ends below ``layer_tolerance`` are switched off (left out of the returned map). Each
prompt's first token (the attention sink, whose activations are orders of magnitude larger) is left
out of both distributions. Training runs on CPU with Adam; the model's weights do not change.
Applied as :class:`splice.Affine` with ``scale`` t: ``u + t·((a − 1) ⊙ u + b)``, t = 1 the learned map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..adapters.architecture import Adapter
from ..steering.maps import Affine

MIN_SAMPLES = 4  # prompts per side


def _layer_outputs(model, tokenizer, prompts, layers, maps=None):
    """Per layer [tokens, H] outputs of ``layers`` over the real tokens (first token dropped), with
    ``maps`` ({layer: (alpha, b)}, ``u ← u + alpha ⊙ u + b``) applied at those layers' outputs."""
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
                alpha, b = maps[layer]
                u = u + alpha * u + b
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


def train_lineas(model, tokenizer, source: Sequence[str], target: Sequence[str], layers: Sequence[int] | None = None,
                 steps: int = 150, lr: float = 5e-3, sparsity: float = 0.0, quantiles: int = 32,
                 layer_tolerance: float = 1e-3, seed: int = 0, progress: bool = True) -> tuple[Affine, dict]:
    """Affine maps that move ``source`` prompts' activations to the ``target`` prompts' (module
    docstring); returns the map and a report (loss curve, per-layer group norms, layers kept)."""
    adapter = Adapter(model)
    layers = sorted(set(layers)) if layers is not None else list(range(adapter.num_layers))
    bad = [l for l in layers if not 0 <= l < adapter.num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{adapter.num_layers - 1}")
    for name, prompts in (("source", source), ("target", target)):
        if isinstance(prompts, str) or len(prompts) < MIN_SAMPLES:
            raise ValueError(f"LinEAS needs at least {MIN_SAMPLES} {name} prompts, got "
                             f"{len(prompts) if not isinstance(prompts, str) else 'a string'}")
    for name, value in (("steps", steps), ("quantiles", quantiles)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)) or not (sparsity >= 0 and math.isfinite(sparsity)):
        raise ValueError(f"lr must be > 0 and sparsity >= 0 (finite), got {lr} and {sparsity}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    torch.manual_seed(seed)
    hidden = adapter.hidden_size
    was_training = model.training
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            target_q = [_quantiles(y, quantiles) for y in _layer_outputs(model, tokenizer, target, layers)]
        scale = [q.var(0).clamp_min(1e-6) for q in target_q]
        alpha = torch.zeros(len(layers), hidden, requires_grad=True)
        bias = torch.zeros(len(layers), hidden, requires_grad=True)
        opt = torch.optim.Adam([alpha, bias], lr=lr)
        curve = []
        for _ in tqdm(range(steps), disable=not progress, desc="LinEAS", unit="step"):
            opt.zero_grad()
            maps = {l: (alpha[j], bias[j]) for j, l in enumerate(layers)}
            outs = _layer_outputs(model, tokenizer, source, layers, maps)
            w2 = torch.stack([(((_quantiles(x, quantiles) - q) ** 2) / s).mean()
                              for x, q, s in zip(outs, target_q, scale)]).mean()
            group = torch.cat([alpha, bias], dim=1).norm(dim=1)
            loss = w2 + sparsity * group.sum()
            loss.backward()
            opt.step()
            curve.append({"loss": float(loss.detach()), "w2": float(w2.detach())})
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    norms = torch.cat([alpha, bias], dim=1).detach().norm(dim=1)
    kept = [l for j, l in enumerate(layers) if float(norms[j]) > layer_tolerance]
    if not kept:
        raise ValueError(f"the sparsity penalty {sparsity} switched every layer off; lower it")
    index = {l: j for j, l in enumerate(layers)}
    affine = Affine(a={l: 1.0 + alpha[index[l]].detach() for l in kept}, b={l: bias[index[l]].detach() for l in kept},
                    site="out")
    report = {"layers": layers, "kept_layers": kept, "steps": steps, "lr": lr, "sparsity": sparsity,
              "quantiles": quantiles, "source_prompts": len(source), "target_prompts": len(target),
              "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"], "w2_first": curve[0]["w2"],
              "w2_last": curve[-1]["w2"], "group_norms": {l: float(norms[index[l]]) for l in layers}, "curve": curve}
    return affine, report
