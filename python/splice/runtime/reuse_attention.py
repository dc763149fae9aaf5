"""The attention forward splice installs for HyLRA layer reuse (an instance attribute of the
model's attention module, as for hybrid attention; the module and its parameters are unchanged).

* A pass that starts from an empty cache (prefill) or has no cache runs the model's own attention.
* Over a filled cache, a *selecting* layer (a full layer that some reusing layer reads) computes its
  attention itself: per KV head ``g`` and new token, ``p_h = softmax(cap(scale · q_h Kᵀ))`` over the
  visible slots (fp32 softmax), the output ``p_h V``, and the ``topk`` slots of the largest
  ``Σ_{h in g} p_h`` (slots of probability 0, e.g. padding, are dropped as -1). A *reusing* layer
  writes its keys and values to its own cache as usual and attends only to those slots of it: one
  new token per row through ``splice::index_attention``, several (teacher-forced evaluation) with an
  explicit mask, the path the kernel is tested against.

The selected slots live for one forward pass in :class:`SlotSelection`, written by the selecting
layer before the layers above it read them.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..ops import index_attention
from .hybrid_attention import logit_softcap, project_heads


class SlotSelection:
    """``slots[layer]``: [B, Hkv, T, K] int64 cache slots a selecting layer picked this pass."""

    def __init__(self):
        self.slots: dict[int, torch.Tensor] = {}


def visible_slots(attention_mask, b: int, t: int, length: int, device) -> torch.Tensor:
    """[B, T, L] bool: the cache slots each of the ``t`` new queries may read (the model's 4-D mask,
    bool or additive; causal over the last ``t`` slots without one)."""
    if attention_mask is not None:
        rows = attention_mask[:, 0, -t:, :length]
        return (rows if rows.dtype == torch.bool else rows == 0).expand(b, t, length)
    cols = torch.arange(length, device=device)
    rows = torch.arange(length - t, length, device=device)
    return (cols[None, :] <= rows[:, None]).expand(b, t, length)


def grouped_attention(q, k, v, visible, scale: float, softcap: float):
    """q [B, Hq, T, D] over k, v [B, Hkv, L, D] where ``visible`` [B, Hkv or 1, T, L]:
    ``(out [B, Hq, T, D], p [B, Hkv, G, T, L] fp32)``."""
    b, hq, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    group = hq // hkv
    s = torch.matmul(q.reshape(b, hkv, group * t, d), k.transpose(-1, -2)) * scale  # K read once per group
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.view(b, hkv, group, t, length).masked_fill(~visible[:, :, None], float("-inf"))
    p = torch.softmax(s, -1, dtype=torch.float32)
    out = torch.matmul(p.to(v.dtype).view(b, hkv, group * t, length), v)
    return out.view(b, hq, t, d), p


def top_slots(p: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, Hkv, T, K] int64: per KV head and query, the ``min(topk, L)`` slots of largest summed
    probability over the group's heads (``p`` [B, Hkv, G, T, L]); slots of probability 0 are -1.
    Ties go to the most recent slot (a stable sort of the slots latest first), so the choice does not
    depend on how many empty slots the cache has (a static cache's)."""
    length = p.shape[-1]
    values, order = p.sum(2).flip(-1).sort(dim=-1, descending=True, stable=True)
    k = min(topk, length)
    return (length - 1 - order[..., :k]).masked_fill(values[..., :k] <= 0, -1)


def slot_mask(slots: torch.Tensor, length: int) -> torch.Tensor:
    """[B, Hkv, T, L] bool, True at the listed slots (-1 entries mark nothing)."""
    marks = torch.zeros(*slots.shape[:-1], length + 1, dtype=torch.bool, device=slots.device)
    marks.scatter_(-1, torch.where(slots < 0, length, slots), True)
    return marks[..., :length]


def make_reuse_forward(adapter, layer_idx: int, policy, runtime, selection: SlotSelection):
    attn = adapter.layers[layer_idx].self_attn
    own = attn.forward  # the class's forward, bound: prefill and cache-less passes
    hq, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    softcap = logit_softcap(attn)
    anchor = policy.anchor(layer_idx)
    selecting = anchor == layer_idx
    state = runtime.state

    def forward(hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is None or state.prefill:
            return own(hidden_states, position_embeddings, attention_mask=attention_mask,
                       past_key_values=past_key_values, **kwargs)
        b, t, _ = hidden_states.shape
        q, k, v = project_heads(attn, hidden_states, hq, hkv, d)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        k, v = past_key_values.update(k.contiguous(), v.contiguous(), layer_idx)
        visible = visible_slots(attention_mask, b, t, k.shape[2], k.device)[:, None]
        if selecting:
            out, p = grouped_attention(q, k, v, visible, attn.scaling, softcap)
            selection.slots[layer_idx] = top_slots(p, policy.topk)
        elif t == 1:
            out = index_attention(q[:, :, 0], k, v, selection.slots[anchor][:, :, 0], attn.scaling,
                                  softcap)[:, :, None]
        else:
            chosen = slot_mask(selection.slots[anchor], k.shape[2]) & visible
            out, _ = grouped_attention(q, k, v, chosen, attn.scaling, softcap)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d)), None

    return forward
