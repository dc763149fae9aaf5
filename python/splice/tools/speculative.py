"""Self-speculative decoding (lossless, greedy, batch 1): a draft pass through the model with
some layers skipped proposes ``draft_len`` tokens one at a time; one pass of the full model over
them verifies all at once; the longest agreeing prefix is kept plus the full model's own next
token. The output is the full model's greedy output. ``draft_layers=None`` is "no draft": plain
greedy decoding, one full pass per token, through the same loop.

KV cache: draft-skipped layers leave their cache untouched while drafting; before verifying,
every layer is cropped back to the verified length, and the verification pass writes the full
model's keys and values for the new tokens in every layer.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..adapters.architecture import Adapter
from ..runtime.kv_cache import crop_to
from ..runtime.splice_runtime import ATTRIBUTE


@dataclass
class SpeculativeStats:
    new_tokens: int
    cycles: int
    drafted: int
    accepted: int
    seconds: float

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def check_draft(adapter: Adapter, draft_layers, draft_len: int) -> frozenset[int]:
    layers = frozenset(int(l) for l in draft_layers)
    bad = sorted(l for l in layers if not 0 <= l < adapter.num_layers)
    if bad:
        raise ValueError(f"draft layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")
    if 0 in layers:
        raise ValueError("the draft cannot skip layer 0: Hugging Face reads positions and masks from its KV cache")
    if not layers or len(layers) >= adapter.num_layers:
        raise ValueError("the draft must skip at least one layer and keep at least one")
    if draft_len < 1:
        raise ValueError(f"draft_len must be at least 1, got {draft_len}")
    return layers


@contextlib.contextmanager
def _patched(model):
    """The model's splice patch runtime, patching for the duration when it has none."""
    if hasattr(model, ATTRIBUTE):
        yield getattr(model, ATTRIBUTE)
        return
    from ..patch import patch

    with patch(model):
        yield getattr(model, ATTRIBUTE)


def _step(model, tokens: torch.Tensor, cache, start: int, all_logits: bool = False) -> torch.Tensor:
    positions = torch.arange(start, start + tokens.shape[-1], device=tokens.device)[None]
    out = model(input_ids=tokens[None], past_key_values=cache, position_ids=positions, use_cache=True,
                logits_to_keep=0 if all_logits else 1)
    return out.logits[0].argmax(-1)


@torch.inference_mode()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, draft_layers, draft_len: int,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of ``input_ids`` [1, n] (returns [1, n + new]) and its statistics;
    ``draft_layers`` None decodes plainly (``draft_len`` is then ignored)."""
    adapter = Adapter(model)
    draft = None if draft_layers is None else check_draft(adapter, draft_layers, draft_len)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"self-speculative decoding takes one sequence [1, n], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    with _patched(model) as runtime:
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        n = input_ids.shape[1]
        token = _step(model, input_ids[0], cache, 0)[-1:]
        new, cycles, drafted, accepted = [token], 0, 0, 0
        while sum(t.numel() for t in new) < max_new_tokens and int(new[-1][-1]) != eos_token_id:
            if draft is None:
                token = _step(model, token, cache, n)
                new.append(token)
                n += 1
                continue
            guesses, t = [], token
            runtime.skip.draft = draft
            try:
                for i in range(draft_len):
                    t = _step(model, t, cache, n + i)
                    guesses.append(t)
            finally:
                runtime.skip.draft = frozenset()
            crop_to(cache, n)
            proposal = torch.cat(guesses)
            truth = _step(model, torch.cat([token, proposal]), cache, n, all_logits=True)
            agree = int((proposal == truth[:-1]).long().cumprod(0).sum())
            token = truth[agree:agree + 1]
            new.append(torch.cat([proposal[:agree], token]))
            n += agree + 1
            crop_to(cache, n)
            cycles, drafted, accepted = cycles + 1, drafted + draft_len, accepted + agree
        out = torch.cat(new)[:max_new_tokens]
        if eos_token_id is not None and (out == eos_token_id).any():
            out = out[: int((out == eos_token_id).nonzero()[0]) + 1]
        seconds = time.perf_counter() - start
    stats = SpeculativeStats(out.numel(), cycles, drafted, accepted, seconds)
    return torch.cat([input_ids[0], out])[None], stats


@dataclass
class DraftChoice:
    layers: list[int]
    draft_len: int
    tokens_per_second: float
    acceptance: float


def search_draft(model, prompts: list[torch.Tensor], order: list[int], counts, lengths,
                 new_tokens: int = 24, progress: bool = True) -> tuple[DraftChoice | None, list[DraftChoice]]:
    """Measured search: for each ``count`` (the first ``count`` layers of ``order``, least important
    first, layer 0 excluded) and each draft length, time self-speculative decoding of the
    ``prompts``, and time plain decoding of them after every trial. Returns the fastest draft, or
    None ("no draft") when none beats the median plain run, and every trial; the first trial is
    plain decoding (no layers, ``draft_len`` 0, the median of its runs)."""
    from tqdm import tqdm

    def timed(layers, length) -> DraftChoice:
        seconds = tokens = drafted = accepted = 0
        for ids in prompts:
            _, s = speculative_generate(model, ids, new_tokens, layers, length)
            seconds, tokens = seconds + s.seconds, tokens + s.new_tokens
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
        return DraftChoice(layers or [], length, tokens / seconds, accepted / max(drafted, 1))

    order = [l for l in order if l != 0]
    trials, plain = [], []
    grid = [(c, g) for c in counts for g in lengths]
    if not grid:
        raise ValueError("the draft search needs at least one layer count and one draft length")
    for count, length in tqdm(grid, desc="draft search", disable=not progress):
        trials.append(timed(sorted(order[:count]), length))
        plain.append(timed(None, 0).tokens_per_second)  # interleaved: drift hits both alike
    plain_choice = DraftChoice([], 0, statistics.median(plain), 0.0)
    best = max(trials, key=lambda t: t.tokens_per_second)
    return (best if best.tokens_per_second > plain_choice.tokens_per_second else None), [plain_choice, *trials]
