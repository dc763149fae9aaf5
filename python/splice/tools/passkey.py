"""A synthetic long-context retrieval task built in code: find a pass key hidden in filler text.

Each prompt is ``INTRO``, filler sentences, the key sentence at a chosen depth, more filler, and
the question; the answer is the key's digits. Accuracy is exact match of the greedy continuation.
The filler is repeated WikiText-free text (so it does not overlap the perplexity data).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Passkey:
    ids: torch.Tensor  # [1, n] prompt
    answer: str  # the digits
    depth: float  # where the key sits, as a fraction of the filler


def passkey_prompt(tokenizer, context: int, depth: float, seed: int) -> Passkey:
    """A prompt of about ``context`` tokens with a 5-digit key at ``depth`` (0: start, 1: end)."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(INTRO + needle + QUESTION, add_special_tokens=False).input_ids)
    per_filler = len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    count = max(int((context - fixed) / per_filler), 1)
    before = round(count * depth)
    text = INTRO + FILLER * before + needle + FILLER * (count - before) + QUESTION
    return Passkey(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids, key, depth)


def passkey_set(tokenizer, context: int, samples: int, seed: int = 0) -> list[Passkey]:
    """``samples`` prompts with keys spread evenly over depths 0.1 .. 0.9."""
    depths = [0.1 + 0.8 * i / max(samples - 1, 1) for i in range(samples)]
    return [passkey_prompt(tokenizer, context, d, seed + i) for i, d in enumerate(depths)]


def question_tokens(tokenizer) -> int:
    """How many tokens the question at the end of every prompt takes (its last turn)."""
    return len(tokenizer(QUESTION, add_special_tokens=False).input_ids)


def plain_generate(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, tasks: list[Passkey], generate: Callable = plain_generate) -> float:
    """Fraction of prompts whose greedy continuation starts with the key; ``generate(model, ids, mask,
    **kwargs)`` returns ``[1, n + new]`` (default: ``model.generate``)."""
    hits = 0
    for task in tasks:
        out = generate(model, task.ids, torch.ones_like(task.ids), max_new_tokens=8, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        hits += tokenizer.decode(out[0, task.ids.shape[1]:]).strip().startswith(task.answer)
    return hits / len(tasks)
