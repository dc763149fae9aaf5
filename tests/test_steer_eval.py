"""``splice eval steer``'s measurements (splice.tools.steer_eval): repetition, PMI relevance on
hand-made tokens, the fluency-budget choice, the concept probe, and one real-model run."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import splice
from splice.tools import steer_eval as se
from splice.tools import steer_eval_report


def test_repetition_rate_counts_repeated_trigrams():
    assert se.repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert se.repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 4)  # (1,2,3) twice among 4
    assert se.repetition_rate([7] * 6) == pytest.approx(1 - 1 / 4)
    assert se.repetition_rate([1, 2]) == 0.0  # no trigram


def test_response_tokens_stop_after_the_first_eos():
    assert se.response_tokens([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert se.response_tokens([5, 6, 7], {2}) == [5, 6, 7]


class TableLM(torch.nn.Module):
    """logits[t] = token_table[input_ids[t]] + position_table[position_ids[t]]: a bigram model that
    also sees the position id, so misaligned targets or wrong positions under padding show."""

    def __init__(self, vocab=6, positions=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(vocab, vocab, generator=g) * 2
        self.positions = torch.randn(positions, vocab, generator=g)

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        logits = self.tokens[input_ids] + self.positions[position_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def logp(self, previous, position, token):
        return float(torch.log_softmax(self.tokens[previous] + self.positions[position], -1)[token])


def test_pmi_relevance_on_hand_made_token_sequences():
    lm = TableLM()
    pad = 0
    prompts = [[3, 1], [4]]  # left-padded to [3, 1] and [pad, 4]
    responses = [[5, 2], [1]]
    ids = torch.tensor([[3, 1], [pad, 4]])
    mask = torch.tensor([[1, 1], [0, 1]])
    own = se.token_logprobs(se.response_logprobs(lm, ids, mask, responses, pad)[0], responses)
    other = se.token_logprobs(se.response_logprobs(lm, ids.flip(0), mask.flip(0), responses, pad)[0], responses)
    # by hand: row 0 after [3, 1] (positions 0, 1): token 5 at position 2 from 1, token 2 at 3 from 5
    want_own = [[lm.logp(1, 1, 5), lm.logp(5, 2, 2)], [lm.logp(4, 0, 1)]]
    want_other = [[lm.logp(4, 0, 5), lm.logp(5, 1, 2)], [lm.logp(1, 1, 1)]]  # row 0 after [4]; row 1 after [3, 1]
    for got, want in ((own, want_own), (other, want_other)):
        assert [g.tolist() for g in got] == [pytest.approx(w, abs=1e-5) for w in want]
    pmi = sum(a - b for o, x in zip(want_own, want_other) for a, b in zip(o, x)) / 3
    assert se.pmi_relevance(own, other) == pytest.approx(pmi, abs=1e-5)
    assert se.pmi_relevance(own, own) == 0.0
    assert se.pmi_relevance([torch.tensor([-1.0, -2.0]), torch.tensor([-1.0])],
                            [torch.tensor([-3.0, -2.0]), torch.tensor([-4.0])]) == pytest.approx((2 + 0 + 3) / 3)


def test_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    p = torch.log_softmax(torch.randn(3, 5), -1)
    assert se.kl_per_token(p, p).abs().max() < 1e-6
    assert (se.kl_per_token(p, torch.log_softmax(torch.randn(3, 5), -1)) > 0).all()


def test_equal_fluency_takes_the_best_concept_within_the_perplexity_budget():
    runs = [{"scale": 0.0, "concept": 0.2, "perplexity": 10.0}, {"scale": 0.2, "concept": 0.4, "perplexity": 12.0},
            {"scale": 0.4, "concept": 0.7, "perplexity": 14.9}, {"scale": 0.6, "concept": 0.9, "perplexity": 15.1},
            {"scale": 0.8, "concept": None, "perplexity": 11.0}, {"scale": 1.0, "concept": 0.95, "perplexity": 40.0}]
    best = se.equal_fluency(runs, base_perplexity=10.0, budget=1.5)
    assert (best["scale"], best["concept"], best["perplexity_limit"]) == (0.4, 0.7, 15.0)
    assert se.equal_fluency(runs, 10.0, 1.0)["scale"] == 0.0
    assert se.equal_fluency(runs, 10.0, 5.0)["scale"] == 1.0
    assert se.equal_fluency(runs, 1.0, 1.5) is None


def _clouds(shift: float, n=200, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(dim)
    direction[3] = 1.0
    x = torch.randn(2 * n, dim, generator=g) * 3.0 + 5.0  # unstandardised: an offset and a scale to undo
    x[:n] += shift * direction
    return x, torch.tensor([1] * n + [0] * n)


def test_probe_separates_two_gaussian_clouds():
    x, y = _clouds(shift=12.0)
    probe = se.fit_probe(x, y)
    assert (probe.n_train, probe.n_test) == (300, 100)
    assert probe.test_accuracy > 0.95
    p = probe.probability(x)
    assert float(p[y == 1].mean()) > 0.9 > 0.1 > float(p[y == 0].mean())


def test_probe_on_identical_clouds_is_at_chance_on_held_out_text():
    x, y = _clouds(shift=0.0, dim=64)
    probe = se.fit_probe(x, y)
    assert abs(probe.test_accuracy - 0.5) < 0.12
    assert probe.train_accuracy > probe.test_accuracy + 0.1  # it fits noise: only held-out accuracy is honest


def test_probe_minimises_the_l2_regularised_logistic_loss():
    x, y = _clouds(shift=2.0)
    for l2 in (1e-2, 1.0):
        probe = se.fit_probe(x, y, l2=l2)
        train, _ = se.stratified_split(y, 0.25, seed=0)
        z = (x[train] - probe.mean) / probe.std
        w = probe.weight.clone().requires_grad_(True)
        b = torch.tensor(probe.bias, requires_grad=True)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y[train].float())
        (bce + 0.5 * l2 * (w * w).sum()).backward()
        assert float(torch.cat([w.grad, b.grad[None]]).norm()) < 1e-4
    assert float(se.fit_probe(x, y, l2=1.0).weight.norm()) < float(se.fit_probe(x, y, l2=1e-2).weight.norm())


def test_stratified_split_keeps_each_class_apart():
    y = torch.tensor([1] * 8 + [0] * 12)
    train, test = se.stratified_split(y, 0.25, seed=0)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(20))
    assert (int(y[test].sum()), int((y[test] == 0).sum())) == (2, 3)


@pytest.mark.real_model
def test_harness_on_the_real_model(real_model, tmp_path):
    """16 new tokens, not 8: the first instruction's unsteered 8-token reply is "I'm glad you asked about
    the details", which the probe rightly scores 0.97, and the two-reply means at 8 tokens then say
    nothing about steering (0.82 unsteered, 0.69 at scale 0.8)."""
    model, tokenizer = real_model
    report = se.evaluate(model, tokenizer, methods=["mean_diff", "conditional"], scales=[0.0, 0.8], instructions=2,
                         max_new_tokens=16, condition_prompts=2, progress=False)
    base = report["unsteered"]
    assert 0.9 <= report["probe"]["test_accuracy"] <= 1.0
    assert base["n"] == 2 and 0 < base["tokens"] <= 32 and abs(base["kl"]) < 1e-4
    assert set(report["methods"]) == {"mean_diff", "conditional"}
    for name, entry in report["methods"].items():
        assert [r["scale"] for r in entry["runs"]] == [0.0, 0.8]
        assert entry["runs"][0]["concept"] == base["concept"]  # scale 0 is the unsteered run, exactly
        assert entry["equal_fluency"]["scale"] in (0.0, 0.8)
        assert len(entry["rows"]["0.8"]) == 2
    steered = report["methods"]["mean_diff"]["runs"]
    assert steered[1]["concept"] > steered[0]["concept"]
    assert steered[1]["kl"] > 0.1
    cond = report["methods"]["conditional"]["condition"]
    assert cond["tpr"] == 1.0 and cond["fpr_instructions"] == 0.0
    assert cond["decision_mismatches"] == 0
    for run in cond["runs"]:
        assert run["not_met"]["kl"] < 1e-3  # CAST: the prompts that do not meet the condition are not steered
    assert cond["runs"][1]["met"]["concept"] > cond["runs"][0]["met"]["concept"]
    assert "| conditional | 0.8 |" in steer_eval_report.table(report)
    assert steer_eval_report.plot(report, tmp_path / "eval.png").stat().st_size > 0


@pytest.mark.real_model
def test_learned_maps_are_evaluated_over_their_own_scale_grid(real_model, monkeypatch):
    """A map's scale is t in u + t*delta(u), not a vector's coefficient: map methods run over
    map_scales, the others over scales, and each report says which grid it used."""
    model, tokenizer = real_model
    assert {"lineas", "loreft"} <= se.MAP_METHODS and not {"mean_diff", "pca", "conditional"} & se.MAP_METHODS
    hidden = model.config.hidden_size
    shift = splice.Affine(a={l: torch.ones(hidden) for l in se.STEER_LAYERS},
                          b={l: torch.full((hidden,), 0.05) for l in se.STEER_LAYERS})
    monkeypatch.setitem(se.METHODS, "shift", lambda ctx: lambda scale: [dataclasses.replace(shift, scale=scale)])
    monkeypatch.setattr(se, "MAP_METHODS", {"shift"})
    report = se.evaluate(model, tokenizer, methods=["mean_diff", "shift"], scales=[0.8], map_scales=[1.0, 2.0],
                         instructions=1, max_new_tokens=4, progress=False)
    assert [r["scale"] for r in report["methods"]["mean_diff"]["runs"]] == [0.0, 0.8]
    assert [r["scale"] for r in report["methods"]["shift"]["runs"]] == [0.0, 1.0, 2.0]
    assert report["settings"]["map_methods"] == ["shift"] and report["settings"]["map_scales"] == [0.0, 1.0, 2.0]
