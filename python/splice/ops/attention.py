"""``splice::band_attention`` (prefill, every KV head with its own sinks and window) and
``splice::decode_attention`` (one new token per row over a cache slice), for hybrid attention where
some heads keep full attention and others stream; contract in attention_reference."""

from __future__ import annotations

import torch

from . import library
from .attention_reference import (
    band_attention_reference,
    check_band_attention,
    check_decode_attention,
    check_softcap,
    decode_attention_reference,
)


def _band_fake(q, k, v, pos, valid, sinks, window, scale, softcap=0.0):
    check_band_attention(q, k, v, pos, valid, sinks, window)
    check_softcap(softcap, "band_attention")
    return q.new_empty(q.shape)


def _decode_fake(q, k, v, valid, scale, softcap=0.0):
    check_decode_attention(q, k, v, valid)
    check_softcap(softcap, "decode_attention")
    return q.new_empty(q.shape)


BAND = library.define(
    "band_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor valid, Tensor sinks, Tensor window, "
    "float scale, float softcap=0.0) -> Tensor",
    band_attention_reference, _band_fake, triton="attention:band_attention_triton",
)
DECODE = library.define(
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor valid, float scale, float softcap=0.0) -> Tensor",
    decode_attention_reference, _decode_fake, triton="attention:decode_attention_triton",
)


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    sinks: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Prefill attention [B, Hq, T, D]: causal, GQA, each KV head g reading its first ``sinks[g]``
    positions and a window of ``window[g]`` recent positions (``window[g] <= 0``: all of them);
    ``softcap > 0`` soft-caps the scores (Gemma 2)."""
    return library.call(BAND, q, k, v, pos, valid, sinks, window, float(scale), float(softcap))


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """Decode attention [B, Hq, D] of one query per row over the ``valid`` slots of a [B, Hkv, L, D] cache."""
    return library.call(DECODE, q, k, v, valid, float(scale), float(softcap))
