"""Static layer skipping on tiny models: exact math, KV cache consistency, memory, bad input."""

import pytest
import torch
from tiny_models import HIDDEN, LAYERS, left_padded_batch, tiny_model

import splice
from splice.runtime.kv_cache import kv_bytes
from splice.runtime.splice_runtime import ATTRIBUTE

FAMILIES = ["llama", "qwen3", "phi3", "gemma2", "gemma3"]
ATOL = 2e-5


def logits(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def zero_output(module):
    def hook(m, args, kwargs, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
    return module.register_forward_hook(hook, with_kwargs=True)


def identity_layer(layer):
    def hook(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
    return layer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", ["layer", "attn", "mlp"])
def test_skipping_equals_removing_that_part(family, part):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    block = model.model.layers[1]
    if part == "layer":
        handle = identity_layer(block)
    elif part == "attn":  # a zero attention output: x + post_norm(0) = x for every family
        handle = zero_output(block.self_attn)
    else:
        handle = zero_output(block.mlp)
    expected = logits(model, ids, mask)
    handle.remove()
    with splice.patch(model, splice.Skip([1], part)):
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=ATOL, rtol=0)


def greedy_no_cache(model, ids, mask, n):
    """Greedy tokens recomputing the whole sequence each step (no KV cache): the ground truth."""
    with torch.inference_mode():
        for _ in range(n):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("skips", [[splice.Skip([0])], [splice.Skip([1, 2])],
                                   [splice.Skip([0], "attn"), splice.Skip([2], "mlp")]], ids=["l0", "l12", "parts"])
def test_generation_with_the_kv_cache_matches_recomputing(family, skips):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    with splice.patch(model, *skips), torch.inference_mode():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(cached, greedy_no_cache(model, ids, mask, 6))


def test_skipped_attention_holds_no_kv_cache():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with splice.patch(model, splice.Skip([0, 2])):
            skipped = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert [l.keys.stride(-2) == 0 for l in skipped.layers] == [True, False, True]
    assert skipped.get_seq_length() == full.get_seq_length() == ids.shape[1]
    per_layer = kv_bytes(full) / LAYERS
    assert kv_bytes(skipped) < per_layer * 1.01  # one real layer, plus one element per skipped layer


def test_remove_after_skipping_is_bit_identical():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    with splice.patch(model, splice.Skip([1])):
        assert not torch.allclose(logits(model, ids, mask), before, atol=1e-3)
    assert torch.equal(logits(model, ids, mask), before)


def test_set_skip_changes_skips_on_a_live_patch():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with splice.patch(model) as p:
        plain = logits(model, ids, mask)
        p.set_skip(splice.Skip([2]))
        assert not torch.allclose(logits(model, ids, mask), plain, atol=1e-3)
        p.set_skip()
        torch.testing.assert_close(logits(model, ids, mask), plain, atol=0, rtol=0)


def test_steering_composes_with_skipping_on_layers_that_run():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    with splice.patch(model, splice.Skip([1])):
        skipped = logits(model, ids, mask)
    with splice.patch(model, splice.Skip([1]), splice.Steer(v, layers=[0, 2], scale=2.0)):
        both = logits(model, ids, mask)
    assert not torch.allclose(both, skipped, atol=1e-3)


BAD = {
    "every layer": (lambda: [splice.Skip(range(LAYERS))], "every layer"),
    "out of range": (lambda: [splice.Skip([LAYERS])], "out of range"),
    "steer on a skipped layer": (lambda: [splice.Skip([1]), splice.Steer(torch.ones(HIDDEN), layers=[1])],
                                 "does not steer skipped layers"),
    "steer attn of a skipped attention": (
        lambda: [splice.Skip([1], "attn"), splice.Steer(torch.ones(HIDDEN), layers=[1], site="attn")],
        "does not steer skipped layers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_skips_fail_before_touching_the_model(case):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    items, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        splice.patch(model, *items())
    assert not hasattr(model, ATTRIBUTE)
    assert torch.equal(logits(model, ids, mask), before)


def test_bad_skip_specs():
    with pytest.raises(ValueError, match="unknown skip part"):
        splice.Skip([1], "heads")
    with pytest.raises(ValueError, match="at least one layer"):
        splice.Skip([])


def test_a_failed_set_skip_keeps_the_previous_skips():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with splice.patch(model, splice.Skip([1])) as p:
        before = logits(model, ids, mask)
        with pytest.raises(ValueError):
            p.set_skip(splice.Skip(range(LAYERS)))
        assert torch.equal(logits(model, ids, mask), before)


def test_recipe_skip_section_round_trips(tmp_path):
    model = tiny_model("llama")
    recipe = {"version": 1, "skip": {"layers": [2], "attn": [0]}}
    with splice.patch(model, recipe=recipe) as p:
        assert [(s.part, s.layers) for s in p.skips] == [("layer", (2,)), ("attn", (0,))]
        path = p.save_recipe(tmp_path / "r.yaml")
    loaded = splice.load_recipe(path)
    assert [(s.part, s.layers) for s in loaded.skips] == [("layer", (2,)), ("attn", (0,))]
    with pytest.raises(splice.RecipeError, match="skip.layers"):
        splice.load_recipe({"skip": {"layers": "all"}})
    with pytest.raises(splice.RecipeError, match="unknown keys"):
        splice.load_recipe({"skip": {"heads": [1]}})
