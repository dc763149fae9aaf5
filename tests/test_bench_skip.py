"""``splice bench skip`` and the shared timing rule: interleaved rounds, the unpatched baseline, the
ideal speedup from measured layer time."""

import itertools
import math
from contextlib import contextmanager

import pytest
import torch
from tiny_models import LAYERS, VOCAB, tiny_model

from splice.bench import skip, timing
from splice.bench.timing import interleaved
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.tools.layer_profile import profile_layers


def test_interleaved_visits_every_setting_each_round_and_drops_the_warm_up_round():
    log, rounds = [], {"a": 0, "b": 0}

    def setting(name):
        @contextmanager
        def context():
            log.append(f"enter {name}")
            yield
            log.append(f"exit {name}")
        return name, context

    def measure(name):
        log.append(f"measure {name}")
        rounds[name] += 1
        return {"round": rounds[name] - 1}

    runs = interleaved([setting("a"), setting("b")], measure, repeats=2)
    assert runs == {"a": {"round": [1, 2]}, "b": {"round": [1, 2]}}
    assert log == ["enter a", "measure a", "exit a", "enter b", "measure b", "exit b"] * 3
    with pytest.raises(ValueError, match="distinct"):
        interleaved([setting("a"), setting("a")], measure, repeats=1)
    with pytest.raises(ValueError, match="at least 1"):
        interleaved([setting("a")], measure, repeats=0)


def test_ideal_speedup_counts_only_the_layers_time():
    # a 10 ms step of which 30 layers take 0.2 ms each: 8 skipped layers save 1.6 ms, not 8/30 of the step
    assert math.isclose(skip.ideal_speedup(0.010, 0.0002, 8), 0.010 / 0.0084)
    assert skip.ideal_speedup(0.010, 0.0002, 0) == 1.0
    with pytest.raises(ValueError, match="cannot fit"):
        skip.ideal_speedup(0.010, 0.002, 5)


def test_layer_time_is_each_layer_call_of_the_decode_steps_only(monkeypatch):
    """On a clock that ticks once per reading, a layer call reads it twice in a row (start, end): one
    tick per layer per step, whatever the prefill and the rest of the step cost."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ticks = itertools.count()
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(ticks)))
    assert timing.decode_layer_seconds(model, model.model.layers, ids, steps=3) == 1.0
    monkeypatch.undo()
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def static_row(name, method, fraction, layers, tps, ppl):
    return {"name": name, "method": method, "fraction": fraction, "layers": layers, "decode_tps_b1": tps, "ppl": ppl}


def test_static_ratios_are_against_the_unpatched_model():
    rows = [static_row("unpatched", "unpatched", 0.0, [], 100.0, 10.0),
            static_row("patch-idle", "none", 0.0, [], 95.0, 10.0)]
    rows += [static_row(f"{m}25", m, 0.25, list(range(8)), 110.0 if m == "greedy" else 105.0, p)
             for m, p in (("bi", 14.0), ("l2", 15.0), ("kl", 12.0), ("greedy", 11.0), ("random", 13.0))]
    r = skip.static_ratios(rows, layer_seconds=0.0002)
    ideal = 0.010 / (0.010 - 8 * 0.0002)
    assert math.isclose(r["skip25_decode_speedup"], 1.1) and math.isclose(r["skip25_ideal_speedup"], ideal)
    assert math.isclose(r["skip25_ideal_fraction"], 1.1 / ideal)
    assert math.isclose(r["patch_idle_decode_b1"], 0.95) and math.isclose(r["skip25_ppl_ratio"], 1.1)
    assert r["skip25_measured_beats_random"] == 1.0


def test_static_rows_time_the_unpatched_model_as_the_baseline():
    model = tiny_model("llama")
    windows = torch.randint(3, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    profile = profile_layers(model, windows, greedy_layers=1, candidates=LAYERS, progress=False)
    rows, layer_runs = skip.static_rows(model, profile, windows, (0.0, 0.34), repeats=2, steps=3, progress=False)
    assert [r["name"] for r in rows] == ["unpatched", "patch-idle", "bi34", "l234", "kl34", "greedy34", "random34"]
    assert all(len(r["layers"]) == 1 for r in rows[2:]) and rows[0]["layers"] == rows[1]["layers"] == []
    settings = dict(skip.static_settings(model, rows))
    with settings["unpatched"]():
        assert not hasattr(model, ATTRIBUTE)
    with settings["patch-idle"]() as p:
        assert hasattr(model, ATTRIBUTE) and p.skips == [] and p.router is None
    with settings["greedy34"]() as p:
        assert [list(s.layers) for s in p.skips] == [rows[5]["layers"]]
    assert all(len(r["decode_runs_b1"]) == 2 for r in rows) and len(layer_runs) == 2
    assert math.isclose(rows[0]["ppl"], rows[1]["ppl"], rel_tol=1e-5)
    assert not hasattr(model, ATTRIBUTE)
