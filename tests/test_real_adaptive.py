"""Adaptive and learned steering on the real default model (SmolLM2-135M-Instruct): a CAST condition
fitted on the built-in cooking prompts, gated steering, and LinEAS maps."""

import pytest
import torch

import splice
from splice.steering.gates import cast_score
from splice.tools.condition_fit import condition_activations, fit_condition
from splice.tools.lineas import _layer_outputs, _quantiles, train_lineas
from splice.vectors.extract import builtin_pairs, extract_vectors
from splice.vectors.prompt_sets import as_chat, builtin_prompt_set

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
BEHAVIOUR_LAYERS = list(range(12, 19))


@pytest.fixture(scope="module")
def cooking(real_model):
    """(condition, report, held-out cooking prompts, held-out other prompts), all chat-formatted."""
    model, tok = real_model
    data = builtin_prompt_set("cooking")
    pos, neg = as_chat(tok, data["positive"]), as_chat(tok, data["negative"])
    condition, report = fit_condition(model, tok, pos[:36], neg[:36], layers=range(1, 12), progress=False)
    return condition, report, pos[36:], neg[36:]


@pytest.fixture(scope="module")
def happy(real_model):
    model, tok = real_model
    return extract_vectors(model, tok, *builtin_pairs("happy_sad"), progress=False)


def test_fitted_condition_separates_held_out_prompts(real_model, cooking):
    condition, report, pos, neg = cooking
    model, tok = real_model
    assert report["layer"] < BEHAVIOUR_LAYERS[0] and report["threshold_split"]["f1"] > 0.9
    assert report["held_out"]["f1"] > 0.85
    # and on 12 + 12 prompts that fit_condition never saw at all
    scores = torch.cat([_scores(model, tok, condition, p) for p in (pos, neg)])
    truth = torch.tensor([True] * len(pos) + [False] * len(neg))
    accuracy = float((condition.met(scores) == truth).float().mean())
    assert accuracy >= 0.75  # measured 0.83 (20 of 24); a useless direction scores about 0.5


def _scores(model, tok, condition, prompts):
    acts = condition_activations(model, tok, prompts, [condition.layer], condition.reduce, progress=False)[:, 0]
    return cast_score(acts, condition.vector)


def _generate(model, tok, prompts, n=16):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
        full = model(input_ids=out, attention_mask=torch.cat([enc["attention_mask"], torch.ones_like(out[:, enc["input_ids"].shape[1]:])], 1)).logits
    return out[:, enc["input_ids"].shape[1]:], full[:, enc["input_ids"].shape[1] - 1:-1]


def test_conditional_steering_leaves_other_prompts_and_steers_matching_ones(real_model, cooking, happy):
    """The issue's target: prompts that do not meet the condition stay within KL 1e-3 of unsteered
    (here: identical greedy tokens and KL below 1e-3 per token); prompts that meet it are steered
    exactly as strongly as by the unconditional vector (the same tokens)."""
    model, tok = real_model
    condition, _, pos, neg = cooking
    met_pos = condition.met(_scores(model, tok, condition, pos))
    met_neg = condition.met(_scores(model, tok, condition, neg))
    prompts = [p for p, m in zip(pos, met_pos) if m][:3] + [p for p, m in zip(neg, met_neg) if not m][:3]
    assert len(prompts) == 6
    plain, plain_logits = _generate(model, tok, prompts)
    steer = dict(layers=BEHAVIOUR_LAYERS, scale=0.4)
    with splice.patch(model, splice.Steer(happy, **steer)):
        always, _ = _generate(model, tok, prompts)
    with splice.patch(model, splice.Steer(happy, **steer, gate=condition)):
        gated, gated_logits = _generate(model, tok, prompts)
    assert torch.equal(gated[:3], always[:3]) and not torch.equal(always[:3], plain[:3])
    assert torch.equal(gated[3:], plain[3:])
    kl = torch.nn.functional.kl_div(gated_logits[3:].log_softmax(-1), plain_logits[3:].log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1)
    assert float(kl.max()) < 1e-3


def test_lineas_training_moves_source_towards_target_and_the_patch_applies_what_was_trained(real_model):
    model, tok = real_model
    positive, negative = builtin_pairs("happy_sad")
    layers = [4, 10, 16]
    affine, report = train_lineas(model, tok, negative[:8], positive[:8], layers=layers, steps=12, lr=2e-2,
                                  progress=False)
    assert report["w2_last"] < 0.8 * report["w2_first"]
    assert affine.layers == layers
    # splice's fused Affine at site out gives what the training forward (hooks) computed
    maps = {l: (lambda u, l=l: (affine.a[l] - 1.0) * u + affine.b[l]) for l in layers}
    with torch.no_grad():
        trained = _layer_outputs(model, tok, negative[:2], layers, maps)
        with splice.patch(model, affine):
            patched = _layer_outputs(model, tok, negative[:2], layers)
    for t, p in zip(trained, patched):
        torch.testing.assert_close(p, t, atol=1e-3, rtol=1e-3)
    assert _quantiles(trained[0], 8).shape == (8, model.config.hidden_size)


def test_lowrank_training_moves_source_towards_target_and_the_patch_applies_what_was_trained(real_model):
    """LoReFT's form under LinEAS's loss: the loss falls, the fused LowRank gives what the training
    hooks computed, and the sparsity penalty switches layers off."""
    model, tok = real_model
    positive, negative = builtin_pairs("happy_sad")
    layers = [4, 10]
    low, report = train_lineas(model, tok, negative[:8], positive[:8], layers=layers, steps=10, lr=2e-2,
                               form="lowrank", rank=4, progress=False)
    assert report["w2_last"] < 0.9 * report["w2_first"] and report["form"] == "lowrank"
    assert isinstance(low, splice.LowRank) and low.layers == layers and low.rank == 4
    maps = {l: (lambda u, l=l: (u @ low.A[l] - low.c[l]) @ low.B[l].T) for l in layers}
    with torch.no_grad():
        trained = _layer_outputs(model, tok, negative[:2], layers, maps)
        with splice.patch(model, low):
            patched = _layer_outputs(model, tok, negative[:2], layers)
        plain = _layer_outputs(model, tok, negative[:2], layers)
    for t, p, u in zip(trained, patched, plain):
        torch.testing.assert_close(p, t, atol=1e-3, rtol=1e-3)
        assert float((t - u).abs().max()) > 1e-2  # the map moved something
    # the proximal group-lasso step sets whole layers exactly back to the identity
    sparse, report = train_lineas(model, tok, negative[:8], positive[:8], layers=[2, 10, 20], steps=10, lr=2e-2,
                                  form="lowrank", rank=4, sparsity=0.7, progress=False)
    assert report["group_norms"][20] == 0.0 and 20 not in report["kept_layers"]
    assert sparse.layers == report["kept_layers"] and set(sparse.B) == set(report["kept_layers"]) != set()
    with pytest.raises(ValueError, match="switched every layer off"):
        train_lineas(model, tok, negative[:8], positive[:8], layers=[2, 10], steps=10, lr=2e-2, form="lowrank",
                     rank=4, sparsity=2.0, progress=False)


def test_lineas_refuses_too_few_samples_and_bad_layers(real_model):
    model, tok = real_model
    with pytest.raises(ValueError, match="at least 4 source prompts"):
        train_lineas(model, tok, ["a", "b"], ["c", "d", "e", "f"], steps=1)
    with pytest.raises(ValueError, match="out of range"):
        train_lineas(model, tok, ["a"] * 4, ["b"] * 4, layers=[30], steps=1)
    with pytest.raises(ValueError, match="rank must be an int in 1..16"):
        train_lineas(model, tok, ["a"] * 4, ["b"] * 4, layers=[3], steps=1, form="lowrank", rank=17)
    with pytest.raises(ValueError, match="unknown map form"):
        train_lineas(model, tok, ["a"] * 4, ["b"] * 4, layers=[3], steps=1, form="diagonal")


def test_controller_training_learns_to_steer_where_wanted(real_model, happy):
    """A few steps on 6 cooking (steer) and 6 other (keep) prompts: the loss falls, and the gates
    come out higher on the steer prompts than on the keep prompts."""
    from splice.tools.controller_training import train_controller

    model, tok = real_model
    data = builtin_prompt_set("cooking")
    steer, keep = as_chat(tok, data["positive"][:6]), as_chat(tok, data["negative"][:6])
    controller, controlled, report = train_controller(model, tok, steer, keep, happy, BEHAVIOUR_LAYERS, 0.4, 6,
                                                      steps=8, lr=5e-2, progress=False)
    assert report["loss_last"] < 0.7 * report["loss_first"]
    assert min(report["mean_gate_steer"]) > max(report["mean_gate_keep"])
    assert controlled.gate is controller and controlled.layers == BEHAVIOUR_LAYERS
