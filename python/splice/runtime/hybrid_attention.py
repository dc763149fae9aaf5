"""The attention forward splice installs on a layer with streaming heads (an instance attribute
of the model's attention module; the module, its parameters and its class are unchanged).

Same projections, norms and rotary embedding as the family's own attention, then per head group:

* full KV heads: their keys and values go to Hugging Face's cache as usual (a cache layer of fewer
  heads) and attention is SDPA with the model's own mask;
* streaming KV heads: their keys and values go to a :class:`StreamingKV` kept on the cache object,
  and their queries attend to the stored sinks and window plus the new tokens, under the mask of
  :mod:`splice.hybrid.head_map` (original positions).

With a KV cache, a prefill runs every head in one ``splice::band_attention`` call (full heads with
no window, streaming heads with theirs) and a one-token decode step runs
``splice::decode_attention`` on each group. Other shapes (several new tokens over a filled cache)
and passes without a cache use SDPA with explicit masks: the masked full attention that the
kernel paths are tested against.

The head outputs are put back in the model's head order and go through ``o_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..ops import band_attention, decode_attention
from .kv_cache import STREAMS, hold_length, static_layer
from .streaming_kv import StreamingKV


def project_heads(attn, hidden: torch.Tensor, num_heads: int, num_kv: int, head_dim: int):
    """q [B, Hq, T, D], k and v [B, Hkv, T, D] before the rotary embedding."""
    b, t, _ = hidden.shape
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
        q, k, v = attn.qkv_proj(hidden).split([num_heads * head_dim, num_kv * head_dim, num_kv * head_dim], -1)
    else:
        q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
    q, k, v = q.view(b, t, -1, head_dim), k.view(b, t, -1, head_dim), v.view(b, t, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary embedding
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_ok: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: key visible to query under sinks + window (keys already causal-valid)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    seen = (diff >= 0) & ((diff < window) | (k_pos[:, None, :] < sinks)) & k_ok[:, None, :]
    return seen[:, None]


def real_new_tokens(attention_mask: torch.Tensor, cache, layer_idx: int, t: int) -> torch.Tensor:
    """[B, t] bool: which of the ``t`` new tokens are real (not padding), read from the 4-D mask's
    rows of the new queries at the key columns of the new tokens. A growing cache's mask ends with
    those columns; a static cache's (fixed ``max_cache_len`` columns) has them at its write offset,
    read as a tensor so that a compiled step does not specialise on it. A token is real when the last
    query sees it or it sees itself: the second is what a layer with its own sliding window needs,
    where the last query cannot see tokens more than the window back."""
    rows = attention_mask[:, 0, -t:]
    layer = static_layer(cache, layer_idx)
    if layer is not None:
        start = layer.cumulative_length.to(rows.device)
        block = rows.index_select(-1, torch.arange(t, device=rows.device) + start)
    else:
        block = rows[..., -t:]
    seen = block if block.dtype == torch.bool else block == 0
    return seen[:, -1] | seen.diagonal(dim1=-2, dim2=-1)


def model_window(adapter, attn) -> int:
    """The sliding window the model's own attention has in this layer (0: none). An attention module
    that says (Gemma 2 and 3, Qwen 2: ``None`` on its global layers) is believed over the config."""
    if hasattr(attn, "sliding_window"):
        return int(attn.sliding_window or 0)
    return int(getattr(adapter.config, "sliding_window", None) or 0)


def logit_softcap(attn) -> float:
    """The attention's logit soft-cap (Gemma 2's ``attn_logit_softcapping``; 0: none)."""
    return float(getattr(attn, "attn_logit_softcapping", None) or 0.0)


def attend(q, k, v, mask, causal: bool, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Grouped-query attention of q [B, Hq, T, D] over k, v [B, Hkv, L, D] under ``mask`` (bool, True
    where visible, or additive) or causally: SDPA; with ``softcap > 0`` the scores are soft-capped,
    ``softcap · tanh(s / softcap)``, which SDPA cannot do, so it is written out as Gemma 2's eager
    attention does (masked scores at the dtype's minimum, softmax in fp32)."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap)
    if causal:
        t, n = s.shape[-2:]
        mask = torch.ones(t, n, dtype=torch.bool, device=s.device).tril(n - t)
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(v.dtype), v)


def streaming_window(window: int, layer_window: int) -> int:
    """A streaming head's window in a layer: the map's ``window``, capped by the layer's own sliding
    window (the model never attends further back there); its sinks stay."""
    return min(window, layer_window) if layer_window else window


def make_attention_forward(adapter, layer_idx: int, head_map, runtime):
    attn = adapter.layers[layer_idx].self_attn
    hq, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    group = hq // hkv
    full, stream = head_map.full_heads(layer_idx), head_map.streaming(layer_idx)
    q_full = [h for g in full for h in range(g * group, (g + 1) * group)]
    q_stream = [h for g in stream for h in range(g * group, (g + 1) * group)]
    order = torch.argsort(torch.tensor(q_full + q_stream))
    full_window = model_window(adapter, attn)
    sinks, window = head_map.sinks, streaming_window(head_map.window, full_window)
    head_sinks = torch.tensor([0 if g in full else sinks for g in range(hkv)])
    head_window = torch.tensor([full_window if g in full else window for g in range(hkv)])
    softcap = logit_softcap(attn)
    state = runtime.state

    def store_of(cache) -> StreamingKV:
        return cache.__dict__.setdefault(STREAMS, {}).setdefault(layer_idx, StreamingKV(sinks, window))

    def kernel_path(q, k, v, pos, real, attention_mask, cache, hidden_states):
        """Prefill (one band_attention launch) or a one-token decode step; writes both caches."""
        b, t = pos.shape
        if state.prefill:
            out = band_attention(q, k, v, pos, real, head_sinks.to(pos.device), head_window.to(pos.device),
                                 attn.scaling, softcap)
        if full:
            kf, vf = cache.update(k[:, full].contiguous(), v[:, full].contiguous(), layer_idx)
        else:
            hold_length(cache, layer_idx, b, t, hidden_states)
        heads = []
        if stream:  # empty only where every head of the layer is full and splice runs it anyway
            store = store_of(cache)
            store.write(k[:, stream], v[:, stream], pos, real)
            if not state.prefill:
                heads.append(decode_attention(q[:, q_stream, 0], store.keys, store.values, store.valid, attn.scaling,
                                              softcap))
        if state.prefill:
            return out
        if full:
            seen = (attention_mask[:, 0, -1, :kf.shape[2]] if attention_mask is not None
                    else torch.ones(b, kf.shape[2], dtype=torch.bool, device=pos.device))
            seen = seen if seen.dtype == torch.bool else seen == 0
            heads.insert(0, decode_attention(q[:, q_full, 0], kf, vf, seen, attn.scaling, softcap))
        return torch.cat(heads, 1)[:, order, None]

    def forward(hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = project_heads(attn, hidden_states, hq, hkv, d)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        pos = state.pos.view(b, t)
        real = torch.ones_like(pos, dtype=torch.bool)
        if attention_mask is not None:
            real = real_new_tokens(attention_mask, past_key_values, layer_idx, t)
        if past_key_values is not None and (state.prefill or t == 1):
            out = kernel_path(q, k, v, pos, real, attention_mask, past_key_values, hidden_states)
            return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d)), None
        outputs = []
        if full:
            kf, vf = k[:, full], v[:, full]
            if past_key_values is not None:
                kf, vf = past_key_values.update(kf.contiguous(), vf.contiguous(), layer_idx)
            mask = attention_mask[..., :kf.shape[2]] if attention_mask is not None else None
            outputs.append(attend(q[:, q_full], kf, vf, mask, mask is None and t > 1, attn.scaling, softcap))
        elif past_key_values is not None:
            hold_length(past_key_values, layer_idx, b, t, hidden_states)
        if not stream:  # every head full (a layer spliced on purpose): nothing streams
            out = torch.cat(outputs, 1)[:, order]
            return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d)), None
        ks, vs, qs = k[:, stream], v[:, stream], q[:, q_stream]
        mask = band_mask(pos, pos, real, sinks, window) | torch.eye(t, dtype=torch.bool, device=pos.device)
        store = None
        if past_key_values is not None:
            store = store_of(past_key_values)
            if store.keys is not None:
                old = band_mask(pos, store.pos, store.valid, sinks, window)
                ks, vs = torch.cat([store.keys, ks], 2), torch.cat([store.values, vs], 2)
                mask = torch.cat([old, mask], -1)
        outputs.append(attend(qs, ks, vs, mask, False, attn.scaling, softcap))
        if store is not None:
            store.write(k[:, stream], v[:, stream], pos, real)
        out = torch.cat(outputs, 1)[:, order]  # [B, Hq, T, D] in the model's head order
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d)), None

    return forward
