"""``splice bench quant`` end to end on a tiny model: every row, the bit budgets and the ratios."""

import pytest
import torch
from test_quant_model import tied_llama
from tiny_models import FoldedTokenizer

from splice.bench import llamacpp, quant, quant_report
from splice.tools.calibration_text import wikitext_windows
from splice.tools import quant_sensitivity
from splice.tools.quant_sensitivity import measure


def test_report_has_every_row_within_budget_and_the_ratios(real_model):
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quant.run(model, FoldedTokenizer(real_model[1]), calib_windows=1, calib_length=64, eval_windows=2,
                       eval_length=64, steps=2, repeats=2, seeds=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[:5] == ["fp32", "bf16", "uniform8", "uniform4", "uniform3"]
    for t in quant.BUDGETS:
        for method in ("measured", "measured-g64", *quant.SCORED):
            assert rows[f"{method}{t}"]["bits_per_weight"] <= t
    assert len(rows["random3.5"]["ppl_by_seed"]) == 2
    assert rows["fp32"]["kl"] < 1e-6 and rows["uniform8"]["kl"] < rows["uniform3"]["kl"]
    assert rows["uniform4"]["model_bytes"] < rows["bf16"]["model_bytes"] < rows["fp32"]["model_bytes"]
    assert rows["uniform4"]["linear_bytes"] * 3 < rows["bf16"]["linear_bytes"]
    # every row timed in the interleaved rounds (warm-up dropped), its median from its own runs
    for r in rows.values():
        assert len(r["decode_runs_b1"]) == len(r["decode_runs_b8"]) == len(r["decode_runs_b16"]) == 2, r["name"]
        assert r["decode_tps_b8"] == sorted(r["decode_runs_b8"])[0] / 2 + sorted(r["decode_runs_b8"])[1] / 2
    # the tiny model's 96-wide matrices take two scale groups per row: uniform b bits is above b + 0.5
    assert rows["uniform3"]["bits_per_weight"] > 3.5 and rows["uniform4"]["bits_per_weight"] < 4.75
    assert report["uniform_neighbours"] == {"3.5": {"below": None, "above": "uniform3"},
                                            "4.25": {"below": "uniform3", "above": "uniform4"}}
    assert "measured35_beats_uniform_below" not in report["ratios"]
    assert set(report["ratios"]) >= {"q4_decode_speedup", "q4_decode_speedup_b16", "q4_decode_vs_fp32_b1",
                                     "q4_decode_vs_fp32_b8",
                                     "measured425_beats_uniform_above", "measured425_beats_random"}
    a8, q4 = rows["uniform4-a8"], rows["uniform4"]
    assert a8["activations"] == "int8" and a8["bits_per_weight"] == q4["bits_per_weight"]
    assert a8["model_bytes"] == q4["model_bytes"] and 0 < abs(a8["ppl"] / q4["ppl"] - 1) < 0.05
    assert report["ratios"]["q4a8_ppl_ratio"] == a8["ppl"] / q4["ppl"]
    assert report["ratios"]["q4a8_vs_q4_b16"] == a8["decode_tps_b16"] / q4["decode_tps_b16"]
    assert report["machine"]["torch"] == torch.__version__ and isinstance(report["command"], list)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert f"| uniform4 | {rows['uniform4']['bits_per_weight']:.3f} | {rows['uniform4']['ppl']:.2f} |" in quant_report.table(report)


def test_decode_only_times_the_dense_and_uniform_rows_and_measures_nothing(real_model, monkeypatch):
    model = tied_llama()
    monkeypatch.setattr(quant_sensitivity, "measure", lambda *a, **k: pytest.fail("decode_only measured sensitivity"))
    report = quant.run(model, FoldedTokenizer(real_model[1]), calib_windows=1, calib_length=64, eval_windows=2,
                       eval_length=64, steps=2, repeats=1, progress=False, decode_only=True)
    assert [r["name"] for r in report["rows"]] == ["fp32", "bf16", "uniform8", "uniform4", "uniform3", "uniform4-a8",
                                                   "bf16-splice-attention", "uniform4-a8-splice-attention"]
    assert report["decode_only"] and "mixed35_ppl_ratio" not in report["ratios"]
    rows = {row["name"]: row for row in report["rows"]}
    r, b16 = rows["uniform4"], rows["bf16"]["decode_tps_b16"]
    assert report["ratios"]["q4_decode_speedup_b16"] == r["decode_tps_b16"] / b16
    fast = rows["uniform4-a8-splice-attention"]
    assert fast["same_model_as"] == "uniform4-a8" and fast["attention"] == "splice" and "ppl" not in fast
    assert report["ratios"]["splice_attention_speedup_b8"] == rows["bf16-splice-attention"]["decode_tps_b8"] / (
        rows["bf16"]["decode_tps_b8"])
    for b in quant.BATCHES:  # the fastest of the four 4-bit rows, by name and ratio
        best = max(("uniform4", "uniform4-a8", "uniform4-a8-splice-attention"),
                   key=lambda n: rows[n][f"decode_tps_b{b}"])
        assert report["best_q4_rows"][f"b{b}"] == best
        assert report["ratios"][f"q4_best_decode_speedup_b{b}"] == rows[best][f"decode_tps_b{b}"] / rows["bf16"][
            f"decode_tps_b{b}"]
    assert "decode tok/s b16 |" in quant_report.table(report)
    # bytes per token: every Linear weight once per step, plus each sequence's KV cache over the mean context
    kv = 3 * 2 * 2 * 16 * 4  # tied_llama: 3 layers, K and V, 2 KV heads of 16 dims, fp32
    context = 64 + (2 - 1) / 2
    fp32 = report["rows"][0]
    assert fp32["bytes_per_token_b8"] == pytest.approx((fp32["linear_bytes"] + 8 * kv * context) / 8)
    assert fp32["bandwidth_fraction_b16"] == pytest.approx(
        fp32["bytes_per_token_b16"] * fp32["decode_tps_b16"] / report["read_bandwidth"])
    assert len(report["read_bandwidth_runs"]) == 1 and report["read_bandwidth"] > 1e8
    assert report["skipped_rows"] == {"llamacpp-q4_1": "no GGUF of this model given"}


def test_compiled_and_llamacpp_rows_are_timed_among_the_others(real_model, monkeypatch, tmp_path):
    """The compiled 4-bit rows (float and int8 activations) at every batch, and a llama.cpp row (its engine faked here) at batch 1
    on a 64-token prompt, each with bytes per token and the ratios against splice's 4-bit rows."""
    prompts = []

    class FakeLlamaCpp:
        def __init__(self, path, threads, context):
            assert path == tmp_path / "model.gguf" and threads == torch.get_num_threads()

        def decode_tps(self, prompt, steps):
            prompts.append(prompt)
            return 50.0

        def kv_bytes_per_token(self):
            return 123

        def close(self):
            prompts.append("closed")

    monkeypatch.setattr(quant, "LlamaCpp", FakeLlamaCpp)
    monkeypatch.setattr(quant, "unavailable", lambda: None)
    monkeypatch.setattr(quant, "gguf_bytes", lambda path: 1000)
    torch._dynamo.reset()
    report = quant.run(tied_llama(), FoldedTokenizer(real_model[1]), calib_windows=1, calib_length=64,
                       eval_windows=2, eval_length=64, steps=2, repeats=2, progress=False, decode_only=True,
                       compiled=True, llamacpp_gguf=tmp_path / "model.gguf")
    rows = {r["name"]: r for r in report["rows"]}
    compiled, llama, q4 = rows["uniform4-compiled"], rows["llamacpp-q4_1"], rows["uniform4"]
    a8, a8_compiled = rows["uniform4-a8"], rows["uniform4-a8-compiled"]
    assert len(compiled["decode_runs_b1"]) == len(compiled["decode_runs_b16"]) == 2
    assert a8_compiled["same_model_as"] == "uniform4-a8" and len(a8_compiled["decode_runs_b8"]) == 2
    assert compiled["bytes_per_token_b1"] == q4["bytes_per_token_b1"]
    assert llama["decode_runs_b1"] == [50.0, 50.0] and "decode_tps_b8" not in llama
    assert len(prompts) == 4 and all(len(p) == 64 for p in prompts[:3])  # warm-up round and two timed rounds
    assert prompts[3] == "closed"
    assert llama["bytes_per_token_b1"] == pytest.approx(1000 + 123 * (64 + (2 - 1) / 2))
    ratios = report["ratios"]
    fast_compiled = rows["uniform4-a8-splice-attention-compiled"]
    assert fast_compiled["same_model_as"] == "uniform4-a8-splice-attention"
    assert ratios["q4_vs_llamacpp_b1"] == max(r["decode_tps_b1"] for r in (
        q4, compiled, a8, a8_compiled, rows["uniform4-a8-splice-attention"], fast_compiled)) / 50.0
    assert ratios["q4_compiled_vs_eager_b8"] == compiled["decode_tps_b8"] / q4["decode_tps_b8"]
    assert ratios["q4a8_vs_llamacpp_b1"] == max(a8["decode_tps_b1"], a8_compiled["decode_tps_b1"]) / 50.0
    assert ratios["q4a8_decode_speedup_b16"] == max(a8["decode_tps_b16"], a8_compiled["decode_tps_b16"]) / (
        rows["bf16"]["decode_tps_b16"])
    assert report["skipped_rows"] == {}
    assert "| llamacpp-q4_1 | — | — | — | — | 50.0 | — | — |" in quant_report.table(report)


def test_the_llamacpp_row_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", lambda name: None)
    assert "make install-llamacpp" in llamacpp.unavailable()


def test_llamacpp_reads_the_bundled_gguf_like_splice():
    """Where llama-cpp-python is installed: its KV bytes per position are splice's in float16."""
    pytest.importorskip("llama_cpp")
    from splice.models.loader import bundled_gguf

    engine = llamacpp.LlamaCpp(bundled_gguf(), threads=1, context=128)
    assert engine.kv_bytes_per_token() == 30 * 2 * 3 * 64 * 2  # layers, K and V, KV heads, head dim, fp16
    engine.close()
    assert llamacpp.gguf_bytes(bundled_gguf()) < bundled_gguf().stat().st_size


def synthetic_rows(measured425_ppl: float) -> list[dict]:
    """Rows as ``run`` makes them: uniform 3 / 4 / 8 bits at group 64 (3.5, 4.5, 8.5 bits per weight)."""
    rows = [{"name": "fp32", "ppl": 10.0, "decode_tps_b1": 40.0, "decode_tps_b8": 200.0},
            {"name": "bf16", "ppl": 10.0, "decode_tps_b1": 20.0, "decode_tps_b8": 100.0, "model_bytes": 1000}]
    rows += [{"name": f"uniform{b}", "method": "uniform", "bits_per_weight": b + 0.5, "ppl": ppl,
              "decode_tps_b1": 30.0, "decode_tps_b8": 160.0} for b, ppl in ((8, 10.1), (4, 11.0), (3, 14.0))]
    rows.append({"name": "uniform4-a8", "ppl": 11.11, "decode_tps_b1": 36.0, "decode_tps_b8": 200.0})
    for t, ppl in ((3.5, 13.0), (4.25, measured425_ppl)):
        rows += [{"name": f"measured{t}", "method": "measured", "bits_per_weight": t - 0.01, "ppl": ppl,
                  "model_bytes": 400},
                 {"name": f"random{t}", "method": "random", "bits_per_weight": t - 0.01, "ppl": 20.0}]
    return rows


def test_budgets_are_compared_with_the_uniform_rows_on_both_sides():
    """measured4.25 at perplexity 12 beats uniform3 (3.5 bits/weight, 14.0), which the old check compared
    it with alone, but loses to uniform4 (4.5 bits/weight, 11.0) above the budget."""
    rows = synthetic_rows(12.0)
    below, above = quant.uniform_neighbours(rows, 4.25)
    assert (below["name"], above["name"]) == ("uniform3", "uniform4")
    assert [r["name"] for r in quant.uniform_neighbours(rows, 3.5)] == ["uniform3", "uniform3"]
    r = quant.ratios(rows)
    assert r["measured425_beats_uniform_below"] == 1.0 and r["measured425_beats_uniform_above"] == 0.0
    assert r["measured425_ppl_vs_uniform_below"] == 12.0 / 14.0 and r["measured425_ppl_vs_uniform_above"] == 12.0 / 11.0
    assert r["measured35_beats_uniform_below"] == r["measured35_beats_uniform_above"] == 1.0
    assert quant.ratios(synthetic_rows(10.5))["measured425_beats_uniform_above"] == 1.0
    assert r["q4_decode_speedup"] == 1.5 and r["q4_decode_vs_fp32_b1"] == 0.75 and r["q4_decode_vs_fp32_b8"] == 0.8
    assert r["mixed35_bytes_ratio"] == 0.4
    assert r["q4a8_vs_q4_b1"] == 1.2 and r["q4a8_decode_speedup_b8"] == 2.0 and r["q4a8_ppl_ratio"] == 11.11 / 11.0
    assert "q4a8_vs_q4_b16" not in r
    assert [r and r["name"] for r in quant.uniform_neighbours(rows, 9.0)] == ["uniform8", None]
    with pytest.raises(ValueError, match="no uniform rows"):
        quant.uniform_neighbours([r for r in rows if r.get("method") != "uniform"], 4.25)


def test_reused_measurements_with_other_settings_are_refused_before_any_work(real_model, tmp_path):
    model, tokenizer = tied_llama(), FoldedTokenizer(real_model[1])
    path = tmp_path / "m.json"
    calib = wikitext_windows(tokenizer, 1, 64)
    measure(model, calib, quant.MEASURED_WIDTHS, (64,), progress=False).save(path)  # one group size, not three
    with pytest.raises(ValueError, match=r"group sizes \[64\]; this run asks for \[32, 64, 128\]"):
        quant.run(model, tokenizer, calib_windows=1, calib_length=64, measurements_path=path, progress=False)
    with pytest.raises(ValueError, match="other calibration windows"):
        quant.run(model, tokenizer, calib_windows=2, calib_length=64, measurements_path=path, progress=False)


def test_gptq_rows_are_scored_not_timed_and_their_costs_are_reused_only_if_made_the_same_way(
        real_model, tmp_path, monkeypatch):
    model, tokenizer = tied_llama(), FoldedTokenizer(real_model[1])
    monkeypatch.setattr(quant, "GPTQ_WINDOWS", 4)
    path = tmp_path / "gptq.json"
    args = dict(calib_windows=1, calib_length=64, eval_windows=2, eval_length=64, steps=2, repeats=1,
                progress=False, decode_only=True, gptq=True, gptq_measurements_path=path)
    report = quant.run(model, tokenizer, **args)
    rows = {r["name"]: r for r in report["rows"]}
    gptq_rows = ["uniform4-g32", "gptq-uniform3", "gptq-uniform4", "gptq-measured3.5", "gptq-measured4.25"]
    assert list(rows)[5:] == gptq_rows + ["uniform4-a8", "bf16-splice-attention", "uniform4-a8-splice-attention"]
    for name in gptq_rows:
        assert "decode_runs_b1" not in rows[name], name
    assert "decode_runs_b1" in rows["uniform4"]
    for t in quant.BUDGETS:
        assert rows[f"gptq-measured{t}"]["bits_per_weight"] <= t
    assert rows["gptq-uniform3"]["kl"] < rows["uniform3"]["kl"]  # calibrated beats HQQ at 3 bits
    assert report["gptq"]["act_order"] and report["gptq"]["calibration_tokens"] == 4 * quant.GPTQ_LENGTH
    r = report["ratios"]
    assert r["gptq_mixed425_vs_grid"] == rows["gptq-measured4.25"]["ppl"] / rows["uniform4-g32"]["ppl"]
    assert r["gptq_mixed35_ppl_ratio"] == rows["gptq-measured3.5"]["ppl"] / rows["bf16"]["ppl"]
    assert "gptq_mixed425_vs_hqq" not in r  # no HQQ measured rows in a decode-only run
    monkeypatch.setattr(quant_sensitivity, "measure", lambda *a, **k: pytest.fail("the GPTQ costs were measured again"))
    again = quant.run(model, tokenizer, **args)
    assert again["ratios"]["gptq_mixed35_ppl_ratio"] == pytest.approx(r["gptq_mixed35_ppl_ratio"], rel=1e-4)
    monkeypatch.setattr(quant, "GPTQ", quant.GPTQSettings(act_order=False, grid="rtn"))
    with pytest.raises(ValueError, match="GPTQ settings and Hessian windows"):
        quant.run(model, tokenizer, **args)


def test_sliderquant_rows_need_gptq_and_report_quality_and_calibration_time(real_model, tmp_path, monkeypatch):
    model, tokenizer = tied_llama(), FoldedTokenizer(real_model[1])
    monkeypatch.setattr(quant, "GPTQ_WINDOWS", 4)
    monkeypatch.setattr(quant, "SLIDER", quant.SliderQuantSettings(fill=1))
    args = dict(calib_windows=1, calib_length=64, eval_windows=2, eval_length=64, steps=2, repeats=1,
                progress=False, decode_only=True, gptq_measurements_path=tmp_path / "gptq.json", sliderquant=True)
    with pytest.raises(ValueError, match="need gptq"):
        quant.run(model, tokenizer, **args)
    report = quant.run(model, tokenizer, gptq=True, **args)
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("sliderquant-uniform3", "sliderquant-measured3.5"):
        assert "decode_runs_b1" not in rows[name] and rows[name]["calibration_s"] > 0, name
    assert rows["sliderquant-measured3.5"]["bits_per_weight"] <= 3.5
    assert rows["sliderquant-uniform3"]["kl"] < rows["uniform3"]["kl"]  # calibrated beats HQQ at 3 bits
    assert report["sliderquant"]["fill"] == 1
    r = report["ratios"]
    assert r["sliderquant_uniform3_vs_gptq"] == rows["sliderquant-uniform3"]["ppl"] / rows["gptq-uniform3"]["ppl"]
    assert r["sliderquant_mixed35_ppl_ratio"] == rows["sliderquant-measured3.5"]["ppl"] / rows["bf16"]["ppl"]
