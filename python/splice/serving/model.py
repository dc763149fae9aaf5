"""What splice installs on a loaded vLLM model: steering at a layer's input (``in``), its heads'
outputs (``heads``, the input of ``o_proj``), after its attention (``attn``), MLP (``mlp``) and
output (``out``), static layer skips, and the step preparation on the outer forward.

All of it is instance ``forward`` attributes (the modules, their classes and weights stay vLLM's).
vLLM's decoder layers return ``(h, residual)`` whose sum is the residual stream, with the add left
to the next layer's fused add+norm. Steering keeps that contract:

* ``attn`` / ``mlp`` steer the sub-layer's output before it is added (the op's ``u`` is that output);
* ``in`` and ``out`` steer the residual stream itself: ``u = h + residual`` is formed (the add the
  next fused add+norm would do, in the same order as Hugging Face's), steered by any op, and handed
  on as ``(u, None)`` into the layer (``in``) or ``(u, 0)`` out of it (``out``), so the next add is
  exact and every op (add, ablate, clamp, gates, maps) sees the whole stream;
* ``heads`` steers ``o_proj``'s input ``[tokens, heads · head_dim]`` (head scales, per-head vectors);
* a layer with a CAST condition first hands its input stream to the prefill decisions
  (:mod:`.prefill_decisions`).

Tokens of unsteered rows pass through every op unchanged, bit for bit. The outer (not compiled)
forward fills the per-token buffers once per step; the compiled layers only read buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import fused_steer
from .prefill_decisions import serve_decide
from .steering_state import ServeSteering

ATTRIBUTE = "splice_serving"


def _steer(t, tables, layer: int, site: str, state: ServeSteering, positions):
    vecs, params = tables.get(layer, site)
    if vecs is None:
        return t
    n = t.shape[0]
    gates = state.decisions.gates[:n] if state.decisions.deciders else None
    return fused_steer(t, None, vecs, params, state.slot[:n], positions, state.gen[:n], gates=gates)[0]


def _layer_forward(layer: nn.Module, idx: int, state: ServeSteering, parts: tuple[bool, bool]):
    run_attn, run_mlp = parts
    original = type(layer).forward
    tables = state.tables
    steer_in, steer_out = (idx, "in") in tables.keys, (idx, "out") in tables.keys
    decides = idx in state.decisions.layers

    def forward(positions, hidden_states, residual, *args, **kwargs):
        if decides:  # prefill decisions read the layer's input stream
            serve_decide(hidden_states if residual is None else hidden_states + residual, state.decisions.gates, idx)
        if not (run_attn or run_mlp):
            return hidden_states, residual
        if steer_in:
            stream = hidden_states if residual is None else hidden_states + residual
            hidden_states, residual = _steer(stream, tables, idx, "in", state, positions), None
        if run_attn and run_mlp:
            h, residual = original(layer, positions, hidden_states, residual, *args, **kwargs)
        elif run_attn:  # MLP skipped: the attention output is the layer's h
            if residual is None:
                residual, h = hidden_states, layer.input_layernorm(hidden_states)
            else:
                h, residual = layer.input_layernorm(hidden_states, residual)
            h = layer.self_attn(positions=positions, hidden_states=h)
        else:  # attention skipped
            if residual is None:
                residual, h = hidden_states, layer.post_attention_layernorm(hidden_states)
            else:
                h, residual = layer.post_attention_layernorm(hidden_states, residual)
            h = layer.mlp(h)
        h = _steer(h, tables, idx, "mlp", state, positions)
        if steer_out:
            stream = _steer(h + residual, tables, idx, "out", state, positions)
            # a zero residual, not None: the next fused add+norm then runs the same kernel on the
            # same values as an unpatched layer's, so unsteered rows stay bit-identical
            return stream, torch.zeros_like(stream)
        return h, residual

    return forward


def _attn_forward(attn: nn.Module, idx: int, state: ServeSteering):
    original = type(attn).forward

    def forward(positions, hidden_states, *args, **kwargs):
        out = original(attn, positions, hidden_states, *args, **kwargs)
        return _steer(out, state.tables, idx, "attn", state, positions)

    return forward


def _o_proj_forward(linear: nn.Module, idx: int, state: ServeSteering):
    """``o_proj`` with its input (the heads' concatenated outputs) steered at site ``heads``."""
    original = type(linear).forward

    def forward(x, *args, **kwargs):
        return original(linear, _steer(x, state.tables, idx, "heads", state, state.pos[:x.shape[0]]), *args, **kwargs)

    return forward


def _outer_forward(model: nn.Module, state: ServeSteering):
    original = type(model).forward

    def forward(*args, **kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        state.prepare(positions)
        return original(model, *args, **kwargs)

    return forward


def install(model: nn.Module, adapter, state: ServeSteering, parts: list[tuple[bool, bool]]) -> None:
    """Attach ``state`` and install the forwards (the recipe is already checked against the model)."""
    model.add_module(ATTRIBUTE, state)
    keys = state.tables.keys
    for idx, layer in enumerate(adapter.layers):
        if parts[idx] != (True, True) or any(key[0] == idx for key in keys) or idx in state.decisions.layers:
            layer.forward = _layer_forward(layer, idx, state, parts[idx])
        if (idx, "attn") in keys:
            layer.self_attn.forward = _attn_forward(layer.self_attn, idx, state)
        if (idx, "heads") in keys:
            o_proj = adapter.o_proj(idx)
            o_proj.forward = _o_proj_forward(o_proj, idx, state)
    model.forward = _outer_forward(model, state)
