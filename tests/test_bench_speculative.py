"""splice bench speculative: the draft search per workload, timed against greedy generate, outputs checked."""

import math

import pytest
import torch
from tiny_models import FoldedTokenizer, tiny_model

from splice.bench import speculative, speculative_report
from splice.runtime.splice_runtime import ATTRIBUTE


def test_run_reports_each_workload_against_greedy_generate(real_model):
    model = tiny_model("llama")
    report = speculative.run(model, FoldedTokenizer(real_model[1]), prompts=1, calib_prompts=1, new_tokens=6,
                             repeats=2, calib_windows=1, progress=False)
    assert list(report["workloads"]) == ["continuation", "summary"]
    for workload, row in report["workloads"].items():
        assert row["identical_output"] is True
        assert {name: len(runs) for name, runs in row["runs"].items()} == {"greedy": 2, "speculative": 2,
                                                                            "hf_lookup": 2}
        plain, *trials = row["search"]
        assert (plain["layers"], plain["draft_len"]) == ([], 0)
        # every (layer count, length) pair with and without lookup, but no "draft" that is neither
        assert any(t["lookup_ngram"] and not t["layers"] for t in trials)
        assert all(t["layers"] or t["lookup_ngram"] for t in trials) and all(0 not in t["layers"] for t in trials)
        for name in ("speculative", "hf_lookup"):
            assert math.isclose(report["ratios"][f"{name}_speedup_{workload}"], row["tps"][name] / row["tps"]["greedy"])
    assert report["ratios"]["speculative_speedup"] == min(report["ratios"]["speculative_speedup_continuation"],
                                                          report["ratios"]["speculative_speedup_summary"])
    assert not hasattr(model, ATTRIBUTE)
    assert "| summary |" in speculative_report.table(report)


def test_prompts_of_calibration_and_evaluation_share_no_text(real_model):
    tok = real_model[1]
    for workload in speculative.WORKLOADS:
        calib, end = speculative.workload_prompts(tok, workload, 2, start=4 * speculative.PROFILE_LENGTH)
        evals, _ = speculative.workload_prompts(tok, workload, 2, start=end)
        assert end >= 4 * speculative.PROFILE_LENGTH + 2 * speculative.WINDOW[workload]
        passages = [tok.decode(p[0]) for p in calib + evals]
        assert len(set(passages)) == 4
    summary, _ = speculative.workload_prompts(tok, "summary", 1, start=0)
    assert "Summarize the following passage." in tok.decode(summary[0][0])


def test_draft_name_says_which_draft_won():
    row = {"draft_layers": [3, 5], "lookup_ngram": 3, "draft_len": 4}
    assert speculative_report.draft_name(row) == "skip 2 layers + prompt lookup (n <= 3), length 4"
    assert speculative_report.draft_name({**row, "draft_layers": None, "lookup_ngram": 0}) == \
        "no draft (plain decoding)"


@pytest.mark.parametrize("kwargs, message", [(dict(workloads=["poetry"]), "workload"),
                                             (dict(prompts=0), "at least 1")])
def test_bad_arguments_are_refused_before_any_work(kwargs, message, real_model):
    with pytest.raises(ValueError, match=message):
        speculative.run(tiny_model("llama"), FoldedTokenizer(real_model[1]), progress=False, **kwargs)
