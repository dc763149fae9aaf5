"""HyLRA's offline profiling and layer-policy search (:class:`~splice.hybrid.reuse_policy.ReusePolicy`).

1. *Profile* (:func:`profile_reuse`): on calibration windows of ``n`` tokens, each global layer's
   (layers with the model's own sliding window keep it and are left out; the measures index the
   global layers in order, listed in ``layers``) attention probabilities for the last ``queries`` positions (decode-like: every earlier token
   visible), summed per KV head over its ``G`` query heads: ``P_l`` [Hkv, Q, n]. Per window, and
   averaged over windows, KV heads and queries:

   * ``mass[a][l]`` (``a ≤ l``): the share of layer ``l``'s attention that falls on layer ``a``'s
     top-k slots, ``Σ_{j ∈ top_k(P_a)} P_l[j] / G``: what ``l`` keeps when it reuses ``a``'s slots;
   * *intra-layer sensitivity* ``1 - mass[l][l]``: what ``l`` loses even with its own top-k;
   * *inter-layer overlap* ``|top_k(P_{l-1}) ∩ top_k(P_l)| / k`` of consecutive layers.

2. *Solve* (:func:`solve`): the first global layer and every layer whose sensitivity exceeds
   ``max_loss`` stay full; the other full layers are those that minimise the attention mass the reusing layers lose,
   ``Σ_{l reusing} (1 - mass[anchor(l)][l])``, with exactly ``full`` full layers: an exact dynamic
   programme over (layer, full layers so far).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..adapters.architecture import Adapter
from ..hybrid.reuse_policy import ReusePolicy, windowed_layers
from ..runtime.hybrid_attention import logit_softcap, project_heads
from ..runtime.reuse_attention import grouped_attention


def last_query_attention(attn, adapter, hidden, position_embeddings, queries: int) -> torch.Tensor:
    """[B, Hkv, Q, n] fp32: the attention probabilities of the last ``queries`` positions of a
    causal pass over ``hidden`` [B, n, h], summed over each KV head's query heads."""
    q, k, v = project_heads(attn, hidden, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    b, n = hidden.shape[:2]
    rows = torch.arange(n - queries, n, device=hidden.device)
    visible = (torch.arange(n, device=hidden.device)[None, :] <= rows[:, None]).expand(b, 1, queries, n)
    _, p = grouped_attention(q[:, :, -queries:], k, v, visible, attn.scaling, logit_softcap(attn))
    return p.sum(2)


class ReuseProfile:
    """Running sums of the measures of the module docstring over windows."""

    def __init__(self, num_layers: int, topk: int, group: int):
        self.topk, self.group, self.windows = topk, group, 0
        self.mass = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.overlap = torch.zeros(num_layers, dtype=torch.float64)
        self.slots: dict[int, torch.Tensor] = {}

    def add_layer(self, layer: int, p: torch.Tensor) -> None:
        """Fold in layer ``layer``'s probabilities ``p`` [B, Hkv, Q, n] of the current window (layers in
        order from 0)."""
        slots = p.topk(min(self.topk, p.shape[-1]), dim=-1).indices
        self.slots[layer] = slots
        for a, earlier in self.slots.items():
            self.mass[a, layer] += float(p.gather(-1, earlier).sum(-1).mean()) / self.group
        if layer > 0:
            previous = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, self.slots[layer - 1], True)
            self.overlap[layer] += float(previous.gather(-1, slots).float().mean())

    def end_window(self) -> None:
        self.slots.clear()
        self.windows += 1

    def measures(self) -> dict:
        n = max(self.windows, 1)
        mass = (self.mass / n).tolist()
        return {"mass": mass, "sensitivity": [1 - mass[l][l] for l in range(len(mass))],
                "overlap": (self.overlap / n).tolist()}


@torch.inference_mode()
def profile_reuse(model, windows: torch.Tensor, topk: int, queries: int = 256, progress: bool = True) -> dict:
    """The measures of the module docstring on ``windows`` [count, n] (one at a time)."""
    adapter = Adapter(model)
    if windows.dim() != 2 or not 0 < queries <= windows.shape[1]:
        raise ValueError(f"calibration windows must be [count, n] with n >= queries = {queries}, "
                         f"got {list(windows.shape)}")
    windowed = windowed_layers(adapter)
    layers = [l for l in range(adapter.num_layers) if l not in windowed]
    profile = ReuseProfile(len(layers), topk, adapter.num_heads // adapter.num_kv_heads)
    hooks = []
    for idx, layer in enumerate(adapter.layers[l] for l in layers):
        def hook(attn, args, kwargs, idx=idx):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            profile.add_layer(idx, last_query_attention(attn, adapter, hidden, kwargs["position_embeddings"], queries))
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for window in tqdm(windows, desc="profiling layer reuse", disable=not progress):
            model(input_ids=window[None].to(adapter.device), use_cache=False, logits_to_keep=1)
            profile.end_window()
    finally:
        for h in hooks:
            h.remove()
    return {"layers": layers, **profile.measures()}


def _segment_loss(mass: list[list[float]], anchor: int, end: int) -> float:
    """Mass lost by layers ``anchor+1 .. end-1`` reusing ``anchor``'s slots."""
    return sum(1 - mass[anchor][l] for l in range(anchor + 1, end))


def solve(mass: list[list[float]], full: int, forced=()) -> tuple[tuple[int, ...], float]:
    """``(full_layers, loss)``: exactly ``full`` full layers including 0 and ``forced``, minimising
    the mass the other layers lose (module docstring). Exact, O(L² · full)."""
    num = len(mass)
    forced = sorted({0, *forced})
    if not len(forced) <= full <= num:
        raise ValueError(f"full must be between the {len(forced)} layers that must stay full ({forced}) and "
                         f"the {num} layers, got {full}")
    is_forced = [l in forced for l in range(num)]
    inf = math.inf
    # best[c][a]: least loss of layers 0..a-1 when layer a is the c-th full layer (c counted from 1)
    best = [[inf] * num for _ in range(full + 1)]
    back = [[-1] * num for _ in range(full + 1)]
    best[1][0] = 0.0
    for c in range(1, full):
        for a in range(num):
            if best[c][a] == inf:
                continue
            for b in range(a + 1, num):
                loss = best[c][a] + _segment_loss(mass, a, b)
                if loss < best[c + 1][b]:
                    best[c + 1][b], back[c + 1][b] = loss, a
                if is_forced[b]:
                    break  # a later next full layer would make the forced one reuse
    ends = [(best[full][a] + _segment_loss(mass, a, num), a) for a in range(num)
            if best[full][a] < inf and not any(is_forced[a + 1:])]
    if not ends:
        raise ValueError(f"no policy with {full} full layers keeps layers {forced} full")
    loss, a = min(ends)
    layers = [a]
    for c in range(full, 1, -1):
        a = back[c][a]
        layers.append(a)
    return tuple(sorted(layers)), loss


def search_reuse(model, windows: torch.Tensor, topk: int, full: int, max_loss: float = 0.5, queries: int = 256,
                 progress: bool = True) -> ReusePolicy:
    """Profile on ``windows``, then :func:`solve` with the layers losing more than ``max_loss`` of
    their attention under their own top-k kept full; the report holds the measures."""
    adapter = Adapter(model)
    if not 0 < max_loss <= 1:
        raise ValueError(f"max_loss must be in (0, 1], got {max_loss}")
    if not 1 <= full <= adapter.num_layers:
        raise ValueError(f"full must be in 1..{adapter.num_layers}, got {full}")
    measures = profile_reuse(model, windows, topk, queries, progress)
    layers = measures["layers"]
    if full > len(layers):
        raise ValueError(f"full must be at most the model's {len(layers)} global layers, got {full}")
    sensitive = [i for i, s in enumerate(measures["sensitivity"]) if s > max_loss]
    chosen, loss = solve(measures["mass"], full, sensitive)
    report = {"calibration": {"windows": windows.shape[0], "length": windows.shape[1], "queries": queries},
              "max_loss": max_loss, "sensitive": [layers[i] for i in sensitive], "lost_mass": loss, **measures}
    return ReusePolicy(adapter.num_layers, tuple(layers[i] for i in chosen), topk, adapter.name, report,
                       windowed_layers(adapter))
