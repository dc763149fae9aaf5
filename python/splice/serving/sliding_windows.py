"""Hybrid attention behind vLLM: a head map's windowed layers as vLLM's per-layer sliding windows.

vLLM's Llama-family models read ``layer_types`` (``"sliding_attention"`` or ``"full_attention"`` per
layer) and ``sliding_window`` from the Hugging Face config; its hybrid KV-cache manager then keeps
the sliding layers in their own block group and frees the blocks that fall out of the window, and
its attention lets query ``i`` see key ``j`` when ``i - j < window``, as splice's ``window`` heads do.
A head map serves this way when

* its streaming heads are plain windows (``kind="window"``): vLLM's sliding window keeps no
  attention sinks, and its KV-cache manager frees the sinks' blocks with the rest;
* each layer's KV heads are all full or all windowed: vLLM keeps one KV layout per layer, so a layer
  with some heads streaming would free no memory, and its attention backends take one window per
  layer (a backend registered by a plugin gets the same per-layer blocks).

Anything else is refused with the reason. The overrides go to vLLM as ``--hf-overrides``; the
loader checks that the built model's attention layers have exactly these windows.
"""

from __future__ import annotations

from ..hybrid.head_map import HeadMap
from ..recipe import RecipeError

SLIDING, FULL = "sliding_attention", "full_attention"


def load_head_map(path: str, shape=None) -> HeadMap:
    """The head map at ``path`` (checked against ``shape``, a model's sizes, when given); RecipeError when bad."""
    try:
        head_map = HeadMap.load(path)
        if shape is not None:
            head_map.validate_for(shape)
    except ValueError as exc:
        raise RecipeError(f"head_map: {exc}") from exc
    return head_map


def window_overrides(head_map: HeadMap) -> dict:
    """``{"layer_types": [...], "sliding_window": W}`` for ``head_map``; RecipeError when vLLM cannot serve it."""
    if head_map.kind != "window":
        raise RecipeError(f"head_map: streaming heads with attention sinks (kind={head_map.kind!r}, "
                          f"sinks={head_map.sinks}) cannot be served: vLLM's sliding-window KV cache frees the "
                          "sinks' blocks; build the map with kind='window' (sinks=0)")
    mixed = [l for l in range(head_map.num_layers) if 0 < len(head_map.full_heads(l)) < head_map.num_kv_heads]
    if mixed:
        raise RecipeError(f"head_map: layers {mixed} mix full and windowed KV heads; vLLM keeps one KV layout per "
                          "layer, so per-head streaming would free no memory: make each layer all full or all windowed")
    types = [FULL if head_map.full_heads(l) else SLIDING for l in range(head_map.num_layers)]
    if SLIDING not in types:
        raise RecipeError("head_map: every layer has full attention; there is no window to serve")
    return {"layer_types": types, "sliding_window": head_map.window}


def check_windows(layers, overrides: dict) -> None:
    """RecipeError unless vLLM's decoder ``layers`` have the attention windows ``overrides`` asked for."""
    want = [overrides["sliding_window"] if t == SLIDING else None for t in overrides["layer_types"]]
    got = [layer.self_attn.attn.sliding_window for layer in layers]
    if got != want:
        raise RecipeError(f"head_map: vLLM built attention windows {got}, not {want}: this model family does not "
                          "read per-layer 'layer_types' (or --hf-overrides changed them)")
