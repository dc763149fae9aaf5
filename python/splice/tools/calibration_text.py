"""Calibration and evaluation text: WikiText-2 validation windows, and the metrics computed on them.

The text lives in the project's shared data folder (``shared/data/wikitext-2/valid.txt`` beside
the repository); ``$SPLICE_DATA`` points elsewhere. Windows are consecutive, non-overlapping
token spans of the tokenised text, so every run that asks for the same windows gets the same
tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

WIKITEXT = Path("wikitext-2") / "valid.txt"


def data_root() -> Path:
    """``$SPLICE_DATA``, else the ``shared/data`` folder beside the repository."""
    if os.environ.get("SPLICE_DATA"):
        return Path(os.environ["SPLICE_DATA"]).expanduser()
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def held_out_offset(report: dict | None, length: int, made_by: str) -> int:
    """The first window of ``length`` tokens past the calibration tokens a searched policy's
    ``report["calibration"]`` names (``windows`` of ``length`` tokens each); ``made_by``: the
    command that writes such a report, for the error."""
    calibration = (report or {}).get("calibration")
    if not calibration:
        raise ValueError(f"the policy does not say which windows calibrated it (make it with {made_by})")
    return math.ceil(int(calibration["windows"]) * int(calibration["length"]) / length)


def wikitext_windows(tokenizer, count: int, length: int, offset: int = 0) -> torch.Tensor:
    """``count`` windows of ``length`` tokens [count, length], starting ``offset`` windows in."""
    path = data_root() / WIKITEXT
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 validation text not found at {path}; set SPLICE_DATA to the folder "
                                "that holds wikitext-2/valid.txt")
    ids = tokenizer(path.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    needed = (offset + count) * length
    if needed > ids.numel():
        raise ValueError(f"{count} windows of {length} tokens after {offset} need {needed} tokens; "
                         f"the text has {ids.numel()}")
    return ids[offset * length:needed].view(count, length).clone()


def run_hooked(model, windows: torch.Tensor, handles: list, batch_size: int = 8) -> None:
    """Run ``model`` over ``windows`` [count, length] chunk by chunk (no cache), then remove the hook
    ``handles`` already registered on it, whatever happens."""
    try:
        for chunk in windows.split(batch_size):
            model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def log_probs(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Next-token log-probabilities [count, length - 1, vocab] (float32) of every window."""
    out = []
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, reference: torch.Tensor | None = None,
             batch_size: int = 8) -> tuple[float, float | None]:
    """``(perplexity, KL)`` over every window position after the first.

    Perplexity is exp(mean negative log-likelihood of the next token); KL is the mean
    KL(reference || model) of the next-token distributions (None without a ``reference`` from
    :func:`log_probs`).
    """
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    refs = reference.split(batch_size) if reference is not None else [None] * len(windows.split(batch_size))
    for chunk, ref in zip(windows.split(batch_size), refs):
        logp = F.log_softmax(model(input_ids=chunk, use_cache=False).logits[:, :-1].float(), dim=-1)
        nll_sum -= float(logp.gather(-1, chunk[:, 1:, None]).sum())
        if ref is not None:
            kl_sum += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(nll_sum / count), (kl_sum / count if reference is not None else None)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    return evaluate(model, windows, None, batch_size)[0]


@torch.inference_mode()
def continuation_perplexity(model, windows: torch.Tensor, prefix: int, batch_size: int = 1) -> float:
    """Perplexity of each window's tokens after ``prefix + 1``, read the way decoding reads them: the
    first ``prefix`` tokens are prefilled into a KV cache, then the rest run in one pass over that
    cache (interventions that act on decoding, not on the prefill, are measured this way)."""
    if not 0 < prefix < windows.shape[1] - 1:
        raise ValueError(f"prefix must leave at least two tokens of each window, got {prefix} of "
                         f"{windows.shape[1]}")
    nll_sum, count = 0.0, 0
    for chunk in windows.split(batch_size):
        cache = model(input_ids=chunk[:, :prefix], use_cache=True, logits_to_keep=1).past_key_values
        rest = chunk[:, prefix:]
        positions = torch.arange(prefix, chunk.shape[1])[None].expand(chunk.shape[0], -1)
        logits = model(input_ids=rest, past_key_values=cache, position_ids=positions, use_cache=True).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll_sum -= float(logp.gather(-1, rest[:, 1:, None]).sum())
        count += rest[:, 1:].numel()
    return math.exp(nll_sum / count)
