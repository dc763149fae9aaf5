"""GemFilter (Shi et al., "Discovering the Gems in Early Layers", 2024): early layers pick the prompt
tokens that matter, and the whole model then runs on those tokens only.

For each prompt (length ``n``, left padding allowed):

    run layers 0 .. r-1 over the prompt; at layer r take q = the last token's queries and k = every
    token's keys, after the rotary embedding (no KV cache, nothing past layer r is computed)
    s_j    = sum over query heads h of <q_h, k_{g(h), j}>          (g(h): h's KV head)
    s'     = avg_pool(s, kernel=pool, zero padding)                 (pads score 0 before pooling)
    kept   = the top min(keep, n) tokens of s', the last ``tail`` tokens always among them,
             in their original order

The kept tokens form a new, shorter prompt; a second pass runs the whole model on it with
positions renumbered 0 .. len(kept)-1, as the paper's code does (it feeds the kept ids as a new
input). Rows are left-padded again to the longest kept row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..adapters.architecture import Adapter
from ..runtime.hybrid_attention import project_heads


@dataclass(frozen=True)
class GemFilter:
    """Select at layer ``layer`` the ``keep`` prompt tokens its last query scores highest; the last
    ``tail`` tokens of each prompt (its last turn: the question) are always kept."""

    layer: int
    keep: int
    tail: int = 0
    pool: int = 5

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"GemFilter keeps at least one token, got keep={self.keep}")
        if self.tail < 0:
            raise ValueError(f"GemFilter tail must be >= 0, got {self.tail}")
        if self.tail > self.keep:
            raise ValueError(f"GemFilter would keep {self.keep} tokens, fewer than the prompt's last turn "
                             f"(tail={self.tail}): raise keep or shorten the tail")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"GemFilter pool must be an odd kernel size >= 1, got {self.pool}")

    def check(self, adapter: Adapter) -> None:
        """Raise ValueError unless ``layer`` is one of the model's layers."""
        if not 0 <= self.layer < adapter.num_layers:
            raise ValueError(f"GemFilter layer {self.layer} out of range: {adapter.name} has layers "
                             f"0..{adapter.num_layers - 1}")


@dataclass
class Selection:
    """The filtered prompt: ``input_ids`` / ``attention_mask`` [B, m] (left-padded) and, per row,
    ``kept[b]`` the kept tokens' indices in the original [B, n] prompt (ascending)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kept: list[torch.Tensor]


class _Stop(Exception):
    """Raised by the scoring hook to end the pass at the selection layer."""


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, n] positions of a left-padded batch, as ``generate`` numbers them (pads at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.inference_mode()
def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """``{layer: [B, n] float32 s_j}`` (module docstring) of every prompt token at each of ``layers``,
    0 at pads, from one pass that stops at the last of them."""
    adapter = Adapter(model)
    hq, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    found: dict[int, torch.Tensor] = {}
    weights = attention_mask.to(torch.float32)

    def scorer(layer: int):
        attn = adapter.layers[layer].self_attn

        def score(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q, k, _ = project_heads(attn, hidden, hq, hkv, d)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q[:, :, -1].float().reshape(q.shape[0], hkv, hq // hkv, d).sum(2)  # each KV group's last queries, summed
            found[layer] = torch.einsum("bgd,bgnd->bn", q, k.float()) * weights
            if len(found) == len(layers):
                raise _Stop

        return attn.register_forward_pre_hook(score, with_kwargs=True)

    handles = [scorer(layer) for layer in sorted(set(layers))]
    try:
        with contextlib.suppress(_Stop):
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=prompt_positions(attention_mask),
                  use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(found))
    if missing:
        raise RuntimeError(f"GemFilter: the attention of layers {missing} was not called by the model's forward")
    return found


def kept_tokens(scores: torch.Tensor, attention_mask: torch.Tensor, spec: GemFilter) -> list[torch.Tensor]:
    """Per row, the ascending indices of the tokens ``spec`` keeps given ``scores`` [B, n] (pooled,
    the tail forced in, pads out, top ``min(keep, length)``)."""
    pooled = scores
    if spec.pool > 1:
        pooled = F.avg_pool1d(scores[:, None], spec.pool, stride=1, padding=spec.pool // 2)[:, 0]
    n = scores.shape[1]
    tail = torch.arange(n, device=scores.device) >= n - spec.tail
    pooled = pooled.masked_fill(tail[None], float("inf")).masked_fill(attention_mask == 0, float("-inf"))
    lengths = attention_mask.sum(-1).tolist()
    return [pooled[b].topk(min(spec.keep, int(lengths[b]))).indices.sort().values for b in range(len(pooled))]


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, who: str = "GemFilter") -> None:
    """Raise ValueError (naming ``who``) unless ``input_ids`` and ``attention_mask`` are one left-padded
    [B, n] batch."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{who}: input_ids and attention_mask must both be [batch, tokens], got "
                         f"{list(input_ids.shape)} and {list(attention_mask.shape)}")
    if input_ids.shape[1] == 0 or bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError(f"{who}: every prompt needs at least one token")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(f"{who}: the batch must be left-padded (a row has a pad after a token)")


def select(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, spec: GemFilter,
           pad_token_id: int = 0) -> Selection:
    """The tokens ``spec`` keeps of each prompt (module docstring); the model is not changed."""
    spec.check(Adapter(model))
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    check_prompt(input_ids, mask)
    kept = kept_tokens(token_scores(model, input_ids, mask, [spec.layer])[spec.layer], mask, spec)
    width = max(len(k) for k in kept)
    ids = torch.full((len(kept), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros_like(ids, dtype=mask.dtype)
    for b, k in enumerate(kept):
        ids[b, width - len(k):] = input_ids[b, k]
        new_mask[b, width - len(k):] = 1
    return Selection(ids, new_mask, kept)
