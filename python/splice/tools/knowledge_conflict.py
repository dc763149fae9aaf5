"""Knowledge-conflict tasks (PH3's setting): a context that contradicts what the model knows.

Each fact is a cloze ("The capital city of France is") and the answer the model holds in memory
("Paris"). Its conflict gives the context another answer of the same relation ("Rome")::

    Read the passage and complete the sentence.
    Passage: The capital city of France is Rome.
    Sentence: The capital city of France is

The measure at the prompt's last token is the *context margin*
``m = logit(first token of " Rome") − logit(first token of " Paris")``: m > 0 follows the
context, m < 0 memory. The closed-book prompt (no passage) checks the fact is known (the memory
answer's first token is the model's top-1 next token) and how sure the model is of it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.architecture import Adapter

CONFLICT_TEMPLATE = "Read the passage and complete the sentence.\nPassage: {cloze} {answer}.\nSentence: {cloze}"
CLOSED_TEMPLATE = "Complete the sentence.\nSentence: {cloze}"


@dataclass(frozen=True)
class Conflict:
    """One fact and the contradicting answer its context states; ``*_id`` are first answer tokens."""

    cloze: str
    memory: str
    context: str
    memory_id: int
    context_id: int

    @property
    def prompt(self) -> str:
        return CONFLICT_TEMPLATE.format(cloze=self.cloze, answer=self.context)

    @property
    def closed_prompt(self) -> str:
        return CLOSED_TEMPLATE.format(cloze=self.cloze)


def builtin_facts() -> list[dict]:
    text = resources.files("splice.vectors").joinpath("data", "conflicts", "facts.json").read_text(encoding="utf-8")
    return parse_facts(text, "builtin:facts")


def load_facts(path: str | Path) -> list[dict]:
    path = Path(path)
    return parse_facts(path.read_text(encoding="utf-8"), str(path))


def parse_facts(text: str, source: str) -> list[dict]:
    """``{"facts": [{"relation", "cloze", "memory"}, ...]}``, every field a non-empty string."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from None
    facts = data.get("facts") if isinstance(data, dict) else None
    if not isinstance(facts, list) or not facts:
        raise ValueError(f'{source}: expected {{"facts": [{{"relation", "cloze", "memory"}}, ...]}}')
    for i, f in enumerate(facts):
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) and f[k].strip()
                                              for k in ("relation", "cloze", "memory")):
            raise ValueError(f"{source}: facts[{i}] needs non-empty strings relation, cloze and memory")
    return facts


def answer_token(tokenizer, answer: str) -> int:
    """The first token of `` answer`` as it follows the cloze."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def make_conflicts(tokenizer, facts: Sequence[dict], seed: int = 0) -> list[Conflict]:
    """Each fact paired with another fact's answer of the same relation whose first token differs
    (a seeded shuffle within the relation); facts with no such partner are left out."""
    rng = random.Random(seed)
    by_relation: dict[str, list[dict]] = {}
    for f in facts:
        by_relation.setdefault(f["relation"], []).append(f)
    out = []
    for group in by_relation.values():
        for f in group:
            mem_id = answer_token(tokenizer, f["memory"])
            others = [g["memory"] for g in group if answer_token(tokenizer, g["memory"]) != mem_id]
            if others:
                ctx = rng.choice(others)
                out.append(Conflict(f["cloze"], f["memory"], ctx, mem_id, answer_token(tokenizer, ctx)))
    return out


def last_logits(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """[N, vocab] next-token logits after each prompt's last real token (either padding side)."""
    device = Adapter(model).device
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    mask = enc["attention_mask"].to(device)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=enc["input_ids"].to(device), attention_mask=mask, position_ids=position_ids,
                   use_cache=False).logits
    last = (mask.long() * torch.arange(mask.shape[1], device=device)).argmax(1)
    return logits[torch.arange(len(prompts), device=device), last].float()


def context_margins(model, tokenizer, conflicts: Sequence[Conflict]) -> torch.Tensor:
    """[N] ``logit(context answer) − logit(memory answer)`` on the conflict prompts."""
    logits = last_logits(model, tokenizer, [c.prompt for c in conflicts])
    rows = torch.arange(len(conflicts))
    ctx = torch.tensor([c.context_id for c in conflicts])
    mem = torch.tensor([c.memory_id for c in conflicts])
    return logits[rows, ctx] - logits[rows, mem]


def closed_book(model, tokenizer, conflicts: Sequence[Conflict]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] log-probability of the memory answer's first token with no passage, and [N] bool: it is
    the top-1 next token (the fact is known)."""
    logits = last_logits(model, tokenizer, [c.closed_prompt for c in conflicts])
    mem = torch.tensor([c.memory_id for c in conflicts], device=logits.device)
    logprob = logits.log_softmax(-1).gather(1, mem[:, None])[:, 0]
    return logprob, (logits.argmax(-1) == mem).cpu()
