"""Keeping Hugging Face's KV cache consistent when layers or rows skip attention.

* A layer whose attention is skipped for every row keeps a *length-only* entry: its keys and
  values are a stride-0 view of one zero, shaped ``[batch, 1, length, 1]``. It holds one element
  of memory, yet ``get_seq_length``/``get_mask_sizes`` (which Hugging Face reads to place
  positions and masks, from layer 0 and the first sliding layer) stay right. A static cache layer
  (``is_compileable``, fixed addresses for ``torch.compile``) keeps its own ``[batch, 1, max_len, 1]``
  tensor of zeros instead: one element per position, updated in place.
* A layer that runs on a subset of the batch rows during decoding (per-request routing) keeps
  only those rows: on its first decode step the cached rows of the skipping requests are dropped
  (their memory is freed) and the layer's cache grows for the active rows alone.
"""

from __future__ import annotations

import torch

STREAMS = "splice_streams"  # attribute of a cache holding hybrid attention's streaming stores, by layer


def _placeholder(like: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    return like.new_zeros(()).expand(batch, 1, length, 1)


def static_layer(cache, layer_idx: int):
    """Layer ``layer_idx`` of ``cache`` if it is a static layer (``is_compileable``: fixed
    ``max_cache_len`` columns written in place), else None."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and getattr(layers[layer_idx], "is_compileable", False):
        return layers[layer_idx]
    return None


def hold_length(cache, layer_idx: int, batch: int, new_tokens: int, like: torch.Tensor) -> None:
    """Advance layer ``layer_idx``'s cache by ``new_tokens`` without storing keys or values."""
    if static_layer(cache, layer_idx) is not None:
        step = _placeholder(like, batch, new_tokens)  # a static layer: [batch, 1, max_len, 1], written in place
        cache.update(step, step, layer_idx)
        return
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and layers[layer_idx].is_initialized:
        layer = layers[layer_idx]
        if layer.keys.stride(-2) != 0 or layer.keys.shape[0] != batch:  # real KV held so far: free it
            layer.keys = layer.values = _placeholder(like, batch, layer.keys.shape[-2])
    step = _placeholder(like, batch, new_tokens)
    cache.update(step, step, layer_idx)
    layer = cache.layers[layer_idx]
    layer.keys = layer.values = _placeholder(like, batch, layer.keys.shape[-2])


class RowSubsetCache:
    """The KV cache as seen by one layer that runs on the batch rows ``rows`` only."""

    def __init__(self, cache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        layers = self.cache.layers
        if layer_idx < len(layers) and layers[layer_idx].is_initialized:
            layer = layers[layer_idx]
            if layer.keys.shape[0] != self.rows.numel():  # first step on the subset: drop the other rows
                layer.keys = layer.keys.index_select(0, self.rows)
                layer.values = layer.values.index_select(0, self.rows)
        return self.cache.update(keys, values, layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def crop_to(cache, length: int) -> None:
    """Keep the first ``length`` cached tokens of every full-attention layer (longer ones only)."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError("crop_to supports full-attention cache layers only")
        if layer.is_initialized and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def kv_bytes(cache) -> int:
    """Bytes of memory the cache's key and value tensors really hold (shared storage counted once),
    including the streaming heads' stores of hybrid attention."""
    seen, total = set(), sum(s.nbytes() for s in getattr(cache, STREAMS, {}).values())
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
