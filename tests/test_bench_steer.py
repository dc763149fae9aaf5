"""``splice bench steer --compiled`` on a tiny model: the compiled rows, their ratios, the model untouched."""

import pytest
import torch
from tiny_models import tiny_model

from splice.bench import steer, steer_report
from splice.runtime.splice_runtime import ATTRIBUTE


def test_compiled_rows_are_timed_among_the_others_and_leave_the_model_unpatched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    report = steer.run(model, batches=(1,), prompt_len=8, steps=2, repeats=2, progress=False, compiled=True)
    results, ratios = report["results"], report["ratios"]
    for name in ("compiled_unpatched", "compiled_steered"):
        assert list(results[name]["b1"]) == ["decode"] and len(results[name]["b1"]["decode"]["runs"]) == 2
    unpatched, compiled = results["unpatched"]["b1"]["decode"], results["compiled_unpatched"]["b1"]["decode"]
    assert ratios["compiled_vs_eager_b1"] == compiled["median_tps"] / unpatched["median_tps"]
    assert ratios["compiled_steer_decode_b1"] == (results["compiled_steered"]["b1"]["decode"]["median_tps"]
                                                  / compiled["median_tps"])
    assert "| compiled_steered | 1 | — (eager) |" in steer_report.table(report)
    assert not hasattr(model, ATTRIBUTE)  # the steered rows ran on a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_profile_splits_the_decode_steps_of_the_profiled_settings():
    model = tiny_model("llama")
    report = steer.run(model, batches=(1,), prompt_len=8, steps=2, repeats=1, progress=False, profile=True)
    split = report["decode_split"]
    assert set(split) == {"unpatched b1", "steered b1", "gated8 b1"}
    assert split["unpatched b1"]["steering"]["seconds"] == 0.0 < split["steered b1"]["steering"]["seconds"]
    assert sum(c["share"] for c in split["gated8 b1"].values()) == pytest.approx(1.0)
    assert "Where a decode step goes" in steer_report.table(report)
    assert not hasattr(model, ATTRIBUTE)
