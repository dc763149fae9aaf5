"""``splice::index_attention``: decode attention of one new token per row over the cache slots that
``idx`` names for each KV head, for attention that reuses another layer's choice of slots (HyLRA);
contract in index_attention_reference."""

from __future__ import annotations

import torch

from . import library
from .attention_reference import check_softcap
from .index_attention_reference import check_index_attention, index_attention_reference


def _fake(q, k, v, idx, scale, softcap=0.0):
    check_index_attention(q, k, v, idx)
    check_softcap(softcap, "index_attention")
    return q.new_empty(q.shape)


INDEX = library.define(
    "index_attention(Tensor q, Tensor k, Tensor v, Tensor idx, float scale, float softcap=0.0) -> Tensor",
    index_attention_reference, _fake, triton="index_attention:index_attention_triton",
)


def index_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """Decode attention [B, Hq, D] of one query per row over the slots ``idx[b, g] >= 0`` of KV head g
    of a [B, Hkv, L, D] cache; ``softcap > 0`` soft-caps the scores (Gemma 2)."""
    return library.call(INDEX, q, k, v, idx, float(scale), float(softcap))
