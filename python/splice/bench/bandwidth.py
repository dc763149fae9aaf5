"""How close a decode step comes to the machine's memory bandwidth.

``read_bandwidth`` times ``torch.sum`` over a float32 buffer far larger than the last-level cache
(every byte read once per pass, on all of torch's threads): bytes ÷ seconds of the fastest pass.
A greedy decode step at batch ``b`` reads every Linear weight once and each sequence's KV cache
once: ``bytes_per_step = weight_bytes + b · kv_bytes_per_token · context``, with ``context`` the
mean number of cached positions over the timed steps. At ``tps`` tokens/s that streams
``bytes_per_step · tps / b`` bytes/s; ``bandwidth_fraction`` divides it by the measured bandwidth.
Activations, norms and the embedding rows looked up are left out (under 0.1% of the weights).
"""

from __future__ import annotations

import time

import torch


def read_bandwidth(mib: int = 1024, passes: int = 5) -> float:
    """Bytes per second of the fastest of ``passes`` full reads of a ``mib``-MiB buffer."""
    buf = torch.ones(mib * 2**20 // 4)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one cached position holds, over every layer, in the model's dtype."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size()


def bytes_per_step(weight_bytes: int, kv_per_token: int, batch: int, context: float) -> float:
    return weight_bytes + batch * kv_per_token * context


def bandwidth_fraction(step_bytes: float, tokens_per_second: float, batch: int, bandwidth: float) -> float:
    return step_bytes * tokens_per_second / batch / bandwidth
