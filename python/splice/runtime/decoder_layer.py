"""The decoder-layer forward splice installs on each layer (an instance attribute, so the layer
object, its class, its parameters and Hugging Face's hooks on it stay as they were).

Same math as the family's own forward (see splice.adapters.architecture), with every RMSNorm,
residual add and steering site done by ``splice.ops.fused_steer``::

    r, h = fused_steer(x, steer "in", norm1)             # steer the layer input, normalise
    a    = attn(h)                                        # (sandwich: a = post_attn_norm(a))
    r, h = fused_steer(r, a steered "attn", norm2)       # add, normalise for the MLP
    m    = mlp(h)                                         # (sandwich: m = post_ff_norm(m))
    r    = fused_steer(r, m steered "mlp"), then steer "out"

Attention is the model's own module, called with the layer's keyword arguments unchanged, so the
KV cache, masks and rotary embeddings behave exactly as in Hugging Face.

Skipping (see splice.runtime.skip_state): a skipped attention or MLP is left out of the chain above
(a skipped attention keeps a length-only KV entry); a layer that only some rows of the batch run
gathers those rows, runs on them alone, and scatters its output back over the input.
"""

from __future__ import annotations

from ..adapters.architecture import Adapter, norm_eps
from ..ops import fused_steer, gather_rows, scatter_rows
from .kv_cache import RowSubsetCache, hold_length


def _rows_of(value, rows, batch: int):
    """``value`` restricted to the batch rows ``rows`` where it has a batch dimension."""
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, batch) for v in value)
    if hasattr(value, "shape") and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def make_forward(adapter: Adapter, layer_idx: int, runtime):
    layer = adapter.layers[layer_idx]
    attn, mlp, norm1 = layer.self_attn, layer.mlp, layer.input_layernorm
    sandwich, offset = adapter.family.sandwich, adapter.family.norm_offset
    norm2 = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
    post_attn = layer.post_attention_layernorm if sandwich else None
    post_ff = layer.post_feedforward_layernorm if sandwich else None
    drop_attn = getattr(layer, "resid_attn_dropout", None)
    drop_mlp = getattr(layer, "resid_mlp_dropout", None)
    eps1, eps2 = norm_eps(norm1), norm_eps(norm2)
    post_eps = {id(n): norm_eps(n) for n in (post_attn, post_ff) if n is not None}
    tables, state, skip, gates = runtime.tables, runtime.state, runtime.skip, runtime.gates

    def steer(t, delta, table, tok, weight=None, eps=0.0):
        """``fused_steer`` of ``t`` (+ ``delta``) with ``table`` (vecs, params: this layer's table of a
        site, or (None, None)); ``tok`` is (slot, pos, gen, row gates) of its tokens."""
        vecs, params = table
        return fused_steer(t, delta, vecs, params, *tok[:3], weight, eps, offset if weight is not None else 0.0,
                           tok[3] if vecs is not None else None)

    def site(name):
        return tables.get(layer_idx, name)

    def block(x, batch, seq, kwargs, tok, run_attn, run_mlp):
        """The layer on ``x`` [batch * seq, hidden]; returns the new residual stream."""
        hidden = x.shape[-1]
        if run_attn:
            r, h = steer(x, None, site("in"), tok, norm1.weight, eps1)
            a, _ = attn(hidden_states=h.view(batch, seq, hidden), **kwargs)
            a = a.reshape(batch * seq, hidden)
            if post_attn is not None:
                a = steer(a, None, (None, None), tok, post_attn.weight, post_eps[id(post_attn)])[1]
            if drop_attn is not None and layer.training:
                a = drop_attn(a)
            r, h = steer(r, a, site("attn"), tok, *((norm2.weight, eps2) if run_mlp else (None, 0.0)))
        else:
            r, h = steer(x, None, site("in"), tok, norm2.weight, eps2)
        if run_mlp:
            m = mlp(h.view(batch, seq, hidden)).reshape(batch * seq, hidden)
            if post_ff is not None:
                m = steer(m, None, (None, None), tok, post_ff.weight, post_eps[id(post_ff)])[1]
            if drop_mlp is not None and layer.training:
                m = drop_mlp(m)
            r, _ = steer(r, m, site("mlp"), tok)
        out = site("out")
        if out[0] is not None:
            r, _ = steer(r, None, out, tok)
        return r

    def on_rows(hidden_states, rows, kwargs, run_attn, run_mlp):
        """Run the layer on the batch rows ``rows`` only; the other rows pass through unchanged."""
        batch, seq, hidden = hidden_states.shape
        sub = {k: _rows_of(v, rows, batch) for k, v in kwargs.items() if k != "past_key_values"}
        if kwargs.get("past_key_values") is not None:
            sub["past_key_values"] = RowSubsetCache(kwargs["past_key_values"], rows)
        tok = tuple(t.view(batch, seq).index_select(0, rows).reshape(-1) for t in (state.slot, state.pos, state.gen))
        if gates.token is not None:
            tok += (gates.token.view(batch, seq, -1).index_select(0, rows).reshape(rows.numel() * seq, -1),)
        else:
            tok += (None,)
        x = gather_rows(hidden_states, rows)
        r = block(x.reshape(-1, hidden), rows.numel(), seq, sub, tok, run_attn, run_mlp)
        return scatter_rows(hidden_states, r.view(rows.numel(), seq, hidden), rows)

    def forward(hidden_states, **kwargs):
        batch, seq, hidden = hidden_states.shape
        if not runtime.driven:
            runtime.begin_forward(batch, seq, kwargs["position_ids"], kwargs.get("past_key_values"))
        if gates.observes(layer_idx, state.prefill):
            gates.observe(layer_idx, hidden_states, state.prompt_len)
        run_attn, run_mlp = skip.parts(layer_idx)
        rows = None if state.prefill else skip.rows[layer_idx]
        cache = kwargs.get("past_key_values")
        if rows is not None and rows.numel() == 0:
            run_attn = run_mlp = False
        if not run_attn and cache is not None and layer_idx not in skip.draft:
            hold_length(cache, layer_idx, batch, seq, hidden_states)
        if not (run_attn or run_mlp):
            return hidden_states
        if rows is not None:
            return on_rows(hidden_states, rows, kwargs, run_attn, run_mlp)
        x = hidden_states.reshape(batch * seq, hidden)
        r = block(x, batch, seq, kwargs, (state.slot, state.pos, state.gen, gates.token), run_attn, run_mlp)
        if skip.observing(layer_idx, state.prefill):
            skip.router.observe(layer_idx, hidden_states, r.view(batch, seq, hidden), state.prompt_len)
        return r.view(batch, seq, hidden)

    return forward


def make_o_proj_forward(adapter: Adapter, layer_idx: int, runtime):
    """``o_proj`` with the "heads" site steered on its input (the heads' concatenated outputs)."""
    linear = adapter.o_proj(layer_idx)
    tables, state, gates = runtime.tables, runtime.state, runtime.gates
    original = type(linear).forward

    def forward(x):
        vecs, params = tables.get(layer_idx, "heads")
        if vecs is not None:
            flat = x.reshape(-1, x.shape[-1])
            x = fused_steer(flat, None, vecs, params, state.slot, state.pos, state.gen,
                            gates=gates.token)[0].view(x.shape)
        return original(linear, x)

    return forward
