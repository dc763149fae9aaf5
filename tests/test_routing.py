"""Per-request routing decided at prefill: rows skip different layers while decoding."""

import pytest
import torch
from tiny_models import HIDDEN, LAYERS, VOCAB, left_padded_batch, tiny_model

import splice
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.skipping.routers import FixedRouter, InfluenceRouter, LinearRouter, Router, load_router


class RowRouter(Router):
    """Test router: row ``r`` skips the layers in ``plan[r]`` (deterministic mixed skip sets)."""

    kind = "test"

    def __init__(self, plan):
        super().__init__({l for layers in plan for l in layers}, LAYERS, HIDDEN)
        self.plan = plan

    def score(self, layer, x_in, x_out, mask):
        return torch.tensor([1.0 if layer in self.plan[r] else -1.0 for r in range(x_in.shape[0])])


def generate(model, ids, mask, n=6):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def prefill_then_skip(model, p, ids, skip_layers, n=6):
    """Reference: prefill with every layer, then decode with ``skip_layers`` skipped statically."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        if skip_layers:
            p.set_skip(splice.Skip(skip_layers))
        for step in range(n - 1):
            pos = torch.tensor([[ids.shape[1] + step]])
            out = model(input_ids=tokens[-1], past_key_values=cache, position_ids=pos, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        p.set_skip()
    return torch.cat([ids] + tokens, 1)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fixed_router_is_full_prefill_then_static_skipping(family):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with splice.patch(model) as p:
        expected = prefill_then_skip(model, p, ids, [1, 2])
        p.set_router(FixedRouter([1, 2], LAYERS, HIDDEN))
        routed = generate(model, ids, torch.ones_like(ids))
    assert torch.equal(routed.sequences, expected)
    cache = routed.past_key_values  # no row runs layers 1 and 2: length-only entries, no memory
    assert [cache.layers[l].keys.stride(-2) == 0 for l in range(LAYERS)] == [False, True, True]


def test_rows_with_different_skip_sets_match_each_request_alone():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(7, 4, 5))
    plan = [{1}, {1, 2}, set()]
    with splice.patch(model, router=RowRouter(plan)) as p:
        batched = generate(model, ids, mask)
        for row, layers in enumerate(plan):
            keep = mask[row].bool()
            p.set_router(None)
            alone = prefill_then_skip(model, p, ids[row:row + 1, keep], sorted(layers))
            assert torch.equal(batched.sequences[row, ids.shape[1] - keep.sum():], alone[0])
            p.set_router(RowRouter(plan))
    cache = batched.past_key_values
    # the KV of the rows that skip a layer was dropped when decoding started
    assert [cache.layers[l].keys.shape[0] for l in range(LAYERS)] == [3, 1, 2]


def test_gather_scatter_path_runs_on_the_selected_rows_only():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch(lengths=(5, 5, 5, 5))
    calls = []
    handle = model.model.layers[2].mlp.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with splice.patch(model, router=RowRouter([{2}, set(), {2}, set()])):
        generate(model, ids, mask, n=3)
    handle.remove()
    assert calls == [4, 2, 2]  # prefill: all rows; decode: the two rows that run layer 2


def test_influence_router_skips_low_influence_layers_per_prompt():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(7, 4, 5))
    router = InfluenceRouter([1, 2], LAYERS, HIDDEN, threshold=1e9)  # everything is below: skip both
    with splice.patch(model, router=router):
        generate(model, ids, mask, n=2)
        assert router.decide()[:, [1, 2]].all()
    router = InfluenceRouter([1, 2], LAYERS, HIDDEN, threshold=-1.0)  # nothing is below: skip none
    with splice.patch(model, router=router):
        generate(model, ids, mask, n=2)
        assert not router.decide().any()


def test_router_files_round_trip_and_refuse_other_models(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 2
    router = LinearRouter([1, 2], LAYERS, HIDDEN, torch.randn(n, HIDDEN, generator=g), torch.randn(n, generator=g),
                          torch.zeros(n, HIDDEN), torch.ones(n, HIDDEN), model="tiny")
    loaded = load_router(router.save(tmp_path / "r.safetensors"))
    assert isinstance(loaded, LinearRouter) and loaded.layers == (1, 2)
    assert torch.equal(loaded.weight, router.weight)
    infl = load_router(InfluenceRouter([2], LAYERS, HIDDEN, 0.25).save(tmp_path / "i.safetensors"))
    assert infl.threshold == 0.25
    other = tiny_model("llama")
    other.config.num_hidden_layers = LAYERS  # same depth, different hidden size below
    wrong = LinearRouter([1], LAYERS, HIDDEN * 2, torch.zeros(1, HIDDEN * 2), torch.zeros(1),
                         torch.zeros(1, HIDDEN * 2), torch.ones(1, HIDDEN * 2)).save(tmp_path / "w.safetensors")
    ids, mask = left_padded_batch()
    before = generate(other, ids, mask, n=2).sequences
    with pytest.raises(splice.RecipeError, match="hidden size"):
        splice.patch(other, recipe={"routing": {"router": str(wrong)}})
    assert not hasattr(other, ATTRIBUTE)
    assert torch.equal(generate(other, ids, mask, n=2).sequences, before)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        load_router(tmp_path / "bad.safetensors")


def test_routing_conflicts_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer 0 cannot be routed"):
        FixedRouter([0, 1], LAYERS, HIDDEN)
    with pytest.raises(ValueError, match="both skipped statically and routed"):
        splice.patch(model, splice.Skip([1]), router=FixedRouter([1], LAYERS, HIDDEN))
    with pytest.raises(ValueError, match="does not steer skipped layers"):
        splice.patch(model, splice.Steer(torch.ones(HIDDEN), layers=[2]), router=FixedRouter([2], LAYERS, HIDDEN))
    assert not hasattr(model, ATTRIBUTE)


def test_fitted_routers_hit_the_target_fraction_and_follow_the_costs():
    from splice.adapters.architecture import Adapter
    from splice.tools.router_training import fit_influence_router, fit_linear_router, measure_routing_data

    model = tiny_model("llama")
    windows = torch.randint(3, VOCAB, (12, 10), generator=torch.Generator().manual_seed(5))
    data = measure_routing_data(model, windows, prompt_len=6, batch_size=4, progress=False)
    assert data.layers == [1, 2] and data.cost.shape == (12, 2) and data.features.shape == (12, 2, HIDDEN)
    assert (data.cost > 0).all()
    adapter = Adapter(model)
    influence = fit_influence_router(data, 0.5, adapter)
    assert ((data.influence < influence.threshold).float().mean() - 0.5).abs() < 0.1
    linear = fit_linear_router(data, 0.5, adapter)
    x = data.features
    logits = torch.stack([linear.logit(l, x[:, i]) for i, l in enumerate(data.layers)], 1)
    assert ((logits > 0).float().mean() - 0.5).abs() < 0.1
    cheap = data.cost <= data.cost.median()
    assert ((logits > 0) == cheap).float().mean() > 0.75  # it learned the costs it was shown
    with pytest.raises(ValueError, match="fraction"):
        fit_linear_router(data, 1.0, adapter)
