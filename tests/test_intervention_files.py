"""Condition and map files: round trips, and damaged or foreign files refused with the file named."""

import math

import pytest
import torch
from safetensors.torch import save_file

import splice
from splice.steering.files import load_intervention, save_intervention
from splice.tools.condition_fit import Rates, best_threshold


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_condition_round_trip(tmp_path):
    cond = splice.Condition(rand(16), 3, 0.125, "below", "last", metadata={"held_out_f1": "0.9"})
    path = save_intervention(cond, tmp_path / "c.safetensors", model="m")
    back = load_intervention(path)
    assert isinstance(back, splice.Condition)
    assert torch.equal(back.vector, cond.vector)
    assert (back.layer, back.threshold, back.compare, back.reduce) == (3, 0.125, "below", "last")
    assert back.metadata == {"held_out_f1": "0.9"} and back.source == str(path)


def test_low_rank_and_affine_round_trip(tmp_path):
    lr = splice.LowRank(A={1: rand(16, 3), 4: rand(16, 3, seed=1)}, B={1: rand(16, 3, seed=2), 4: rand(16, 3, seed=3)},
                        c={1: rand(3, seed=4), 4: rand(3, seed=5)}, site="mlp", scale=0.5, positions="generated")
    back = load_intervention(save_intervention(lr, tmp_path / "lr.safetensors"))
    assert isinstance(back, splice.LowRank) and back.layers == [1, 4] and back.site == "mlp" and back.scale == 0.5
    assert back.positions == lr.positions
    for field in ("A", "B", "c"):
        assert all(torch.equal(getattr(back, field)[l], getattr(lr, field)[l]) for l in (1, 4))
    aff = splice.Affine(a={2: rand(16)}, b={2: rand(16, seed=1)})
    back = load_intervention(save_intervention(aff, tmp_path / "aff.safetensors"))
    assert isinstance(back, splice.Affine) and torch.equal(back.a[2], aff.a[2]) and torch.equal(back.b[2], aff.b[2])


def test_damaged_and_foreign_files_are_refused(tmp_path):
    good = save_intervention(splice.Condition(rand(16), 3, 0.1), tmp_path / "c.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"layer.0": rand(16)}, tmp_path / "vectors.safetensors", metadata={"format": "splice.vectors"})
    meta = {"format": "splice.intervention", "version": "1", "kind": "condition", "hidden_size": "16",
            "settings": '{"layer": 3, "threshold": 0.1}'}
    save_file({"vector": torch.full((16,), math.nan)}, tmp_path / "nan.safetensors", metadata=meta)
    save_file({"vector": rand(8)}, tmp_path / "short.safetensors", metadata=meta)
    save_file({"vector": rand(16)}, tmp_path / "kind.safetensors", metadata={**meta, "kind": "controller9"})
    lr_meta = {**meta, "kind": "lowrank", "settings": '{"site": "out", "scale": 1.0, "positions": "all"}'}
    save_file({"A.1": rand(16, 17), "B.1": rand(16, 17), "c.1": rand(17)}, tmp_path / "rank.safetensors",
              metadata=lr_meta)
    cases = {"junk": "not a valid safetensors", "vectors": "not a splice intervention file", "nan": "NaN or inf",
             "short": r"one \[16\] tensor", "kind": "unknown kind", "rank": "rank 17"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            load_intervention(tmp_path / f"{name}.safetensors")
        assert name in str(info.value) or "not a" in str(info.value)
    assert load_intervention(good).layer == 3


def test_best_threshold_finds_the_separating_midpoint():
    scores = torch.tensor([0.1, 0.2, 0.35, 0.4, 0.5])
    truth = torch.tensor([False, False, True, True, True])
    threshold, compare, rates = best_threshold(scores, truth)
    assert compare == "above" and 0.2 < threshold < 0.35 and rates.f1 == 1.0
    threshold, compare, rates = best_threshold(-scores, truth)
    assert compare == "below" and rates.f1 == 1.0


def test_rates_by_hand():
    predicted = torch.tensor([True, True, False, False, True])
    truth = torch.tensor([True, False, True, False, True])
    r = Rates.of(predicted, truth)  # tp 2, fp 1, fn 1, tn 1
    assert (r.precision, r.tpr, r.fpr) == (2 / 3, 2 / 3, 0.5)
    assert r.f1 == pytest.approx(2 / 3)


def test_probe_bank_round_trip(tmp_path):
    from splice.steering.files import save_bank
    from splice.steering.probe_select import ProbeSelect

    probe = ProbeSelect(rand(2, 16), rand(2, seed=1), rand(16, seed=2), rand(16, seed=3).abs() + 0.1, 4)
    bank = [splice.Steer({l: rand(16, seed=10 * k + l) for l in (6, 7)}, gate=probe.choice(k), name=f"gact{k}")
            for k in range(2)]
    back = load_intervention(save_bank(bank, probe, tmp_path / "bank.safetensors"))
    assert [s.name for s in back] == ["gact0", "gact1"]
    assert back[0].gate.decider is back[1].gate.decider and [s.gate.offset for s in back] == [0, 1]
    assert torch.equal(back[1].gate.decider.weight, probe.weight) and back[0].gate.decider.layer == 4
    assert all(torch.equal(b.vector[l], s.vector[l]) for b, s in zip(back, bank) for l in (6, 7))
    with pytest.raises(ValueError, match="bank vector 0 is not gated by the probe's choice 0"):
        save_bank(bank[::-1], probe, tmp_path / "wrong.safetensors")


def test_controlled_vector_round_trip(tmp_path):
    from splice.steering.controller import Controller
    from splice.steering.files import save_controlled

    ctl = Controller(rand(4, 16), rand(4, seed=1), rand(3, 4, seed=2), rand(3, seed=3), rand(16, seed=4),
                     torch.ones(16), 2, [5, 6])
    steer = splice.Steer({5: rand(16, seed=5), 6: rand(16, seed=6)}, scale=0.3, gate=ctl)
    back = load_intervention(save_controlled(steer, tmp_path / "ctl.safetensors"))
    assert isinstance(back, splice.Steer) and back.layers == [5, 6] and back.scale == 0.3
    assert back.gate.layers == [5, 6] and back.gate.layer == 2
    for name in ("w1", "c1", "w2", "c2", "mean", "std"):
        assert torch.equal(getattr(back.gate, name), getattr(ctl, name))
    with pytest.raises(ValueError, match="whose gate is a Controller"):
        save_controlled(splice.Steer({5: rand(16)}), tmp_path / "x.safetensors")
