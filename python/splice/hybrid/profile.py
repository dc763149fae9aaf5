"""Head classification: how much each KV head needs long-range attention.

For every KV head ``(l, h)`` alone made streaming (``sinks`` + ``window``, every other head full),
the score is the mean KL divergence of the next-token distributions from the full model's, on
calibration sequences longer than the window: synthetic pass-key prompts (scored on the answer
tokens, the retrieval that streaming heads would break) and WikiText-2 windows (every position).
Heads with the highest scores keep full attention (:meth:`HeadMap.from_scores`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..adapters.architecture import Adapter
from .head_map import HeadMap


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


def plot_head_map(head_map: HeadMap, path) -> None:
    """Heat map of the head scores (layers × KV heads), full heads outlined."""
    from ..bench.output import pyplot, save_figure

    plt = pyplot()
    scores = torch.tensor(head_map.scores)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * head_map.num_kv_heads, 1 + 0.22 * head_map.num_layers))
    image = ax.imshow(scores.clamp_min(1e-6).log10(), aspect="auto", cmap="viridis")
    for layer in range(head_map.num_layers):
        for head in head_map.full_heads(layer):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    fig.colorbar(image, label="log10 KL when streaming")
    ax.set_title(f"full heads (red): {head_map.full_fraction:.0%}", fontsize=9)
    save_figure(fig, path)
