"""Lossless speculative decoding (greedy, batch 1) with two kinds of draft, alone or together.

* **Layer-skip draft** (self-speculative, after Draft & Verify / SWIFT): a pass through the model with
  ``draft_layers`` skipped proposes ``draft_len`` tokens one at a time.
* **Prompt lookup** (after Saxena's prompt lookup decoding): the context (prompt and tokens so far)
  is searched for an earlier occurrence of its last n-gram, ``n = lookup_ngram .. 1`` (the longest
  that matches, its most recent occurrence); the up to ``draft_len`` tokens that followed it are the
  proposal. It costs no model pass, and pays where the output copies the input (summaries,
  extraction, edits) or repeats itself.

With both, a cycle takes the lookup's proposal when the context has a match and the layer-skip
draft's otherwise. One pass of the full model over the proposal verifies all of it at once; the
longest agreeing prefix is kept plus the full model's own next token, so the output is the full
model's greedy output whatever the draft. With no draft (``draft_layers=None``, ``lookup_ngram=0``)
each cycle is one plain full pass through the same loop.

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
    looked_up: int = 0  # cycles whose proposal came from the context (prompt lookup)

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def check_draft(adapter: Adapter, draft_layers, draft_len: int, lookup_ngram: int = 0) -> frozenset[int] | None:
    """The draft's skipped layers (None: no layer-skip draft), after checking every argument."""
    if isinstance(lookup_ngram, bool) or not isinstance(lookup_ngram, int) or lookup_ngram < 0:
        raise ValueError(f"lookup_ngram must be an int >= 0 (0: no prompt lookup), got {lookup_ngram!r}")
    if draft_layers is None and not lookup_ngram:
        return None
    if draft_len < 1:
        raise ValueError(f"draft_len must be at least 1, got {draft_len}")
    if draft_layers is None:
        return None
    layers = frozenset(int(l) for l in draft_layers)
    bad = sorted(l for l in layers if not 0 <= l < adapter.num_layers)
    if bad:
        raise ValueError(f"draft layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")
    if 0 in layers:
        raise ValueError("the draft cannot skip layer 0: Hugging Face reads positions and masks from its KV cache")
    if not layers or len(layers) >= adapter.num_layers:
        raise ValueError("the draft must skip at least one layer and keep at least one")
    return layers


def lookup_draft(context: torch.Tensor, ngram: int, length: int) -> torch.Tensor:
    """Up to ``length`` tokens that followed the most recent earlier occurrence of the last ``n``
    tokens of ``context`` [L], for the largest ``n <= ngram`` that occurs; empty when none does."""
    for n in range(min(ngram, context.numel() - 1), 0, -1):
        starts = (context[:-1].unfold(0, n, 1) == context[-n:]).all(-1).nonzero()
        if starts.numel():
            follow = int(starts[-1]) + n
            return context[follow:follow + length]
    return context[:0]


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


def _skip_draft(model, runtime, draft: frozenset[int], token: torch.Tensor, cache, n: int, length: int):
    """``length`` greedy tokens after ``token`` from the model with ``draft`` skipped; the cache is
    cropped back to ``n`` entries afterwards."""
    guesses, t = [], token
    runtime.skip.draft = draft
    try:
        for i in range(length):
            t = _step(model, t, cache, n + i)
            guesses.append(t)
    finally:
        runtime.skip.draft = frozenset()
    crop_to(cache, n)
    return torch.cat(guesses)


def _finished(new: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> bool:
    return new.numel() >= max_new_tokens or (eos_token_id is not None and bool((new == eos_token_id).any()))


@torch.inference_mode()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, draft_layers, draft_len: int,
                         eos_token_id: int | None = None, lookup_ngram: int = 0
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of ``input_ids`` [1, n] (returns [1, n + new]) and its statistics.

    ``draft_layers``: layers the draft pass skips (None: no layer-skip draft); ``lookup_ngram``:
    the longest n-gram prompt lookup matches (0: no lookup); ``draft_len``: the most tokens one
    cycle proposes (ignored when neither draft is on, which decodes plainly)."""
    adapter = Adapter(model)
    draft = check_draft(adapter, draft_layers, draft_len, lookup_ngram)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence [1, n], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    prompt_len = input_ids.shape[1]
    with _patched(model) as runtime:
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        n = prompt_len
        token = _step(model, input_ids[0], cache, 0)[-1:]
        context = torch.cat([input_ids[0], token])
        cycles = drafted = accepted = looked_up = 0
        while not _finished(context[prompt_len:], max_new_tokens, eos_token_id):
            # a cycle yields its accepted tokens and one more: propose no more than the budget can use
            length = min(draft_len, max_new_tokens - (context.numel() - prompt_len) - 1)
            proposal = lookup_draft(context, lookup_ngram, length) if lookup_ngram else context[:0]
            looked_up += bool(proposal.numel())
            if length and not proposal.numel() and draft is not None:
                proposal = _skip_draft(model, runtime, draft, token, cache, n, length)
            if not proposal.numel():
                token = _step(model, token, cache, n)
                context, n = torch.cat([context, token]), n + 1
                continue
            truth = _step(model, torch.cat([token, proposal]), cache, n, all_logits=True)
            agree = int((proposal == truth[:-1]).long().cumprod(0).sum())
            token = truth[agree:agree + 1]
            context = torch.cat([context, proposal[:agree], token])
            n += agree + 1
            crop_to(cache, n)
            cycles, drafted, accepted = cycles + 1, drafted + proposal.numel(), accepted + agree
        out = context[prompt_len:][:max_new_tokens]
        if eos_token_id is not None and (out == eos_token_id).any():
            out = out[: int((out == eos_token_id).nonzero()[0]) + 1]
        seconds = time.perf_counter() - start
    stats = SpeculativeStats(out.numel(), cycles, drafted, accepted, seconds, looked_up)
    return torch.cat([input_ids[0], out])[None], stats


@dataclass
class DraftChoice:
    layers: list[int]
    draft_len: int
    tokens_per_second: float
    acceptance: float
    lookup_ngram: int = 0


def search_draft(model, prompts: list[torch.Tensor], order: list[int], counts, lengths, lookups=(0,),
                 new_tokens: int = 24, progress: bool = True) -> tuple[DraftChoice | None, list[DraftChoice]]:
    """Measured search: for each ``count`` (the first ``count`` layers of ``order``, least important
    first, layer 0 excluded; 0 is no layer-skip draft), each draft length and each prompt-lookup
    n-gram size in ``lookups`` (0: none), time speculative decoding of the ``prompts``, and time
    plain decoding of them after every trial. Returns the fastest draft, or None ("no draft") when
    none beats the median plain run, and every trial; the first trial is plain decoding (no layers,
    ``draft_len`` 0, the median of its runs)."""
    from tqdm import tqdm

    def timed(layers, length, lookup) -> DraftChoice:
        seconds = tokens = drafted = accepted = 0
        for ids in prompts:
            _, s = speculative_generate(model, ids, new_tokens, layers, length, lookup_ngram=lookup)
            seconds, tokens = seconds + s.seconds, tokens + s.new_tokens
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
        return DraftChoice(layers or [], length, tokens / seconds, accepted / max(drafted, 1), lookup)

    order = [l for l in order if l != 0]
    trials, plain = [], []
    grid = [(c, g, m) for m in lookups for c in counts for g in lengths if c or m]
    if not grid:
        raise ValueError("the draft search needs a draft: a layer count above 0 or a lookup n-gram size, "
                         "and a draft length")
    for count, length, lookup in tqdm(grid, desc="draft search", disable=not progress):
        trials.append(timed(sorted(order[:count]) or None, length, lookup))
        plain.append(timed(None, 0, 0).tokens_per_second)  # interleaved: drift hits both alike
    plain_choice = DraftChoice([], 0, statistics.median(plain), 0.0)
    best = max(trials, key=lambda t: t.tokens_per_second)
    return (best if best.tokens_per_second > plain_choice.tokens_per_second else None), [plain_choice, *trials]
