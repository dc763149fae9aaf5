"""splice.patch on tiny models of every supported family: exactness, reversibility, generate, sites."""

import os

import pytest
import torch
from tiny_models import CONFIGS, HEAD_DIM, HEADS, HIDDEN, LAYERS, greedy, left_padded_batch, logits, tiny_model

import splice
from splice.bench.hook_steering import add_output_hooks
from splice.ops import library
from splice.runtime.splice_runtime import ATTRIBUTE

FAMILIES = sorted(CONFIGS)
ATOL = 2e-5


def vec(seed=0, size=HIDDEN, norm=4.0):
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@pytest.mark.parametrize("family", FAMILIES)
def test_unsteered_patch_matches_and_remove_is_bit_identical(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    gen_before = greedy(model, ids, mask)
    with splice.patch(model) as p:
        assert hasattr(model, ATTRIBUTE)
        torch.testing.assert_close(logits(model, ids, mask), before, atol=ATOL, rtol=0)
        assert torch.equal(greedy(model, ids, mask), gen_before)
        # the backend that runs: forced by SPLICE_BACKEND, else the C++ kernel when it is built
        expected = os.environ.get("SPLICE_BACKEND") or ("cpp" if library.extension_loaded() else "reference")
        assert p.backends() == {"fused_steer": expected}
        with splice.ops.use_backend("reference"):
            assert p.backends() == {"fused_steer": "reference"}
    assert not hasattr(model, ATTRIBUTE)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert torch.equal(logits(model, ids, mask), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_out_site_equals_forward_hook_steering(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    vectors = {0: vec(0), 2: vec(1)}
    handles = add_output_hooks(model, vectors, scale=1.5)
    hooked = logits(model, ids, mask)
    for h in handles:
        h.remove()
    with splice.patch(model, splice.Steer(vectors, scale=1.5)):
        torch.testing.assert_close(logits(model, ids, mask), hooked, atol=ATOL, rtol=0)


def _site_module(model, family, layer, site):
    block = model.model.layers[layer]
    sandwich = family.startswith("gemma")
    if site == "attn":
        return block.post_attention_layernorm if sandwich else block.self_attn
    return block.post_feedforward_layernorm if sandwich else block.mlp


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("site", ["in", "attn", "mlp", "heads"])
def test_every_site_equals_a_hook_at_that_point(family, site):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    size = HEAD_DIM if site == "heads" else HIDDEN
    v, layer, head = vec(3, size), 1, 2
    if site == "in":
        handle = model.model.layers[layer].register_forward_pre_hook(
            lambda m, args, kwargs: ((args[0] + 2.0 * v,) + args[1:], kwargs), with_kwargs=True)
    elif site == "heads":
        full = torch.zeros(HEADS * HEAD_DIM)
        full[head * HEAD_DIM:(head + 1) * HEAD_DIM] = v
        handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: (args[0] + 2.0 * full,))
    else:
        def hook(m, args, out):
            return (out[0] + 2.0 * v,) + tuple(out[1:]) if isinstance(out, tuple) else out + 2.0 * v
        handle = _site_module(model, family, layer, site).register_forward_hook(hook)
    hooked = logits(model, ids, mask)
    handle.remove()
    steer = splice.Steer(v, layers=[layer], scale=2.0, site=site, head=head if site == "heads" else None)
    with splice.patch(model, steer):
        torch.testing.assert_close(logits(model, ids, mask), hooked, atol=ATOL, rtol=0)


def test_scale_zero_leaves_logits_unchanged():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with splice.patch(model) as p:
        plain = logits(model, ids, mask)
        p.set_slot(1, [splice.Steer(vec(0), layers=range(LAYERS), scale=0.0)])
        assert torch.equal(logits(model, ids, mask), plain)
        p.set_slot(1, [splice.Steer(vec(0), layers=range(LAYERS), scale=3.0, name="s3")])
        assert not torch.allclose(logits(model, ids, mask), plain, atol=1e-3)


def test_ablation_removes_the_direction_from_the_residual():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    d = vec(5)
    captured = {}
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: captured.update(out=out))
    with splice.patch(model, splice.Steer(d, layers=[1], op="ablate")):
        logits(model, ids, mask)
    handle.remove()
    proj = captured["out"] @ (d / d.norm())
    assert proj.abs().max() < 1e-4


def test_clamp_bounds_the_projection():
    model = tiny_model("mistral")
    ids, mask = left_padded_batch()
    d = vec(6)
    captured = {}
    handle = model.model.layers[2].register_forward_hook(lambda m, a, out: captured.update(out=out))
    with splice.patch(model, splice.Steer(d, layers=[2], op="clamp", lo=0.5, hi=0.75)):
        logits(model, ids, mask)
    handle.remove()
    proj = captured["out"] @ (d / d.norm())
    assert proj.min() > 0.5 - 1e-4 and proj.max() < 0.75 + 1e-4


def test_vectors_compose_in_order():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    d = vec(7)
    add = splice.Steer(d, layers=[1], scale=3.0, name="add")
    ablate = splice.Steer(d, layers=[1], op="ablate", name="ablate")
    with splice.patch(model) as p:
        p.set_slot(1, [ablate])
        only_ablate = logits(model, ids, mask)
        p.set_slot(1, [add, ablate])  # the ablation removes what the add put in
        torch.testing.assert_close(logits(model, ids, mask), only_ablate, atol=1e-4, rtol=0)
        p.set_slot(1, [ablate, add])
        assert not torch.allclose(logits(model, ids, mask), only_ablate, atol=1e-3)


def test_rows_carry_their_own_slots_like_separate_requests():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(7, 4, 5))
    with splice.patch(model, max_slots=4) as p:
        p.set_slot(1, [splice.Steer(vec(1), layers=[0, 1], scale=2.0, name="a")])
        p.set_slot(2, [splice.Steer(vec(2), layers=[1, 2], scale=-3.0, name="b")])
        p.assign([2, 0, 1])
        batched = greedy(model, ids, mask)
        for row, slot in enumerate([2, 0, 1]):
            keep = mask[row].bool()
            p.assign([slot])
            alone = greedy(model, ids[row:row + 1, keep], mask[row:row + 1, keep])
            assert torch.equal(batched[row, ids.shape[1] - keep.sum():], alone[0])


def test_position_windows_use_absolute_positions_under_the_kv_cache():
    """Steering positions 3..5 must hit the same tokens whether they arrive in the prefill or in
    one-token decode steps."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    steer = splice.Steer(vec(2), layers=[0, 2], scale=3.0, positions=(3, 6))
    with splice.patch(model, steer), torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :2], use_cache=True)
        stepwise = [out.logits]
        for t in range(2, 8):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            stepwise.append(out.logits)
    torch.testing.assert_close(torch.cat(stepwise, dim=1), full, atol=ATOL, rtol=0)
    plain = logits(model, ids, mask)
    torch.testing.assert_close(full[:, :3], plain[:, :3], atol=ATOL, rtol=0)
    assert not torch.allclose(full[:, 3], plain[:, 3], atol=1e-3)


@pytest.mark.parametrize("phase", ["prompt", "generated"])
def test_prompt_and_generated_phases(phase):
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch()
    n_prompt = ids.shape[1]
    plain = greedy(model, ids, mask, n=8)
    with torch.inference_mode():
        plain_scores = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=0).scores[0]
    steer = splice.Steer(vec(3, norm=30.0), layers=[0, 1], scale=1.0, positions=phase)
    with splice.patch(model, steer), torch.inference_mode():
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0).scores[0]
        steered = greedy(model, ids, mask, n=8)
    if phase == "generated":  # the prompt is untouched, so the first new token's logits are too
        torch.testing.assert_close(first, plain_scores, atol=ATOL, rtol=0)
        assert not torch.equal(steered[:, n_prompt + 1:], plain[:, n_prompt + 1:])
    else:
        assert not torch.allclose(first, plain_scores, atol=1e-3)


def test_sampled_generation_on_a_patched_model_draws_as_hook_steering_does():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()

    def sample():
        torch.manual_seed(0)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                  do_sample=True, top_k=20, pad_token_id=0)

    plain = sample()
    handles = add_output_hooks(model, {1: vec(0)}, scale=1.0)
    hooked = sample()
    for h in handles:
        h.remove()
    with splice.patch(model, splice.Steer(vec(0), layers=[1], scale=1.0)):
        steered = sample()
    assert torch.equal(steered, hooked)
    assert not torch.equal(steered, plain)


BAD_STEERS = {
    "wrong hidden size": lambda: splice.Steer(torch.ones(HIDDEN + 1), layers=[0]),
    "layer out of range": lambda: splice.Steer(torch.ones(HIDDEN), layers=[LAYERS]),
    "head out of range": lambda: splice.Steer(torch.ones(HEAD_DIM), layers=[0], site="heads", head=HEADS),
}


@pytest.mark.parametrize("case", sorted(BAD_STEERS))
def test_bad_steering_fails_before_touching_the_model(case):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    with pytest.raises(ValueError):
        splice.patch(model, BAD_STEERS[case]())
    assert not hasattr(model, ATTRIBUTE)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert torch.equal(logits(model, ids, mask), before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vector=torch.full((HIDDEN,), float("nan")), layers=[0]), "NaN or inf"),
    (dict(vector=torch.ones(HIDDEN), layers=[0], site="residual"), "unknown site"),
    (dict(vector=torch.ones(HIDDEN), layers=[0], op="multiply"), "unknown steering op"),
    (dict(vector=torch.ones(HIDDEN), layers=[0], scale=float("inf")), "finite"),
    (dict(vector=torch.ones(HIDDEN), layers=[0], op="clamp", lo=2.0, hi=1.0), "empty"),
    (dict(vector=torch.ones(HIDDEN), layers=[0], positions=(5, 5)), "empty"),
    (dict(vector=torch.zeros(HIDDEN), layers=[0], op="ablate"), "non-zero"),
])
def test_invalid_steers_are_rejected_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        splice.Steer(**kwargs)


def test_unsupported_model_names_the_supported_families():
    import transformers as T
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama.*gemma3"):
        splice.patch(model)


def test_patching_twice_and_using_a_removed_patch_are_errors():
    model = tiny_model("llama")
    p = splice.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        splice.patch(model)
    p.remove()
    with pytest.raises(RuntimeError, match="removed"):
        p.set_slot(1, [])


def test_slot_and_assignment_validation():
    model = tiny_model("llama")
    with splice.patch(model, max_slots=3) as p:
        with pytest.raises(ValueError, match="slot must be"):
            p.set_slot(3, [])
        with pytest.raises(ValueError, match="out of range"):
            p.assign([0, 5])
        with pytest.raises(KeyError, match="unknown intervention"):
            p.set_slot(1, ["nope"])
        ids, mask = left_padded_batch()
        p.assign([0, 1])
        with pytest.raises(ValueError, match="2 row slots assigned for a batch of 3"):
            logits(model, ids, mask)


def test_tables_follow_model_to_and_stay_out_of_state_dict():
    model = tiny_model("llama")
    keys = set(model.state_dict())
    with splice.patch(model, splice.Steer(vec(0), layers=[1])):
        assert set(model.state_dict()) == keys
        ids, mask = left_padded_batch()
        reference = logits(model, ids, mask)
        model.to(torch.float64)
        vecs, _ = model.splice_runtime.tables.get(1, "out")
        assert vecs.dtype == torch.float32  # the kernels read fp32 tables whatever the model dtype
        torch.testing.assert_close(logits(model, ids, mask).float(), reference, atol=1e-4, rtol=0)
