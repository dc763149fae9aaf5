"""Head classification: how much each KV head needs long-range attention.

Two scores, both "how much does the model move when this KV head alone streams" (``sinks`` +
``window``, every other head full), higher meaning keep it full (:meth:`HeadMap.from_scores`):

* :func:`head_scores` (``kl``): the mean KL divergence of the next-token distributions from the full
  model's, one forward pass per head and sequence. Exact, but at 8K tokens 90 heads are hours on a CPU.
* :func:`streaming_deltas` (``delta``): the change streaming the head makes to the residual stream
  at the layer itself, relative to the residual's norm, at query positions sampled along each
  sequence. One forward pass per sequence for all heads, so it scores at the context the map will
  serve: heads whose loss only shows at long range rank where they belong.

Calibration sequences are synthetic pass-key prompts (scored on the answer tokens by ``kl``) and
WikiText-2 windows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..adapters.architecture import Adapter
from ..hybrid.head_map import HeadMap
from ..runtime.hybrid_attention import attend, band_mask, logit_softcap, model_window, project_heads, streaming_window


@torch.inference_mode()
def _log_probs(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float(), dim=-1)


def head_scores(model, sequences: list[tuple[torch.Tensor, int]], sinks: int = 4, window: int = 256,
                kind: str = "stream", progress: bool = True) -> list[list[float]]:
    """``scores[l][h]``: mean KL when KV head ``h`` of layer ``l`` alone streams. ``sequences`` are
    ``(ids [1, n], scored)`` pairs: the KL is taken over the last ``scored`` positions of each."""
    from ..patch import patch

    adapter = Adapter(model)
    reference = [_log_probs(model, ids, keep) for ids, keep in sequences]
    scores = [[0.0] * adapter.num_kv_heads for _ in range(adapter.num_layers)]
    every = {l: set(range(adapter.num_kv_heads)) for l in range(adapter.num_layers)}
    heads = [(l, h) for l in range(adapter.num_layers) for h in range(adapter.num_kv_heads)]
    for layer, head in tqdm(heads, desc="head scores", disable=not progress):
        full = {**every, layer: every[layer] - {head}}
        head_map = HeadMap(adapter.num_layers, adapter.num_kv_heads, full, sinks, window, adapter.name, kind=kind)
        with patch(model, heads=head_map):
            kls = [F.kl_div(_log_probs(model, ids, keep), ref, log_target=True, reduction="none").sum(-1).mean()
                   for (ids, keep), ref in zip(sequences, reference)]
        scores[layer][head] = float(torch.stack(kls).mean())
    return scores


def sampled_queries(length: int, sinks: int, window: int, stride: int) -> torch.Tensor:
    """Every ``stride``-th query position counted back from the last, among those a streaming head
    changes (``i >= sinks + window``: the first to lose a key)."""
    return torch.arange(length - 1, sinks + window - 1, -stride).flip(0)


@contextmanager
def _probing(adapter: Adapter, sinks: int, window: int, stride: int, totals: torch.Tensor):
    """Each layer attends exactly as the model does, and adds to ``totals[l, h]`` the mean over
    sampled queries ``i`` of ``|g(o_proj(a_full(i))) - g(o_proj(a_stream,h(i)))| / |x_l(i)|``: ``a``
    the attention output before ``o_proj`` with only KV head ``h``'s query heads changed, ``g`` what
    the residual stream receives it through (the post-attention norm of sandwich families, else
    nothing), ``x_l`` the residual stream entering layer ``l``."""
    hq, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    group, residual, installed, hooks = hq // hkv, {}, [], []

    def make(layer_idx: int, attn):
        full_window = model_window(adapter, attn)
        window_here = streaming_window(window, full_window)
        softcap = logit_softcap(attn)
        post = adapter.layers[layer_idx].post_attention_layernorm if adapter.family.sandwich else nn.Identity()

        def forward(hidden_states, position_embeddings, attention_mask=None, **kwargs):
            b, t, _ = hidden_states.shape
            q, k, v = project_heads(attn, hidden_states, hq, hkv, d)
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)

            def attend_to(query, mask, causal=False):
                return attend(query, k, v, mask, causal, attn.scaling, softcap)

            mask = attention_mask[..., :t] if attention_mask is not None else None
            out = attend_to(q, mask, mask is None and t > 1)
            rows, pos = sampled_queries(t, sinks, window, stride), torch.arange(t, device=q.device)
            if len(rows):
                ok = torch.ones(1, t, dtype=torch.bool, device=q.device)
                seen = band_mask(rows[None], pos[None], ok, 0, full_window or t)
                full_rows = attend_to(q[:, :, rows], seen)
                change = full_rows - attend_to(q[:, :, rows], band_mask(rows[None], pos[None], ok, sinks, window_here))
                change = change.transpose(1, 2).reshape(b, len(rows), hq, d)
                full_rows = full_rows.transpose(1, 2).reshape(b, len(rows), hq * d)
                received = post(attn.o_proj(full_rows))
                for h in range(hkv):
                    alone = torch.zeros_like(change)
                    alone[:, :, h * group:(h + 1) * group] = change[:, :, h * group:(h + 1) * group]
                    moved = (received - post(attn.o_proj(full_rows - alone.flatten(2)))).norm(dim=-1)
                    totals[layer_idx, h] += float((moved / residual[layer_idx][:, rows]).mean())
            return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d)), None

        return forward

    def record(layer_idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            residual[layer_idx] = hidden.float().norm(dim=-1)
        return hook

    try:
        for idx, layer in enumerate(adapter.layers):
            hooks.append(layer.register_forward_pre_hook(record(idx), with_kwargs=True))
            layer.self_attn.forward = make(idx, layer.self_attn)
            installed.append(layer.self_attn)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for attn in installed:
            del attn.forward


@torch.inference_mode()
def streaming_deltas(model, sequences: list[torch.Tensor], sinks: int = 4, window: int = 256, stride: int = 32,
                     progress: bool = True) -> list[list[float]]:
    """``scores[l][h]``: the residual-stream change (see :func:`_probing`) when KV head ``h`` of layer
    ``l`` alone streams, averaged over ``sequences`` (``ids [1, n]`` each, ``n > sinks + window``)."""
    adapter = Adapter(model)
    short = [s.shape[1] for s in sequences if s.shape[1] <= sinks + window]
    if short:
        raise ValueError(f"sequences of {short} tokens never reach past sinks + window = {sinks + window}; "
                         "streaming changes nothing there")
    totals = torch.zeros(adapter.num_layers, adapter.num_kv_heads)
    with _probing(adapter, sinks, window, stride, totals):
        for ids in tqdm(sequences, desc="streaming deltas", disable=not progress):
            model(input_ids=ids.to(adapter.device), use_cache=False, logits_to_keep=1)
    return (totals / len(sequences)).tolist()


def interleave(*rankings: list[list[float]]) -> list[list[float]]:
    """Scores that rank heads round-robin over several score tables: each table's best head in turn,
    then each table's second best, and so on, skipping heads already taken. :meth:`HeadMap.from_scores`
    at any fraction then keeps the top heads of every table (e.g. ``delta`` at long context for heads
    whose loss accumulates along the sequence, ``kl`` for the heads that retrieve the answer)."""
    orders = [sorted(((s, l, h) for l, row in enumerate(t) for h, s in enumerate(row)), reverse=True)
              for t in rankings]
    shapes = {(len(t), len(t[0])) for t in rankings}
    if len(shapes) != 1:
        raise ValueError(f"score tables of different shapes {sorted(shapes)} cannot be interleaved")
    layers, heads = shapes.pop()
    taken: list[tuple[int, int]] = []
    for level in zip(*orders):
        for _, l, h in level:
            if (l, h) not in taken:
                taken.append((l, h))
    scores = [[0.0] * heads for _ in range(layers)]
    for rank, (l, h) in enumerate(taken):
        scores[l][h] = float(len(taken) - rank)
    return scores


def plot_head_map(head_map: HeadMap, path) -> None:
    """Heat map of the head scores (layers × KV heads), full heads outlined."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    scores = torch.tensor(head_map.scores)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * head_map.num_kv_heads, 1 + 0.22 * head_map.num_layers))
    image = ax.imshow(scores.clamp_min(1e-6).log10(), aspect="auto", cmap="viridis")
    for layer in range(head_map.num_layers):
        for head in head_map.full_heads(layer):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    fig.colorbar(image, label="log10 head score (streaming cost)")
    ax.set_title(f"full heads (red): {head_map.full_fraction:.0%}", fontsize=9)
    save_figure(fig, path)
