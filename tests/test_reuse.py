"""HyLRA layer reuse: the policy type, its decode path (selection, the index_attention kernel path and
the masked path), the profile, the exact solver and the patch's refusals."""

import itertools
import json

import pytest
import torch

import splice
from splice.hybrid.reuse_policy import ReusePolicy
from splice.runtime.reuse_attention import slot_mask, top_slots
from splice.tools.calibration_text import continuation_perplexity
from splice.tools.reuse_search import profile_reuse, search_reuse, solve
from tiny_models import LAYERS, VOCAB, left_padded_batch, tiny_model

PREFIX, STEPS = 24, 6


WINDOWED = {"gemma3": (0,)}  # the families reuse_model gives windowed layers, and which


def reuse_model(family):
    """A tiny model of ``family``. Gemma 2: every layer global, its logits soft-capped hard enough to
    matter at this size, in Hugging Face's eager attention (the implementation that applies the cap).
    Gemma 3: layer 0 local with a window of 4 (shorter than every test's prefix), layers 1 and 2
    global."""
    if family == "gemma2":
        return tiny_model(family, layer_types=["full_attention"] * LAYERS, attn_logit_softcapping=0.5,
                          query_pre_attn_scalar=1, attn_implementation="eager")
    if family == "gemma3":
        return tiny_model(family, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention", "full_attention"])
    return tiny_model(family)


def policy(full=(0,), topk=4, layers=LAYERS, family=None):
    """A policy for ``reuse_model(family)``: its windowed layers, and the first global layer full when
    ``full`` names layer 0 and that layer is windowed."""
    windowed = WINDOWED.get(family, ())
    full = tuple(1 if l == 0 and 0 in windowed else l for l in full)
    return ReusePolicy(layers, full, topk, "tiny", windowed_layers=windowed)


def ids(seed=0, rows=2, length=PREFIX + STEPS):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def stepwise_logits(model, x, prefix=PREFIX, mask=None):
    """Logits of tokens ``prefix..`` of ``x`` decoded one at a time over a prefilled cache."""
    kw = {} if mask is None else {"attention_mask": mask[:, :prefix]}
    out = model(input_ids=x[:, :prefix], use_cache=True, **kw)
    cache, rows = out.past_key_values, [out.logits[:, -1]]
    for i in range(prefix, x.shape[1] - 1):
        kw = {} if mask is None else {"attention_mask": mask[:, :i + 1]}
        pos = (torch.full((x.shape[0], 1), i) if mask is None else mask[:, :i + 1].cumsum(-1)[:, -1:] - 1)
        out = model(input_ids=x[:, i:i + 1], past_key_values=cache, position_ids=pos, use_cache=True, **kw)
        rows.append(out.logits[:, -1])
    return torch.stack(rows, 1)


@torch.inference_mode()
def chunk_logits(model, x, prefix=PREFIX):
    """The same logits, the tokens after the prefill run as one pass (the masked path)."""
    out = model(input_ids=x[:, :prefix], use_cache=True)
    pos = torch.arange(prefix, x.shape[1] - 1)[None].expand(x.shape[0], -1)
    rest = model(input_ids=x[:, prefix:-1], past_key_values=out.past_key_values, position_ids=pos, use_cache=True)
    return torch.cat([out.logits[:, -1:], rest.logits], 1)


# --- the policy --------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: ReusePolicy(3, (1,), 4), "layer 0 must be full"),
    (lambda: ReusePolicy(3, (0, 3), 4), r"out of range 0..2"),
    (lambda: ReusePolicy(3, (0,), 0), "topk must be a positive int"),
    (lambda: ReusePolicy(3, (0, True), 4), "layer indices"),
    (lambda: ReusePolicy(0, (0,), 4), "num_layers"),
    (lambda: ReusePolicy(3, (0,), 4, windowed_layers=(0,)), r"layers \[0\] are windowed and cannot be full"),
    (lambda: ReusePolicy(3, (2,), 4, windowed_layers=(0,)), "layer 1 must be full"),
    (lambda: ReusePolicy(2, (), 4, windowed_layers=(0, 1)), "every layer is windowed"),
    (lambda: ReusePolicy(3, (0,), 4, windowed_layers=(5,)), r"windowed_layers \[5\] out of range"),
])
def test_bad_policies_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_anchors_selecting_layers_and_json_round_trip(tmp_path):
    p = ReusePolicy(6, (3, 0, 3), 8, "m", {"lost_mass": 0.5})
    assert p.full_layers == (0, 3) and p.reuse_layers == (1, 2, 4, 5)
    assert [p.anchor(l) for l in range(6)] == [0, 0, 0, 3, 3, 3]
    assert p.selecting_layers == (0, 3)
    assert ReusePolicy(6, (0, 5), 8).selecting_layers == (0,)  # layer 5 has nothing above it
    back = ReusePolicy.load(p.save(tmp_path / "p.json"))
    assert (back.full_layers, back.topk, back.model, back.report) == ((0, 3), 8, "m", {"lost_mass": 0.5})
    control = p.random_like(1)
    assert len(control.full_layers) == 2 and 0 in control.full_layers
    w = ReusePolicy(6, (1, 4), 8, windowed_layers=(0, 3))
    assert w.global_layers == (1, 2, 4, 5) and w.reuse_layers == (2, 5) and w.selecting_layers == (1, 4)
    assert [w.anchor(l) for l in (2, 5)] == [1, 4]
    assert ReusePolicy.load(w.save(tmp_path / "w.json")).windowed_layers == (0, 3)
    control = w.random_like(2)
    assert control.windowed_layers == (0, 3) and 1 in control.full_layers and not set(control.full_layers) & {0, 3}
    (tmp_path / "bad.json").write_text(json.dumps({"num_layers": 6, "full_layers": [2], "topk": 8}))
    with pytest.raises(ValueError, match="not a splice reuse policy.*layer 0"):
        ReusePolicy.load(tmp_path / "bad.json")


# --- selection ---------------------------------------------------------------------------
def test_top_slots_sum_the_group_and_drop_zero_probability_slots():
    p = torch.zeros(1, 2, 2, 1, 5)  # [B, Hkv, G, T, L]
    p[0, 0, 0, 0] = torch.tensor([0.1, 0.6, 0.3, 0.0, 0.0])
    p[0, 0, 1, 0] = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])  # group sums: .6 .6 .5 .3 0
    p[0, 1, :, 0, 4] = 1.0
    slots = top_slots(p, 3)
    assert sorted(slots[0, 0, 0].tolist()) == [0, 1, 2]
    assert sorted(slots[0, 1, 0].tolist()) == [-1, -1, 4]  # only one slot holds any probability
    assert top_slots(p, 99).shape[-1] == 5
    mask = slot_mask(slots, 5)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False]
    assert mask[0, 1, 0].tolist() == [False, False, False, False, True]


# --- the decode path ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
def test_reading_every_slot_is_exact_attention(family):
    """topk at least the cache length: reusing layers attend to everything, so logits equal the
    unpatched model's, one token at a time (the kernel) and in one pass (the masked path). Gemma 3's
    local layer keeps its own window of 4 meanwhile."""
    model = reuse_model(family)
    x = ids()
    want_steps, want_chunk = stepwise_logits(model, x), chunk_logits(model, x)
    with splice.patch(model, reuse=policy(topk=PREFIX + STEPS, family=family)):
        torch.testing.assert_close(stepwise_logits(model, x), want_steps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chunk_logits(model, x), want_chunk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise_logits(model, x), want_steps, rtol=0, atol=0)  # removed: bit-identical


@pytest.mark.parametrize("family, full", [("llama", (0,)), ("llama", (0, 1)), ("gemma2", (0,)), ("gemma3", (0,))])
def test_kernel_decode_matches_the_masked_path_and_changes_the_output(family, full):
    """With few slots, the one-token kernel path and the several-token masked path agree, and both
    differ from full attention (reuse really restricts what is read)."""
    model = reuse_model(family)
    x = ids(3)
    plain = stepwise_logits(model, x)
    with splice.patch(model, reuse=policy(full, topk=3, family=family)):
        steps, chunk = stepwise_logits(model, x), chunk_logits(model, x)
    torch.testing.assert_close(steps, chunk, rtol=1e-4, atol=1e-4)
    assert (steps[:, 1:] - plain[:, 1:]).abs().max() > 1e-2
    torch.testing.assert_close(steps[:, 0], plain[:, 0], rtol=1e-5, atol=1e-5)  # the prefill is unchanged


def test_left_padded_batch_decodes_each_row_as_alone():
    model = tiny_model("llama")
    x, mask = left_padded_batch((9, 5, 7))
    with splice.patch(model, reuse=policy(topk=3)):
        batch = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                               pad_token_id=0)
        for row in range(x.shape[0]):
            alone = x[row:row + 1, mask[row].bool()]
            solo = model.generate(input_ids=alone, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
            assert batch[row, -STEPS:].tolist() == solo[0, -STEPS:].tolist()


def test_decode_runs_the_index_attention_kernel(monkeypatch):
    """A reusing layer's decode step goes through splice::index_attention, with the slots the full
    layer below picked."""
    import splice.runtime.reuse_attention as runtime
    calls = []
    real = runtime.index_attention

    def spy(q, k, v, idx, scale, softcap=0.0):
        calls.append(idx.clone())
        return real(q, k, v, idx, scale, softcap)

    monkeypatch.setattr(runtime, "index_attention", spy)
    model = tiny_model("llama")
    with splice.patch(model, reuse=policy(topk=3)) as p:
        stepwise_logits(model, ids())
        assert p.backends()["index_attention"] in ("cpp", "reference")
    assert len(calls) == (STEPS - 1) * (LAYERS - 1)
    assert all(c.shape == (2, 2, 3) for c in calls)


# --- refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"reuse": ReusePolicy(5, (0,), 4)}, ValueError, "model with 5 layers"),
    ({"reuse": "policy.json"}, TypeError, "ReusePolicy"),
    ({"reuse": policy(), "heads": object()}, ValueError, "cannot be combined with heads"),
])
def test_bad_reuse_fails_before_touching_the_model(kwargs, error, match):
    model = tiny_model("llama")
    forwards = [vars(layer.self_attn).get("forward") for layer in model.model.layers]
    with pytest.raises(error, match=match):
        splice.patch(model, **kwargs)
    assert [vars(layer.self_attn).get("forward") for layer in model.model.layers] == forwards
    assert not hasattr(model, "splice_runtime")


def test_reuse_refuses_skips_and_a_policy_with_other_windowed_layers():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cannot be combined with skips"):
        splice.patch(model, splice.Skip([1], "attn"), reuse=policy())
    with splice.patch(model, reuse=policy()) as p, pytest.raises(ValueError, match="layer reuse"):
        p.set_skip(splice.Skip([1], "mlp"))
    windowed = reuse_model("gemma3")
    with pytest.raises(ValueError, match=r"own sliding-window layers are \[0\]"):
        splice.patch(windowed, reuse=ReusePolicy(LAYERS, (0,), 4))
    with pytest.raises(ValueError, match=r"takes layers \[0\] as windowed; the model's own .* are \[\]"):
        splice.patch(model, reuse=policy(family="gemma3"))


def test_search_on_a_model_with_windowed_layers_profiles_and_chooses_global_layers_only():
    model = reuse_model("gemma3")
    windows = ids(5, rows=2, length=32)
    measures = profile_reuse(model, windows, topk=4, queries=8, progress=False)
    assert measures["layers"] == [1, 2] and len(measures["mass"]) == 2
    found = search_reuse(model, windows, topk=4, full=1, max_loss=1.0, queries=8, progress=False)
    assert found.full_layers == (1,) and found.windowed_layers == (0,) and found.reuse_layers == (2,)
    with splice.patch(model, reuse=found):
        stepwise_logits(model, ids(3))
    with pytest.raises(ValueError, match="at most the model's 2 global layers"):
        search_reuse(model, windows, topk=4, full=3, queries=8, progress=False)


# --- profile and solver ------------------------------------------------------------------
def brute_force(mass, full, forced):
    best = None
    for rest in itertools.combinations(range(1, len(mass)), full - 1):
        layers = (0, *rest)
        if not set(forced) <= set(layers):
            continue
        loss = sum(1 - mass[max(a for a in layers if a <= l)][l] for l in range(len(mass)) if l not in layers)
        if best is None or loss < best[1] - 1e-12:
            best = (layers, loss)
    return best


def test_solver_matches_exhaustive_search():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 7
        mass = torch.rand(n, n, generator=g).tolist()
        full = 1 + trial % 4
        forced = [3] if full > 1 and trial % 2 else []
        layers, loss = solve(mass, full, forced)
        want = brute_force(mass, full, forced)
        assert loss == pytest.approx(want[1]) and set(forced) <= set(layers) and len(layers) == full


@pytest.mark.parametrize("full, forced, match", [(1, [2], "between the 2 layers"), (9, [], "between")])
def test_solver_refuses_impossible_budgets(full, forced, match):
    with pytest.raises(ValueError, match=match):
        solve([[1.0] * 4] * 4, full, forced)


def test_profile_measures_own_topk_best_and_whole_cache_complete():
    model = tiny_model("llama", num_hidden_layers=4)
    windows = ids(5, rows=2, length=32)
    small = profile_reuse(model, windows, topk=4, queries=8, progress=False)
    mass = small["mass"]
    for l in range(4):  # a layer's own top-k holds at least as much of its attention as any other's
        assert all(mass[a][l] <= mass[l][l] + 1e-6 for a in range(l))
        assert 0 < mass[l][l] < 1
    whole = profile_reuse(model, windows, topk=32, queries=8, progress=False)
    assert all(abs(whole["mass"][a][l] - 1) < 1e-5 for l in range(4) for a in range(l + 1))
    assert whole["overlap"][1:] == pytest.approx([1.0] * 3)
    found = search_reuse(model, windows, topk=4, full=2, max_loss=1.0, queries=8, progress=False)
    assert found.full_layers == solve(mass, 2)[0] and found.report["sensitive"] == []
    strict = search_reuse(model, windows, topk=4, full=4, max_loss=1e-6, queries=8, progress=False)
    assert strict.report["sensitive"] == [0, 1, 2, 3]


def test_continuation_perplexity_scores_the_tokens_after_the_prefix_like_one_pass():
    import math
    from splice.tools.calibration_text import log_probs
    model = tiny_model("llama")
    windows = ids(7, rows=2, length=20)
    logp = log_probs(model, windows)  # position i predicts token i + 1
    nll = -logp.gather(-1, windows[:, 1:, None])[:, 6:].mean()  # tokens 7.. (after prefix 6, + 1)
    assert continuation_perplexity(model, windows, prefix=6) == pytest.approx(math.exp(float(nll)), rel=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        continuation_perplexity(model, windows, prefix=19)


@pytest.mark.parametrize("argv, match", [
    (["bench", "attention", "--method", "hylra"], "--reuse is required"),
    (["search", "reuse", "--out", "policy.txt"], "must end in .json"),
])
def test_cli_refuses_missing_or_bad_files_before_loading_the_model(argv, match):
    from splice.cli import main

    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_reuse_composes_with_steering():
    """Steering runs in the decoder layer, reuse in its attention: with every slot read, a steered and
    reusing model decodes exactly as the steered one."""
    model = tiny_model("llama")
    x = ids(11)
    steer = lambda: splice.Steer(torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3, layers=[1, 2])
    with splice.patch(model, steer()):
        want = stepwise_logits(model, x)
    with splice.patch(model, steer(), reuse=policy(topk=PREFIX + STEPS)):
        torch.testing.assert_close(stepwise_logits(model, x), want, rtol=1e-4, atol=1e-4)
    assert (want - stepwise_logits(model, x)).abs().max() > 1e-2  # the steering really changes the output
