"""``splice bench attention --method hylra`` end to end on a tiny model."""

import math

import pytest
import torch
from tiny_models import LAYERS, FoldedTokenizer, tiny_model

from splice.bench import hylra, hylra_report
from splice.hybrid.reuse_policy import ReusePolicy

CALIBRATION = {"windows": 1, "length": 64, "queries": 16}


def test_report_times_full_and_hylra_and_compares_a_random_control(real_model):
    model = tiny_model("llama", num_hidden_layers=4)
    policy = ReusePolicy(4, (0, 2), 3, "tiny", {"calibration": CALIBRATION})
    report = hylra.run(model, FoldedTokenizer(real_model[1]), policy, contexts=(96, 160), samples=2, ppl_windows=1,
                       ppl_length=64, steps=2, repeats=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "hylra", "random"]
    assert rows["hylra"]["full_layers"] == [0, 2] and len(rows["random"]["full_layers"]) == 2
    assert rows["full"]["full_layers"] == [0, 1, 2, 3] and "b1" not in rows["random"]
    full, ours = rows["full"], rows["hylra"]
    for batch, scale in (("b1", 1), ("b4", 4)):  # reuse keeps every layer's whole cache
        assert ours[batch]["kv_bytes"] == full[batch]["kv_bytes"]
        assert len(ours[batch]["decode_runs"]) == 2 and len(full[batch]["decode_runs"]) == 2
    assert 3.9 * full["b1"]["kv_bytes"] < full["b4"]["kv_bytes"] <= 4 * full["b1"]["kv_bytes"]
    assert math.isfinite(ours["ppl"]) and abs(ours["ppl"] - full["ppl"]) > 1e-3 * full["ppl"]  # 3 of 32+ keys
    r = report["ratios"]
    assert r["hylra_ppl_ratio"] == pytest.approx(ours["ppl"] / full["ppl"])
    assert r["hylra_decode_8k_speedup"] == pytest.approx(ours["b4"]["decode_tps"] / full["b4"]["decode_tps"])
    assert r["hylra_beats_random"] == float(ours["ppl"] < rows["random"]["ppl"])
    assert report["ppl_offset_tokens"] == 64 and report["machine"]["torch"] == torch.__version__
    assert not hasattr(model, "splice_runtime")
    assert "| hylra | 0 2 |" in hylra_report.table(report)


def test_a_policy_without_calibration_or_for_another_model_is_refused(real_model):
    tok = FoldedTokenizer(real_model[1])
    calibrated = ReusePolicy(LAYERS, (0,), 3, report={"calibration": CALIBRATION})
    with pytest.raises(ValueError, match="calibrated on; the first held-out window is 1"):
        hylra.run(tiny_model("llama"), tok, calibrated, contexts=(96,), ppl_length=64, ppl_offset=0, progress=False)
    with pytest.raises(ValueError, match="which windows calibrated it"):
        hylra.run(tiny_model("llama"), tok, ReusePolicy(LAYERS, (0,), 3), contexts=(96,), progress=False)
    other = ReusePolicy(LAYERS + 1, (0,), 3, report={"calibration": CALIBRATION})
    with pytest.raises(ValueError, match=f"model with {LAYERS + 1} layers"):
        hylra.run(tiny_model("llama"), tok, other, contexts=(96,), progress=False)
