"""Timing primitives shared by the benchmarks: prefill and decode throughput of a causal LM.

Decode is timed as ``steps`` greedy one-token forward passes over a KV cache filled by a prefill
of ``prompt_len`` tokens per row; only the decode steps are on the clock.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Throughput:
    """Tokens per second of repeated runs; ``median`` is what reports use."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def make_batch(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, prompt_len), generator=g)


@torch.inference_mode()
def prefill_tps(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return ids.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def decode_tps(model, ids: torch.Tensor, steps: int) -> float:
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, batch, length = out.past_key_values, ids.shape[0], ids.shape[1]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for step in range(steps):
        position = torch.full((batch, 1), length + step, dtype=torch.long)
        out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - start)


def decode_step(model, batch: int, prompt_len: int = 64):
    """A callable that runs one greedy decode step at position ``prompt_len`` over the same cached
    prompt every time (the cache is cropped back before each step): for pytest-benchmark."""
    ids = make_batch(batch, prompt_len, model.config.get_text_config().vocab_size)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    position = torch.full((batch, 1), prompt_len, dtype=torch.long)

    def step():
        cache = out.past_key_values
        cache.crop(prompt_len)
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)

    return step
