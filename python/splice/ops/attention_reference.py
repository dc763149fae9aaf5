"""Plain-PyTorch fp32 references and argument checks for ``splice::band_attention`` (prefill) and
``splice::decode_attention`` (one new token per row over a KV-cache slice).

Both are grouped-query attention: query head ``h`` reads KV head ``g = h // (Hq / Hkv)``.

Prefill contract (``B`` rows, ``T`` tokens, head size ``D``)::

    q       [B, Hq, T, D]   float32, bfloat16 or float16
    k, v    [B, Hkv, T, D]  q's dtype; Hq a multiple of Hkv
    pos     [B, T] int64    absolute position of each token (left padding comes first)
    valid   [B, T] bool     False for padding
    sinks   [Hkv] int64     leading positions every query of KV head g may read
    window  [Hkv] int64     recent positions query i may read; window[g] <= 0 means full attention

    query i may read key j  iff  valid[b, j] and j <= i and
                                 (window[g] <= 0 or pos[b, i] - pos[b, j] < window[g] or pos[b, j] < sinks[g])
    out[b, h, i] = softmax_j(cap(scale · q[b, h, i] · k[b, g, j]) over the keys it may read) · v[b, g]

Decode contract::

    q       [B, Hq, D]; k, v [B, Hkv, L, D]; valid [B, L] bool (cache slots that hold tokens of the row)
    out[b, h] = softmax over the valid slots j of cap(scale · q[b, h] · k[b, g, j]), times v[b, g]

``cap`` is the identity for ``softcap = 0`` and Gemma 2's logit soft-capping
``cap(s) = softcap · tanh(s / softcap)`` for ``softcap > 0``.

A query that may read no key gives 0. Results are computed in fp32 and rounded once to q's dtype.
The checks look at shapes, dtypes and devices only, so they also run on fake tensors; their messages
are those of the C++ kernels (csrc/cpu/attention_checks.h).
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str, q_dims: int) -> None:
    """The checks every attention op shares: q ``q_dims``-d, k and v [B, Hkv, L, D] like q, GQA groups."""
    torch._check(q.dtype in DTYPES, lambda: f"{op}: q must be float32, bfloat16 or float16, got {q.dtype}")
    torch._check(q.dim() == q_dims, lambda: f"{op}: q must be {q_dims}-d, got {list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"{op}: k must be [B, Hkv, L, D], got {list(k.shape)}")
    for name, t in (("k", k), ("v", v)):
        torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must be {q.dtype} like q, got {t.dtype}")
        torch._check(t.device == q.device, lambda: f"{op}: {name} must be on {q.device}, got {t.device}")
    torch._check(v.shape == k.shape, lambda: f"{op}: v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    torch._check(
        q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1],
        lambda: f"{op}: q and k must agree in batch and head size, got {list(q.shape)} and {list(k.shape)}",
    )
    torch._check(
        k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
        lambda: f"{op}: query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})",
    )


def _check_index(t: torch.Tensor, name: str, dtype: torch.dtype, shape: list[int], q: torch.Tensor, op: str):
    torch._check(
        t.dtype == dtype and list(t.shape) == shape,
        lambda: f"{op}: {name} must be {dtype} {shape}, got {t.dtype} {list(t.shape)}",
    )
    torch._check(t.device == q.device, lambda: f"{op}: {name} must be on {q.device}, got {t.device}")


def check_band_attention(q, k, v, pos, valid, sinks, window) -> None:
    """Raise RuntimeError unless the arguments fit the prefill contract."""
    op = "band_attention"
    check_qkv(q, k, v, op, 4)
    torch._check(
        q.shape[2] == k.shape[2], lambda: f"{op}: q and k must have the same T, got {list(q.shape)} and {list(k.shape)}"
    )
    b, hkv, t = k.shape[0], k.shape[1], k.shape[2]
    _check_index(pos, "pos", torch.int64, [b, t], q, op)
    _check_index(valid, "valid", torch.bool, [b, t], q, op)
    _check_index(sinks, "sinks", torch.int64, [hkv], q, op)
    _check_index(window, "window", torch.int64, [hkv], q, op)


def check_decode_attention(q, k, v, valid) -> None:
    """Raise RuntimeError unless the arguments fit the decode contract."""
    op = "decode_attention"
    check_qkv(q, k, v, op, 3)
    _check_index(valid, "valid", torch.bool, [k.shape[0], k.shape[2]], q, op)


def check_softcap(softcap: float, op: str) -> None:
    torch._check(softcap >= 0 and softcap != float("inf"),
                 lambda: f"{op}: softcap must be 0 (none) or a positive finite number, got {softcap}")


def band_mask(pos: torch.Tensor, valid: torch.Tensor, sinks: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The allowed (query, key) pairs, [B, Hkv, T, T] bool."""
    t = pos.shape[1]
    idx = torch.arange(t, device=pos.device)
    causal = (idx[None, :] <= idx[:, None])[None, None]  # [1, 1, i, j]
    dist = (pos[:, :, None] - pos[:, None, :])[:, None]  # [B, 1, i, j]
    w, s = window[None, :, None, None], sinks[None, :, None, None]
    near = (w <= 0) | (dist < w) | (pos[:, None, None, :] < s)
    return causal & near & valid[:, None, None, :]


def masked_attention(q, k, v, mask, scale, softcap):
    """fp32 softmax(cap(scale · q k^T)) v over ``mask`` (broadcast to the scores), 0 for rows with no
    key; k, v and mask are per KV head and repeated for the query heads of each group."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    if mask.shape[1] != 1:
        mask = mask.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.matmul(p, v)


def band_attention_reference(q, k, v, pos, valid, sinks, window, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """[B, Hq, T, D] in q's dtype; see the module docstring."""
    check_band_attention(q, k, v, pos, valid, sinks, window)
    check_softcap(softcap, "band_attention")
    return masked_attention(q, k, v, band_mask(pos, valid, sinks, window), scale, softcap).to(q.dtype)


def decode_attention_reference(q, k, v, valid, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """[B, Hq, D] in q's dtype; see the module docstring."""
    check_decode_attention(q, k, v, valid)
    check_softcap(softcap, "decode_attention")
    mask = valid[:, None, None, :]  # [B, 1, 1, L]
    return masked_attention(q[:, :, None], k, v, mask, scale, softcap)[:, :, 0].to(q.dtype)
