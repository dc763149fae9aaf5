"""Context vs memory under Layer Fused Decoding, on the knowledge-conflict facts
(:mod:`splice.tools.knowledge_conflict`).

Only facts the unpatched model answers closed-book are scored (the memory answer is its top-1 next
token with no passage), as PH3 does. For each setting (no LFD, then each spec) on the conflict
prompts, at the prompt's last token:

    follows_context = share with logit(context answer) > logit(memory answer)   (margin > 0)
    top1_context    = share whose top-1 next token is the context answer's first token
    top1_memory     = share whose top-1 next token is the memory answer's first token
    mean_margin     = mean of logit(context) − logit(memory)

Prompts run left-padded in batches with ``logits_to_keep=1``: the output head (and LFD's layer
scores) see only the last position.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from typing import Sequence

import torch

from ..adapters.architecture import Adapter
from ..longcontext.layer_fused import LayerFusedDecoding, layer_fused
from .knowledge_conflict import Conflict, builtin_facts, closed_book, make_conflicts


@torch.inference_mode()
def last_token_logits(model, tokenizer, prompts: Sequence[str], spec: LayerFusedDecoding | None,
                      batch: int = 8) -> tuple[torch.Tensor, list[int]]:
    """[N, vocab] next-token logits after each prompt (with ``spec`` fused, if given) and, under a
    spec, the layer fused for each prompt."""
    device = Adapter(model).device
    logits, layers = [], []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(list(prompts[start:start + batch]), padding=True, padding_side="left", return_tensors="pt")
        mask = enc["attention_mask"].to(device)
        with layer_fused(model, spec) if spec is not None else nullcontext() as fusion:
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                        position_ids=(mask.long().cumsum(1) - 1).clamp(min=0), use_cache=False, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
        if fusion is not None:
            layers += fusion.chosen[:, -1].tolist()
    return torch.cat(logits), layers


def rates(logits: torch.Tensor, conflicts: Sequence[Conflict]) -> dict:
    """The four measures of the module docstring from the conflict prompts' logits."""
    ctx = torch.tensor([c.context_id for c in conflicts], device=logits.device)
    mem = torch.tensor([c.memory_id for c in conflicts], device=logits.device)
    margin = logits.gather(1, ctx[:, None])[:, 0] - logits.gather(1, mem[:, None])[:, 0]
    top1 = logits.argmax(-1)
    return {"follows_context": float((margin > 0).float().mean()), "top1_context": float((top1 == ctx).float().mean()),
            "top1_memory": float((top1 == mem).float().mean()), "mean_margin": float(margin.mean())}


def describe(spec: LayerFusedDecoding | None) -> str:
    return "no LFD" if spec is None else f"LFD layer={spec.layer} weight={spec.weight:g}"


def evaluate(model, tokenizer, specs: Sequence[LayerFusedDecoding], facts: Sequence[dict] | None = None,
             seed: int = 0) -> dict:
    """``{"facts", "known", "settings": [{"setting", measures..., "layers"}]}``: the unpatched model
    first, then each spec, on the known conflicts."""
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    for spec in specs:
        if not isinstance(spec, LayerFusedDecoding):
            raise ValueError(f"specs must be splice.LayerFusedDecoding, got {type(spec).__name__}")
        spec.check(Adapter(model))
    conflicts = make_conflicts(tokenizer, builtin_facts() if facts is None else facts, seed=seed)
    with torch.inference_mode():
        known = closed_book(model, tokenizer, conflicts)[1].tolist()
    kept = [c for c, ok in zip(conflicts, known) if ok]
    if not kept:
        raise ValueError("the model answers none of the facts closed-book; nothing to measure")
    settings = []
    for spec in (None, *specs):
        logits, layers = last_token_logits(model, tokenizer, [c.prompt for c in kept], spec)
        row = {"setting": describe(spec), **rates(logits, kept)}
        if spec is not None:
            row["layers"] = dict(sorted(Counter(layers).items()))
        settings.append(row)
    return {"facts": len(conflicts), "known": len(kept), "settings": settings}


def table(report: dict) -> str:
    lines = [f"{report['known']} of {report['facts']} conflicts whose fact the model answers closed-book",
             "| setting | follows context | top-1 context | top-1 memory | mean margin | fused layers |",
             "|---|---:|---:|---:|---:|---|"]
    for r in report["settings"]:
        layers = ", ".join(f"{k}: {v}" for k, v in r.get("layers", {}).items()) or "-"
        lines.append(f"| {r['setting']} | {r['follows_context']:.3f} | {r['top1_context']:.3f} | "
                     f"{r['top1_memory']:.3f} | {r['mean_margin']:.2f} | {layers} |")
    return "\n".join(lines)
