"""``splice bench attention`` end to end on a tiny model: every configuration, memory really saved."""

import math

import pytest
import torch
from tiny_models import LAYERS, FoldedTokenizer, tiny_model

from splice.bench import attention, attention_report
from splice.hybrid.head_map import HeadMap
from splice.runtime.splice_runtime import ATTRIBUTE


def scored_map():
    scores = torch.rand(LAYERS, 2, generator=torch.Generator().manual_seed(0)).tolist()
    return HeadMap(LAYERS, 2, {}, sinks=2, window=8, scores=scores)


def test_report_covers_every_configuration_and_frees_kv(real_model):
    model = tiny_model("llama")
    report = attention.run(model, FoldedTokenizer(real_model[1]), scored_map(), contexts=(96, 160), samples=2,
                           ppl_windows=1, ppl_length=64, steps=2, repeats=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "full-splice", "hybrid25", "random25", "hybrid50", "random50"]
    assert rows["hybrid50"]["full_fraction"] == 0.5 and rows["random50"]["full_fraction"] == 0.5
    assert set(rows["random25"]["passkey"]) == {"96", "160"} and "b1" not in rows["random25"]
    assert "b1" in rows["hybrid50"] and "b4" not in rows["hybrid50"]
    full, splice_full, h25 = rows["full"], rows["full-splice"], rows["hybrid25"]
    assert 3.9 * h25["b1"]["kv_bytes"] < h25["b4"]["kv_bytes"] <= 4 * h25["b1"]["kv_bytes"] < full["b4"]["kv_bytes"]
    assert report["ratios"]["hybrid25_kv_bytes"] < 0.5
    # every head full through splice's kernels: the model's own cache, nothing streamed, the same model
    assert splice_full["b4"]["kv_bytes"] == full["b4"]["kv_bytes"] and splice_full["full_fraction"] == 1.0
    assert math.isclose(splice_full["ppl"], full["ppl"], rel_tol=1e-4) and splice_full["passkey"] == full["passkey"]
    timed = [r for r in rows.values() if "b1" in r]
    assert all(len(r["b1"]["prefill_runs"]) == 2 and len(r["b1"]["decode_runs"]) == 2 for r in timed)
    assert all(len(r["b4"]["decode_runs"]) == 2 for r in rows.values() if "b4" in r)
    assert report["command"] and report["machine"]["torch"] == torch.__version__
    assert math.isfinite(h25["ppl"]) and not hasattr(model, "splice_runtime")
    assert "| hybrid25 |" in attention_report.table(report)


def test_full_splice_runs_splice_attention_on_every_layer_and_full_is_unpatched():
    model = tiny_model("llama")
    configs = attention.configurations(scored_map())
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    with attention.applied(model, "full", configs["full"]):
        assert not hasattr(model, ATTRIBUTE)
    with attention.applied(model, "full-splice", configs["full-splice"]):
        assert all("forward" in vars(layer.self_attn) for layer in model.model.layers)
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert not hasattr(model, ATTRIBUTE) and all("forward" not in vars(l.self_attn) for l in model.model.layers)


def timed_row(decode_b1, decode_b4, prefill_s, kv=100, passkey=1.0, ppl=10.0):
    return {"b1": {"decode_tps": decode_b1, "prefill_s": prefill_s, "kv_bytes": kv},
            "b4": {"decode_tps": decode_b4}, "passkey_mean": passkey, "ppl": ppl}


def test_ratios_separate_the_kernels_from_streaming():
    by = {"full": timed_row(10.0, 20.0, 4.0), "full-splice": timed_row(12.0, 30.0, 2.0),
          "hybrid25": timed_row(18.0, 60.0, 1.0, kv=25, passkey=0.5, ppl=12.0),
          "random25": {"passkey_mean": 0.25}, "hybrid50": {"passkey_mean": 0.5}, "random50": {"passkey_mean": 0.5}}
    r = attention.ratios(by)
    assert r["hybrid25_decode_8k_speedup"] == 3.0 and r["hybrid25_decode_8k_speedup_b1"] == 1.8
    assert r["full_splice_decode_8k_vs_full"] == 1.5 and r["full_splice_decode_8k_vs_full_b1"] == 1.2
    assert r["hybrid25_decode_8k_vs_full_splice"] == 2.0 and r["hybrid25_decode_8k_vs_full_splice_b1"] == 1.5
    assert r["full_splice_prefill_8k_vs_full"] == 2.0 and r["hybrid25_prefill_8k_vs_full_splice"] == 2.0
    assert r["hybrid25_prefill_8k_speedup"] == 4.0 and r["hybrid25_kv_bytes"] == 0.25
    assert r["hybrid25_passkey_ratio"] == 0.5 and r["hybrid25_ppl_ratio"] == 1.2
    assert r["hybrid25_beats_random"] == 1.0 and r["hybrid50_beats_random"] == 0.5


def test_a_map_without_scores_or_for_another_model_is_refused(real_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no scores"):
        attention.run(model, FoldedTokenizer(real_model[1]), HeadMap(LAYERS, 2, {}, sinks=2, window=8))
    with pytest.raises(ValueError, match="KV heads"):
        attention.run(model, FoldedTokenizer(real_model[1]), HeadMap(LAYERS + 1, 2, {}, sinks=2, window=8,
                                                                      scores=[[0.0, 1.0]] * (LAYERS + 1)))
