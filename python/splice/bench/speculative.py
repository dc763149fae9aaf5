"""``splice bench speculative``: where speculative decoding wins, per workload, against greedy ``generate``.

Workloads (prompts cut from WikiText-2 validation text; calibration and evaluation prompts disjoint):

* ``continuation``: a raw 64-token window, continued. Open-ended: the output rarely copies its prompt.
* ``summary``: "Summarize the following passage." and a 96-token window, in the chat template.
  Input-grounded: a summary copies spans of its passage (prompt lookup's own setting).

Per workload, :func:`splice.tools.speculative.search_draft` times a grid of drafts on the calibration
prompts against plain decoding and picks the fastest, or no draft: layer-skip drafts of 10, 20 and 30%
of the layers (least removal KL first, layer 0 never), prompt lookup (n-grams up to 3) alone and with
each of them, lengths 2 to 4. On the evaluation prompts three settings are then timed interleaved,
round by round after a discarded warm-up round: greedy ``generate`` (the baseline, the unmodified
system), splice with the chosen draft, and Hugging Face's own prompt lookup
(``generate(prompt_lookup_num_tokens=4)``), the alternative a user would otherwise reach for. Every
run stops at the model's EOS or after ``new_tokens``; each output is checked equal to greedy
``generate``'s.

Ratios (÷ greedy ``generate``, medians): ``speculative_speedup_<workload>``,
``hf_lookup_speedup_<workload>``, and ``speculative_speedup``, the lowest over the workloads.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..adapters.architecture import Adapter
from ..tools.calibration_text import wikitext_windows
from ..tools.layer_profile import profile_layers
from ..tools.speculative import search_draft, speculative_generate
from .output import provenance

WINDOW = {"continuation": 64, "summary": 96}  # tokens of WikiText-2 per prompt
WORKLOADS = tuple(WINDOW)
SUMMARY_REQUEST = "Summarize the following passage.\n\n{passage}"
PROFILE_LENGTH = 128  # tokens per layer-profile window
LOOKUP_NGRAM = 3
HF_LOOKUP_TOKENS = 4


def workload_prompts(tokenizer, workload: str, count: int, start: int) -> tuple[list[torch.Tensor], int]:
    """``count`` prompts [1, n] of ``workload`` from WikiText-2 windows at or after token ``start``, and the
    token where the text they used ends."""
    length = WINDOW[workload]
    offset = -(-start // length)
    windows = wikitext_windows(tokenizer, count, length, offset)
    end = (offset + count) * length
    if workload == "continuation":
        return [w[None] for w in windows], end
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": SUMMARY_REQUEST.format(passage=tokenizer.decode(w))}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids for w in windows], end


def _generate(model, ids: torch.Tensor, new_tokens: int, eos: int | None, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos, **kwargs)


def speculative_rows(model, order: list[int], calib_prompts, eval_prompts, new_tokens: int, repeats: int,
                     eos: int | None, progress: bool = True) -> dict:
    """The draft search on ``calib_prompts``, then greedy ``generate``, splice's speculative decoding
    with the chosen draft and Hugging Face's prompt lookup timed interleaved on ``eval_prompts``."""
    adapter = Adapter(model)
    counts = sorted({0} | {max(1, round(adapter.num_layers * f)) for f in (0.1, 0.2, 0.3)})
    best, trials = search_draft(model, calib_prompts, order, counts, lengths=(2, 3, 4), lookups=(0, LOOKUP_NGRAM),
                                new_tokens=24, progress=progress)
    layers, length, lookup = (best.layers or None, best.draft_len, best.lookup_ngram) if best else (None, 0, 0)
    runs = {"greedy": [], "speculative": [], "hf_lookup": []}
    accept, identical = [], True
    for round_ in range(repeats + 1):  # round 0 warms every setting up and is discarded
        seconds, tokens = dict.fromkeys(runs, 0.0), 0
        for ids in eval_prompts:
            start = time.perf_counter()
            expected = _generate(model, ids, new_tokens, eos)
            seconds["greedy"] += time.perf_counter() - start
            out, stats = speculative_generate(model, ids, new_tokens, layers, length, eos, lookup_ngram=lookup)
            seconds["speculative"] += stats.seconds
            start = time.perf_counter()
            looked_up = _generate(model, ids, new_tokens, eos, prompt_lookup_num_tokens=HF_LOOKUP_TOKENS)
            seconds["hf_lookup"] += time.perf_counter() - start
            accept.append(stats.acceptance)
            identical &= torch.equal(out, expected) and torch.equal(looked_up, expected)
            tokens += expected.shape[1] - ids.shape[1]
        if round_:
            for name in runs:
                runs[name].append(tokens / seconds[name])
    tps = {name: statistics.median(values) for name, values in runs.items()}
    return {"draft_layers": layers, "draft_len": length, "lookup_ngram": lookup, "search": [vars(t) for t in trials],
            "runs": runs, "tps": tps, "acceptance": statistics.median(accept), "identical_output": identical}


def removal_order(model, tokenizer, calib_windows: int, progress: bool = True) -> list[int]:
    """Layers by the measured KL of removing each alone on WikiText-2 windows, least first."""
    profile = profile_layers(model, wikitext_windows(tokenizer, calib_windows, PROFILE_LENGTH), progress=progress)
    return sorted(range(profile.num_layers), key=lambda l: profile.removal_kl[l])


def run(model, tokenizer, prompts: int = 3, calib_prompts: int = 2, new_tokens: int = 64, repeats: int = 3,
        calib_windows: int = 4, workloads=WORKLOADS, progress: bool = True) -> dict:
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if min(prompts, calib_prompts, new_tokens, repeats, calib_windows) < 1:
        raise ValueError("prompts, calib_prompts, new_tokens, repeats and calib_windows must be at least 1")
    order = removal_order(model, tokenizer, calib_windows, progress)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    rows, ratios = {}, {}
    for workload in workloads:
        # calibration text sits after the profile's windows, evaluation text after that: no text is reused
        calib, end = workload_prompts(tokenizer, workload, calib_prompts, start=calib_windows * PROFILE_LENGTH)
        evals, _ = workload_prompts(tokenizer, workload, prompts, start=end)
        row = rows[workload] = speculative_rows(model, order, calib, evals, new_tokens, repeats, eos, progress)
        ratios[f"speculative_speedup_{workload}"] = row["tps"]["speculative"] / row["tps"]["greedy"]
        ratios[f"hf_lookup_speedup_{workload}"] = row["tps"]["hf_lookup"] / row["tps"]["greedy"]
    ratios["speculative_speedup"] = min(ratios[f"speculative_speedup_{w}"] for w in workloads)
    return {"benchmark": "speculative", "model": Adapter(model).name,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), **provenance(),
            "removal_order": order, "new_tokens": new_tokens, "repeats": repeats, "workloads": rows, "ratios": ratios}
