"""splice's decode attention as a Hugging Face attention implementation, ``"splice"``.

A forward with one query per row (a decode step) runs ``splice::decode_attention`` over the cache::

    out[b, h] = softmax over the slots j that row b's mask allows of scale · q[b, h] · k[b, h // G, j], times v

(``G`` query heads per KV head, Gemma 2's soft-capping when the module has one). The allowed slots are
the mask's last query row; no mask (Hugging Face leaves it out when every cached slot is visible)
allows all. Any other forward (prefill, several queries, attention sinks, position biases, paged
caches) goes to Hugging Face's SDPA implementation unchanged, and the masks are SDPA's, so a model
gives the same tokens either way up to fp32 rounding. Torch's CPU SDPA at one query in bf16 is slow (its flash kernel tiles for long
queries); the C++ kernel reads each key once per KV head for all its query heads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops.attention import decode_attention

NAME = "splice"
IMPLEMENTATIONS = (NAME, "sdpa", "eager")  # what use_splice_attention switches between


def allowed_slots(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """[batch, length] bool: the slots the last query of each row may read (None: all of them)."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :length]
    allowed = last if last.dtype == torch.bool else last == 0  # an additive mask: 0 where allowed
    return allowed.expand(batch, length)


def splice_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, **kwargs):
    """Hugging Face's attention-function contract: ``query`` [B, Hq, T, D], ``key``/``value``
    [B, Hkv, L, D] -> ``([B, T, Hq, D], None)``."""
    batch, _, queries, dim = query.shape
    unsupported = any(kwargs.get(name) is not None for name in ("s_aux", "position_bias", "cache"))
    if queries != 1 or dropout > 0 or unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    length = key.shape[2]
    valid = allowed_slots(attention_mask, batch, length)
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=key.device)
    scale = dim ** -0.5 if scaling is None else scaling
    out = decode_attention(query[:, :, 0], key, value, valid.contiguous(), scale, softcap or 0.0)
    return out.unsqueeze(1), None


AttentionInterface.register(NAME, splice_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_splice_attention(model: nn.Module, implementation: str = NAME) -> str:
    """Switch ``model`` (a Hugging Face model built on the attention interface) to ``implementation``
    (``"splice"``, or back to ``"sdpa"`` or ``"eager"``); returns the one it had. Refused, with the
    model unchanged, for another name or a model whose attention does not go through the interface."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    config = getattr(model, "config", None)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if config is None or can_set is None or not can_set():
        raise ValueError(f"{type(model).__name__} does not choose its attention through Hugging Face's attention "
                         "interface, so its attention implementation cannot be switched")
    before = config._attn_implementation
    model.set_attn_implementation(implementation)
    return before
