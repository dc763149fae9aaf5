"""``splice bench steer``: throughput of steering on one model, every configuration in the same run.

Configurations (all on the same loaded model, the patch applied and removed around each
measurement, in interleaved order so drift hits every configuration alike):

* ``unpatched``   the model as loaded,
* ``steered``     splice.patch with one vector at every layer (site "out"),
* ``hooks``       the same steering as a Python forward hook per layer,
* ``distinct16``  (batch 16) splice with 16 rows carrying 16 different vectors,
* ``gated8``      one vector at 8 layers behind a per-token cosine gate (threshold 0, temperature
  0.1: each token gets its own gate value), computed inside the fused op,
* ``lowrank8``    a rank-8 map ``u + B(Aᵀu − c)`` at the same 8 layers,
* with ``compiled``: ``compiled_unpatched`` (the model as loaded) and ``compiled_steered`` (a copy
  of it, patched once like ``steered``), decoded by :func:`splice.compile_decode` (decode only: its
  prefill is eager). The warm-up round compiles; timed rounds run the compiled step.

Ratios (medians, same run): ``steer_decode_b1``/``_b16`` and ``steer_prefill_b1``/``_b16``
(steered ÷ unpatched), ``hooks_decode_b1`` (hooks ÷ unpatched), ``per_request16_b16``
(distinct16 ÷ unpatched at batch 16), ``gated8_decode_b*`` and ``lowrank8_decode_b*`` (÷ unpatched);
with ``compiled``: ``compiled_vs_eager_b*`` (compiled unpatched ÷ unpatched) and
``compiled_steer_decode_b*`` (compiled steered ÷ compiled unpatched).

``profile``: ``decode_split``, where a decode step of ``unpatched``, ``steered`` and ``gated8`` at
each batch spends its time (Python and dispatch, matmul, attention, steering, other ops;
:mod:`.step_profile`), profiled after the timing so it does not disturb it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters.architecture import Adapter
from ..decoding.compiled_decode import CompiledDecoder, compile_decode
from ..patch import patch
from ..steering.gates import TokenGate
from ..steering.maps import LowRank
from ..steering.spec import Steer
from .hook_steering import add_output_hooks
from .output import provenance
from .step_profile import decode_step_split
from .timing import Throughput, compiled_decode_tps, decode_tps, interleaved, make_batch, prefill_tps


PROFILED = ("unpatched", "steered", "gated8")  # profile: their decode steps split by the profiler


@dataclass
class Setting:
    name: str
    batches: tuple[int, ...]
    apply: Callable[[], Callable[[], None]]  # installs the configuration, returns its undo


def random_vectors(adapter: Adapter, count: int, norm: float, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        v = torch.randn(adapter.num_layers, adapter.hidden_size, generator=g)
        v = v / v.norm(dim=-1, keepdim=True) * norm
        out.append({layer: v[layer] for layer in range(adapter.num_layers)})
    return out


def settings(model, batches: tuple[int, ...], norm: float = 1.0) -> list[Setting]:
    adapter = Adapter(model)
    vectors = random_vectors(adapter, 16, norm)

    def unpatched():
        return lambda: None

    def steered():
        return patch(model, Steer(vectors[0], scale=1.0)).remove

    def hooks():
        handles = add_output_hooks(model, vectors[0], scale=1.0)
        return lambda: [h.remove() for h in handles]

    eight = list(range(0, adapter.num_layers, max(1, adapter.num_layers // 8)))[:8]
    g = torch.Generator().manual_seed(1)

    def gated8():
        gate = TokenGate(torch.randn(adapter.hidden_size, generator=g), threshold=0.0, temperature=0.1)
        return patch(model, Steer(vectors[0], layers=eight, gate=gate)).remove

    maps = {name: {l: torch.randn(adapter.hidden_size, 8, generator=g) / adapter.hidden_size ** 0.5 for l in eight}
            for name in ("A", "B")}

    def lowrank8():
        return patch(model, LowRank(A=maps["A"], B=maps["B"])).remove

    def distinct16():
        p = patch(model, max_slots=17)
        for slot in range(1, 17):
            p.set_slot(slot, [Steer(vectors[slot - 1], scale=1.0, name=f"v{slot}")])
        p.assign(list(range(1, 17)))
        return p.remove

    out = [Setting("unpatched", batches, unpatched), Setting("steered", batches, steered),
           Setting("hooks", batches, hooks), Setting("gated8", batches, gated8),
           Setting("lowrank8", batches, lowrank8)]
    if 16 in batches:
        out.append(Setting("distinct16", (16,), distinct16))
    return out


@contextmanager
def applied(setting: Setting):
    undo = setting.apply()
    try:
        yield
    finally:
        undo()


def compiled_decoders(model, max_cache_len: int) -> dict[str, CompiledDecoder]:
    """``compiled_unpatched`` on ``model`` itself; ``compiled_steered`` on a copy patched once with the
    ``steered`` setting's vector (re-patching between rounds would recompile every round)."""
    steered = copy.deepcopy(model)
    patch(steered, Steer(random_vectors(Adapter(model), 1, 1.0)[0], scale=1.0))
    return {"compiled_unpatched": compile_decode(model, max_cache_len),
            "compiled_steered": compile_decode(steered, max_cache_len)}


def run(model, batches=(1, 16), prompt_len: int = 64, steps: int = 32, repeats: int = 5,
        progress: bool = True, compiled: bool = False, profile: bool = False) -> dict:
    """Measure every setting ``repeats`` times, interleaved round by round after a discarded warm-up
    round; returns the report dict (medians, runs, ratios)."""
    vocab = model.config.get_text_config().vocab_size
    plan = {s.name: s for s in settings(model, tuple(batches))}
    inputs = {b: make_batch(b, prompt_len, vocab) for b in batches}
    decoders = compiled_decoders(model, prompt_len + steps + 1) if compiled else {}

    def measure_eager(name):
        out = {}
        for b in plan[name].batches:
            out[f"prefill_b{b}"] = prefill_tps(model, inputs[b])
            out[f"decode_b{b}"] = decode_tps(model, inputs[b], steps)
        return out

    def measure_compiled(name):  # the prefill is eager: only decode is timed
        return {f"decode_b{b}": compiled_decode_tps(decoders[name], inputs[b], steps) for b in batches}

    def measure(name):
        return measure_compiled(name) if name in decoders else measure_eager(name)

    contexts = [(s.name, lambda s=s: applied(s)) for s in plan.values()] + [(name, nullcontext) for name in decoders]
    runs = interleaved(contexts, measure, repeats, "bench steer", progress)
    results = {name: {int(key.split("_b")[1]): {} for key in by_key} for name, by_key in runs.items()}
    for name, by_key in runs.items():
        for key, values in by_key.items():
            kind, b = key.split("_b")
            results[name][int(b)][kind] = Throughput(values)
    out = report(model, results, prompt_len, steps, repeats)
    if profile:
        out["decode_split"] = {}
        for name in PROFILED:
            with applied(plan[name]):
                out["decode_split"] |= {f"{name} b{b}": decode_step_split(model, inputs[b], steps) for b in batches}
    return out


def _backends(model) -> dict[str, str]:
    probe = patch(model)
    try:
        return probe.backends()
    finally:
        probe.remove()


def report(model, results, prompt_len, steps, repeats) -> dict:
    def med(name, b, kind):
        return results[name][b][kind].median

    ratios = {}
    for b in results["unpatched"]:
        ratios[f"steer_decode_b{b}"] = med("steered", b, "decode") / med("unpatched", b, "decode")
        ratios[f"steer_prefill_b{b}"] = med("steered", b, "prefill") / med("unpatched", b, "prefill")
        ratios[f"hooks_decode_b{b}"] = med("hooks", b, "decode") / med("unpatched", b, "decode")
        for name in ("gated8", "lowrank8"):
            ratios[f"{name}_decode_b{b}"] = med(name, b, "decode") / med("unpatched", b, "decode")
    if "distinct16" in results:
        ratios["per_request16_b16"] = med("distinct16", 16, "decode") / med("unpatched", 16, "decode")
    for b in results.get("compiled_unpatched", {}):
        ratios[f"compiled_vs_eager_b{b}"] = med("compiled_unpatched", b, "decode") / med("unpatched", b, "decode")
        ratios[f"compiled_steer_decode_b{b}"] = (med("compiled_steered", b, "decode")
                                                 / med("compiled_unpatched", b, "decode"))
    adapter = Adapter(model)
    return {
        "benchmark": "steer",
        "model": adapter.name,
        "architecture": adapter.describe(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **provenance(),
        "backends": _backends(model),
        "prompt_len": prompt_len, "decode_steps": steps, "repeats": repeats,
        "results": {name: {f"b{b}": {kind: {"median_tps": t.median, "runs": t.runs} for kind, t in by_kind.items()}
                           for b, by_kind in by_batch.items()} for name, by_batch in results.items()},
        "ratios": ratios,
    }
