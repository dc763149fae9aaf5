"""``splice bench quant`` end to end on a tiny model: every row, the bit budgets and the ratios."""

import math

import torch
from test_quant_model import tied_llama
from tiny_models import FoldedTokenizer

from splice.bench import quant


def test_report_has_every_row_within_budget_and_the_ratios(real_model):
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quant.run(model, FoldedTokenizer(real_model[1]), calib_windows=1, calib_length=64, eval_windows=2,
                       eval_length=64, steps=2, repeats=1, seeds=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[:5] == ["fp32", "bf16", "uniform8", "uniform4", "uniform3"]
    for t in quant.BUDGETS:
        for method in ("measured", "measured-g64", *quant.SCORED):
            assert rows[f"{method}{t}"]["bits_per_weight"] <= t
    assert len(rows["random3.5"]["ppl_by_seed"]) == 2
    assert rows["fp32"]["kl"] < 1e-6 and rows["uniform8"]["kl"] < rows["uniform3"]["kl"]
    assert rows["uniform4"]["model_bytes"] < rows["bf16"]["model_bytes"] < rows["fp32"]["model_bytes"]
    assert rows["uniform4"]["linear_bytes"] * 3 < rows["bf16"]["linear_bytes"]
    assert all(r["decode_tps_b1"] > 0 and r["decode_tps_b8"] > 0 for r in rows.values())
    assert math.isclose(report["ratios"]["uniform3_ppl_ratio"], rows["uniform3"]["ppl"] / rows["bf16"]["ppl"])
    assert set(report["ratios"]) >= {"q4_decode_speedup", "mixed35_ppl_ratio", "uniform3_ppl_ratio",
                                     "mixed35_bytes_ratio", "measured425_beats_random"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert f"| uniform4 | {rows['uniform4']['bits_per_weight']:.3f} | {rows['uniform4']['ppl']:.2f} |" in quant.table(report)
