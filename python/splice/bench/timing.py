"""Timing primitives shared by the benchmarks: prefill and decode throughput of a causal LM, and
the one rule every benchmark times its settings by (:func:`interleaved`).

Decode is timed as ``steps`` greedy one-token forward passes over a KV cache filled by a prefill
of ``prompt_len`` tokens per row; only the decode steps are on the clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..decoding.compiled_decode import CompiledDecoder

Setting = tuple[str, Callable[[], AbstractContextManager]]  # a name and what installs it for a block


def interleaved(settings: Sequence[Setting], measure: Callable[[str], dict[str, float]], repeats: int,
                desc: str = "timing", progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """``runs[name][key]``: ``repeats`` values of ``measure(name)[key]``, each taken inside ``name``'s
    context, round by round: every round visits every setting in order, so drift hits them alike.
    Round 0 warms every setting up and is discarded."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = [name for name, _ in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be distinct, got {names}")
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    with tqdm(total=repeats * len(settings), desc=desc, disable=not progress) as bar:
        for round_ in range(repeats + 1):
            for name, context in settings:
                with context():
                    values = measure(name)
                if round_:
                    for key, value in values.items():
                        runs[name].setdefault(key, []).append(value)
                    bar.update()
    return runs


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


def greedy_steps(model, out, batch: int, length: int, steps: int) -> None:
    """``steps`` greedy one-token forward passes after ``out``, the output of a prefill of ``length`` tokens."""
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps):
        position = torch.full((batch, 1), length + step, dtype=torch.long)
        out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def decode_tps(model, ids: torch.Tensor, steps: int) -> float:
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    start = time.perf_counter()
    greedy_steps(model, out, ids.shape[0], ids.shape[1], steps)
    return ids.shape[0] * steps / (time.perf_counter() - start)


def compiled_decode_tps(decoder: CompiledDecoder, ids: torch.Tensor, steps: int) -> float:
    """Tokens/s of ``steps`` compiled greedy decode steps after an eager prefill of ``ids``."""
    decoder.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
    if not decoder.last_compiled:
        raise RuntimeError("the compiled decoder ran eagerly")
    return ids.shape[0] * steps / decoder.last_decode_seconds


@torch.inference_mode()
def decode_layer_seconds(model, layers, ids: torch.Tensor, steps: int) -> float:
    """Mean seconds one of ``layers`` (decoder layer modules) takes per greedy decode step of ``ids``:
    the clock runs from each layer call's start to its end (forward hooks), decode steps only."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    started: dict[int, float] = {}
    total = 0.0

    def before(module, args):
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        nonlocal total
        total += time.perf_counter() - started.pop(id(module))

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(before),
                                               layer.register_forward_hook(after))]
    try:
        greedy_steps(model, out, ids.shape[0], ids.shape[1], steps)
    finally:
        for h in handles:
            h.remove()
    return total / (steps * len(layers))


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
