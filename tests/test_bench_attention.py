"""``splice bench attention`` end to end on a tiny model: every configuration, memory really saved."""

import math

import pytest
import torch
from tiny_models import LAYERS, FoldedTokenizer, tiny_model

from splice.bench import attention
from splice.hybrid.head_map import HeadMap


def scored_map():
    scores = torch.rand(LAYERS, 2, generator=torch.Generator().manual_seed(0)).tolist()
    return HeadMap(LAYERS, 2, {}, sinks=2, window=8, scores=scores)


def test_report_covers_every_configuration_and_frees_kv(real_model):
    model = tiny_model("llama")
    report = attention.run(model, FoldedTokenizer(real_model[1]), scored_map(), contexts=(96, 160), samples=2,
                           ppl_windows=1, ppl_length=64, steps=2, repeats=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "hybrid25", "random25", "hybrid50", "random50"]
    assert rows["hybrid50"]["full_fraction"] == 0.5 and rows["random50"]["full_fraction"] == 0.5
    assert set(rows["random25"]["passkey"]) == {"96", "160"} and "b1" not in rows["random25"]
    assert "b1" in rows["hybrid50"] and "b4" not in rows["hybrid50"]
    full, h25 = rows["full"], rows["hybrid25"]
    assert 3.9 * h25["b1"]["kv_bytes"] < h25["b4"]["kv_bytes"] <= 4 * h25["b1"]["kv_bytes"] < full["b4"]["kv_bytes"]
    assert math.isclose(report["ratios"]["hybrid25_kv_bytes"], h25["b1"]["kv_bytes"] / full["b1"]["kv_bytes"])
    assert report["ratios"]["hybrid25_kv_bytes"] < 0.5
    assert all(len(r["b4"]["decode_runs"]) == 2 for r in rows.values() if "b4" in r)
    assert math.isfinite(h25["ppl"]) and not hasattr(model, "splice_runtime")
    assert "| hybrid25 |" in attention.table(report)


def test_a_map_without_scores_or_for_another_model_is_refused(real_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no scores"):
        attention.run(model, FoldedTokenizer(real_model[1]), HeadMap(LAYERS, 2, {}, sinks=2, window=8))
    with pytest.raises(ValueError, match="KV heads"):
        attention.run(model, FoldedTokenizer(real_model[1]), HeadMap(LAYERS + 1, 2, {}, sinks=2, window=8,
                                                                      scores=[[0.0, 1.0]] * (LAYERS + 1)))
