"""Where the time of a decode step goes, from the torch profiler.

Every operator's self CPU time (time inside it, not inside the operators it calls; with intra-op
threads this is the calling thread's wall time) over ``steps`` greedy decode steps is put in one
class by its name: ``matmul`` (dense and splice's quantized matmuls), ``attention``,
``steering`` (splice's steering and row ops), ``other ops`` (every other operator: norms,
activations, copies, the cache). ``python and dispatch`` is the wall time of the steps minus the
time of all operators: the interpreter, module calls and dispatch between operators. Each class
is reported in seconds per step and as a share of the step.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from .timing import greedy_steps

CLASSES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int", "splice::quant_matmul", "mkldnn"),
    "attention": ("attention",),
    "steering": ("splice::fused_steer", "splice::row_select", "splice::serve_decide"),
}
ORDER = ("python and dispatch", "matmul", "attention", "steering", "other ops")


def op_class(name: str) -> str:
    for cls, keys in CLASSES.items():
        if any(key in name for key in keys):
            return cls
    return "other ops"


@torch.inference_mode()
def decode_step_split(model, ids: torch.Tensor, steps: int = 16) -> dict[str, dict[str, float]]:
    """``{class: {"seconds": per step, "share": of the step}}`` for ``steps`` greedy decode steps
    after a prefill of ``ids`` (one untimed warm-up run first)."""
    batch, length = ids.shape
    greedy_steps(model, model(input_ids=ids, use_cache=True, logits_to_keep=1), batch, length, 2)  # warm-up
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        greedy_steps(model, out, batch, length, steps)
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(ORDER, 0.0)
    for event in prof.key_averages():
        seconds[op_class(event.key)] += event.self_cpu_time_total / 1e6
    seconds["python and dispatch"] = max(wall - sum(seconds.values()), 0.0)
    return {cls: {"seconds": s / steps, "share": s / wall} for cls, s in seconds.items()}


def split_table(splits: dict[str, dict]) -> str:
    """Markdown: one row per profiled setting, one column per class (ms per step, share)."""
    lines = ["| setting | " + " | ".join(ORDER) + " |", "|---|" + "---:|" * len(ORDER)]
    for name, split in splits.items():
        lines.append(f"| {name} | " + " | ".join(f"{split[c]['seconds'] * 1e3:.2f} ms ({split[c]['share']:.0%})"
                                               for c in ORDER) + " |")
    return "\n".join(lines)
