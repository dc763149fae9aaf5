"""LayerBoost-style layer policies: the policy type, its patch, the budgeted solver and the search."""

import itertools
import json
import random

import pytest
import torch

import splice
from splice.hybrid.head_map import HeadMap
from splice.hybrid.layer_policy import CHOICES, LayerPolicy, choice_costs
from splice.tools.layer_policy_search import solve, tiered_like
from tiny_models import LAYERS, tiny_model

SINKS, WINDOW, LENGTH = 1, 8, 40  # windows shorter than the 40-token input: the window drops tokens


def ids(seed=0, length=LENGTH):
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.inference_mode():
        return model(input_ids=x).logits


def policy(*choices):
    return LayerPolicy.from_choices(list(choices), SINKS, WINDOW, "tiny")


# --- solver ------------------------------------------------------------------------------
COSTS = [{"full": 10.0, "window": 4.0, "none": 0.0}] * 3
LOSSES = [{"full": 0.0, "window": 1.0, "none": 9.0}, {"full": 0.0, "window": 2.0, "none": 4.0},
          {"full": 0.0, "window": 6.0, "none": 7.0}]


@pytest.mark.parametrize("budget, expected, loss, cost", [
    (30, ["full"] * 3, 0.0, 30.0),
    (20, ["window", "window", "full"], 3.0, 18.0),          # beats (full, full, none): loss 4 at cost 20
    (18, ["window", "window", "full"], 3.0, 18.0),          # a budget equal to the cost is allowed
    (17.99, ["window", "none", "full"], 5.0, 14.0),         # ... one just below it is not
    (0, ["none"] * 3, 20.0, 0.0),
])
def test_solver_returns_the_hand_computed_optimum(budget, expected, loss, cost):
    assert solve(COSTS, LOSSES, budget) == (expected, loss, cost)


def test_solver_matches_exhaustive_search_and_respects_the_budget():
    rng = random.Random(0)
    for trial in range(40):
        layers = rng.randint(1, 6)
        costs = [{c: float(rng.randint(0, 9)) for c in CHOICES} for _ in range(layers)]
        losses = [{c: float(rng.randint(0, 20)) for c in CHOICES} for _ in range(layers)]
        budget = float(rng.randint(0, 9 * layers))
        feasible = [(sum(losses[l][c] for l, c in enumerate(p)), sum(costs[l][c] for l, c in enumerate(p)))
                    for p in itertools.product(CHOICES, repeat=layers)
                    if sum(costs[l][c] for l, c in enumerate(p)) <= budget]
        if not feasible:
            with pytest.raises(ValueError, match="below the cheapest"):
                solve(costs, losses, budget)
            continue
        picks, loss, cost = solve(costs, losses, budget)
        assert cost <= budget
        assert loss == min(f[0] for f in feasible), trial
        assert (loss, cost) == (sum(losses[l][c] for l, c in enumerate(picks)),
                                sum(costs[l][c] for l, c in enumerate(picks)))


@pytest.mark.parametrize("costs, losses, budget, match", [
    (COSTS[:2], LOSSES, 10, "one entry per layer"),
    ([{"full": 1.0, "window": 1.0}] * 3, LOSSES, 10, "must give"),
    (COSTS, LOSSES[:2] + [{"full": 0.0, "window": -1.0, "none": 1.0}], 10, "finite and >= 0"),
    (COSTS, LOSSES[:2] + [{"full": 0.0, "window": float("nan"), "none": 1.0}], 10, "finite and >= 0"),
    (COSTS, LOSSES, -1, "budget"),
    ([{"full": 3.0, "window": 2.0, "none": 1.0}] * 3, LOSSES, 2.5, "below the cheapest"),
])
def test_solver_refuses_bad_input(costs, losses, budget, match):
    with pytest.raises(ValueError, match=match):
        solve(costs, losses, budget)


def test_cost_model_is_attention_flops_per_token():
    from splice.adapters.architecture import Adapter

    adapter = Adapter(tiny_model("llama"))
    costs = choice_costs(adapter, 100, 4, 16)
    projections = 2 * 64 * (4 + 2 * 2) * 16 + 2 * 4 * 16 * 64
    assert costs == {"full": projections + 4 * 4 * 16 * 100, "window": projections + 4 * 4 * 16 * 20, "none": 0.0}
    assert choice_costs(adapter, 10, 4, 16)["window"] == choice_costs(adapter, 10, 4, 16)["full"]  # T < window
    with pytest.raises(ValueError, match="context"):
        choice_costs(adapter, 0, 4, 16)


# --- policy type ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: LayerPolicy.from_choices(["full", "linear", "none"]), "unknown layer choices"),
    (lambda: LayerPolicy(3, window_layers=(3,)), r"window_layers \[3\] out of range"),
    (lambda: LayerPolicy(3, none_layers=(-1,)), r"none_layers \[-1\] out of range"),
    (lambda: LayerPolicy(3, window_layers=(1,), none_layers=(1,)), "both"),
    (lambda: LayerPolicy(3, window_layers=(1.0,)), "ints"),
    (lambda: LayerPolicy(0), "num_layers"),
    (lambda: LayerPolicy(3, sinks=0), "sink"),
    (lambda: LayerPolicy(3, window=0), "window"),
])
def test_bad_policies_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_json_round_trip(tmp_path):
    made = LayerPolicy.from_choices(["none", "full", "window"], 2, 16, "tiny", report={"budget": 0.5})
    path = made.save(tmp_path / "p.json")
    back = LayerPolicy.load(path)
    assert back == made and back.choices == ["none", "full", "window"] and back.report == {"budget": 0.5}


@pytest.mark.parametrize("tamper, match", [
    (lambda d: d["layers"].update(none=[7]), "out of range"),
    (lambda d: d["layers"].update(linear=[1]), "unknown layer choices"),
    (lambda d: d.pop("sinks"), "sinks"),
    (lambda d: d.update(num_layers="three"), "num_layers"),
    (lambda d: d["layers"].update(window=[0, 2]), "both"),
])
def test_tampered_files_are_refused(tmp_path, tamper, match):
    data = policy("none", "full", "window").to_dict()
    tamper(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        LayerPolicy.load(path)


def test_shuffled_keeps_the_choices_and_tiered_follows_removal_sensitivity():
    made = LayerPolicy.from_choices(["full"] * 4 + ["window"] * 3 + ["none"] * 3, report={
        "sensitivity_kl": {"none": [5, 0.1, 9, 0.2, 3, 0.3, 7, 1, 2, 4]}})
    shuffled = [made.shuffled(s).choices for s in range(3)]
    assert all(sorted(c) == sorted(made.choices) for c in shuffled) and shuffled[0] != made.choices
    tiered = tiered_like(made)
    assert (tiered.none_layers, tiered.window_layers) == ((1, 3, 5), (4, 7, 8))
    with pytest.raises(ValueError, match="sensitivities"):
        tiered_like(policy("full", "none", "full"))


# --- the patch -----------------------------------------------------------------------------
def test_policy_patch_streams_skips_and_leaves_full_layers_untouched():
    model = tiny_model("llama")
    layers = model.model.layers
    calls = {i: 0 for i in range(LAYERS)}
    hooks = [layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in range(LAYERS)]
    x = ids()
    with splice.patch(model, policy=policy("full", "window", "none")) as p:
        assert "forward" not in vars(layers[0].self_attn) and "forward" not in vars(layers[2].self_attn)
        assert "forward" in vars(layers[1].self_attn)  # splice's streaming attention
        assert p.runtime.skip.static == [(True, True), (True, True), (False, True)]
        assert p.head_map.streaming(1) == [0, 1] and p.head_map.streaming(0) == p.head_map.streaming(2) == []
        got = logits(model, x)
    assert calls == {0: 1, 1: 1, 2: 0}  # the none layer's attention never ran
    for h in hooks:
        h.remove()
    heads = HeadMap(LAYERS, 2, {0: {0, 1}, 2: {0, 1}}, SINKS, WINDOW)
    with splice.patch(model, splice.Skip([2], "attn"), heads=heads):
        assert torch.equal(got, logits(model, x))  # the same as the two mechanisms by hand
    with splice.patch(model, splice.Skip([2], "attn")):
        assert not torch.allclose(got, logits(model, x))  # and the window really drops tokens


def test_an_all_full_policy_changes_nothing_and_remove_is_bit_identical():
    model = tiny_model("llama")
    x = ids()
    before = logits(model, x)
    with splice.patch(model, policy=policy("full", "full", "full")) as p:
        assert p.head_map is None and p.skips == []
        torch.testing.assert_close(logits(model, x), before)  # splice's layer forward: same math
    p = splice.patch(model, policy=policy("window", "none", "window"))
    assert not torch.allclose(before, logits(model, x))
    p.remove()
    assert torch.equal(before, logits(model, x))
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("choices", [("window", "none", "full"), ("none", "window", "window")])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_generation_under_a_policy_matches_recomputing(choices, family):
    """Window layers' streaming stores and none layers' length-only cache entries together give the
    tokens of recomputing every step without a cache (left padding, windows that wrap). Gemma 3:
    layer 0 has the model's own window of 6 (shorter than the prompts), layers 1 and 2 are global."""
    from test_hybrid import greedy_no_cache  # positions as generate gives them under left padding
    from tiny_models import greedy, left_padded_batch

    model = tiny_model(family) if family == "llama" else tiny_model(
        family, sliding_window=6, layer_types=["sliding_attention", "full_attention", "full_attention"])
    ids, mask = left_padded_batch((14, 9, 12))
    with splice.patch(model, policy=LayerPolicy.from_choices(list(choices), 1, 4)):
        cached = greedy(model, ids, mask, 8)
        assert torch.equal(cached, greedy_no_cache(model, ids, mask, 8))


@pytest.mark.parametrize("make, error, match", [
    (lambda: dict(policy=LayerPolicy.from_choices(["full"] * 4)), ValueError, "4 layers"),
    (lambda: dict(policy=policy("window", "full", "full"), heads=HeadMap(LAYERS, 2, {}, 1, 8)), ValueError,
     "not both"),
    (lambda: dict(policy=["full", "none", "full"]), TypeError, "LayerPolicy"),
    (lambda: dict(policy=LayerPolicy(3, window_layers=(1,), sinks=200, window=100)), ValueError, "context"),
])
def test_bad_policies_fail_before_touching_the_model(make, error, match):
    model = tiny_model("llama")
    x = ids()
    before = logits(model, x)
    with pytest.raises(error, match=match):
        splice.patch(model, **make())
    assert not hasattr(model, "_splice") and not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(before, logits(model, x))


def test_sensitivities_from_each_layer_equal_running_the_whole_model():
    """Starting at layer l from the unpatched hidden states gives the whole patched model's KL (to
    rounding: there the layers before l run splice's forward)."""
    from splice.tools.calibration_text import log_probs
    from splice.tools.layer_policy_search import policy_quality, sensitivities

    model = tiny_model("llama")
    x = ids(3)
    before = logits(model, x)
    got = sensitivities(model, x, SINKS, WINDOW, batch_size=1, progress=False)
    reference = log_probs(model, x, 1)
    for layer, choice in itertools.product(range(LAYERS), ("window", "none")):
        choices = ["full"] * LAYERS
        choices[layer] = choice
        whole = policy_quality(model, policy(*choices), x, reference, 1)[1]
        assert got[choice][layer] == pytest.approx(whole, rel=1e-3), (layer, choice)  # splice's layer forward: same math
        assert whole > 1e-4  # the window drops tokens on this input
    assert got["full"] == [0.0] * LAYERS and len(model.model.layers) == LAYERS
    assert torch.equal(before, logits(model, x))
    with pytest.raises(ValueError, match="longer than sinks"):
        sensitivities(model, x[:, :SINKS + WINDOW], SINKS, WINDOW)


def test_search_solves_its_measurements_under_the_budget_and_refuses_bad_input():
    from splice.adapters.architecture import Adapter
    from splice.tools.layer_policy_search import search_policy

    model = tiny_model("llama")
    found = search_policy(model, ids(4), 0.5, context=100, sinks=SINKS, window=WINDOW, held_out=ids(5),
                          progress=False)
    report, costs = found.report, choice_costs(Adapter(model), 100, SINKS, WINDOW)
    losses = [{c: report["sensitivity_kl"][c][l] for c in CHOICES} for l in range(LAYERS)]
    assert found.choices == solve([costs] * LAYERS, losses, 0.5 * LAYERS * costs["full"])[0]
    assert report["cost_fraction"] <= 0.5 and report["held_out"]["kl"] > 0
    again = search_policy(model, ids(4), 0.2, context=100, sinks=SINKS, window=WINDOW,
                          measured=report["sensitivity_kl"])
    assert again.report["cost_fraction"] <= 0.2 and again.report["sensitivity_kl"] == report["sensitivity_kl"]
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="budget"):
            search_policy(model, ids(4), bad, sinks=SINKS, window=WINDOW)
    with pytest.raises(ValueError, match="one value per layer"):
        search_policy(model, ids(4), 0.5, sinks=SINKS, window=WINDOW, measured={c: [0.0] for c in CHOICES})
    with pytest.raises(ValueError, match="longer than sinks"):
        search_policy(model, ids(4), 0.5, sinks=SINKS, window=WINDOW, held_out=ids(5, SINKS + WINDOW))


# --- the search on the real model -------------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.slow  # 60 sensitivity passes and 6 held-out evaluations: minutes on 2 cores
def test_searched_policy_beats_random_policies_of_the_same_cost_on_held_out_text(real_model):
    from splice.bench import layerboost
    from splice.tools.calibration_text import wikitext_windows
    from splice.tools.layer_policy_search import search_policy

    model, tok = real_model
    calibration = wikitext_windows(tok, 1, 192)
    with pytest.raises(ValueError, match="longer than sinks"):
        search_policy(model, calibration, 0.3, sinks=4, window=188)
    found = search_policy(model, calibration, 0.08, sinks=4, window=32, progress=False)
    report = found.report
    assert report["cost_fraction"] <= 0.08 and found.window_layers and found.none_layers
    assert len(report["sensitivity_kl"]["none"]) == 30
    bench = layerboost.run(model, tok, found, seeds=3, ppl_windows=2, ppl_length=192, progress=False)
    assert bench["ppl_offset_tokens"] >= 192  # held out: after the calibration window
    rows = {r["name"]: r for r in bench["rows"]}
    assert all(r["cost_fraction"] == pytest.approx(report["cost_fraction"]) for n, r in rows.items() if n != "full")
    assert bench["ratios"]["layerboost_beats_random"] == 1.0, bench["ratios"]
    assert rows["layerboost"]["ppl"] < min(rows[f"random{s}"]["ppl"] for s in range(3))


@pytest.mark.parametrize("argv, match", [
    (["bench", "attention", "--method", "layerboost"], "--policy is required"),
    (["search", "attention", "--out", "policy.txt"], "must end in .json"),
])
def test_cli_refuses_missing_or_bad_files_before_loading_the_model(argv, match):
    from splice.cli import main

    with pytest.raises(SystemExit, match=match):
        main(argv)
