"""Compiled decoding (splice.compile_decode): every intervention family compiles in one graph over a
static cache and gives the tokens of eager generation; slot changes recompile nothing; what cannot
compile is refused by name, and runs eagerly only when asked."""

import pytest
import torch
from tiny_models import HIDDEN, LAYERS, greedy, left_padded_batch, tiny_model

import splice
from splice.hybrid.head_map import HeadMap
from splice.hybrid.reuse_policy import ReusePolicy
from splice.quant.apply import quantize_model
from splice.quant.plan import QuantPlan
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.skipping.routers import InfluenceRouter

NEW = 6


def vec(seed: int, size: int = HIDDEN, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * scale


CONFIGS = {
    "unpatched": lambda m: None,
    "steer": lambda m: splice.patch(m, splice.Steer(vec(1), layers=[0, 2], scale=2.0)),
    "heads_site": lambda m: splice.patch(m, splice.Steer(vec(3, 16), layers=[1], site="heads", head=1, scale=2.0)),
    "maps_and_gates": lambda m: splice.patch(
        m, splice.LowRank(A={1: vec(4, HIDDEN * 2).view(HIDDEN, 2) / 8}, B={1: vec(5, HIDDEN * 2).view(HIDDEN, 2) / 8}),
        splice.Steer(vec(6), layers=[2], gate=splice.TokenGate(vec(8, scale=1.0), threshold=0.0, temperature=0.1))),
    "skip": lambda m: splice.patch(m, splice.Skip([1]), splice.Skip([0], "attn")),
    "hybrid": lambda m: splice.patch(m, heads=HeadMap(LAYERS, 2, {0: {0}, 2: {1}}, sinks=1, window=3)),
    "reuse": lambda m: splice.patch(m, reuse=ReusePolicy(LAYERS, (0,), 3)),
    "condition": lambda m: splice.patch(
        m, splice.Steer(vec(2), layers=[1, 2], gate=splice.Condition(vec(7, scale=1.0), 0, 0.0, "above"))),
}


def prepared(config: str, quantized: bool):
    model = tiny_model("llama")
    if quantized:
        quantize_model(model, QuantPlan.uniform(model, 4))
    return model, CONFIGS[config](model)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_graph_and_the_eager_tokens(config, quantized):
    """fullgraph=True: a graph break anywhere (splice's code included) fails the test. The eager
    backend traces exactly what Inductor would compile, in a fraction of the time."""
    model, patch = prepared(config, quantized)
    ids, mask = left_padded_batch()
    want = greedy(model, ids, mask, NEW)
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert decoder.last_compiled
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if patch is not None:
        assert not getattr(model, ATTRIBUTE).driven


@pytest.mark.parametrize("config", ["steer", "hybrid"])
def test_inductor_gives_the_eager_tokens(config):
    model, _ = prepared(config, quantized=True)
    ids, mask = left_padded_batch()
    want = greedy(model, ids, mask, NEW)
    decoder = splice.compile_decode(model, max_cache_len=24)
    got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_slot_changes_recompile_nothing():
    """After the first generation compiles, new vectors and scales in a slot, and new row-to-slot
    assignments, write buffers only: a recompile would raise. Each generation equals eager."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    p = splice.patch(model, max_slots=4)
    p.set_slot(1, [splice.Steer(vec(1), layers=[1, 2], scale=2.0, name="a")])
    p.set_slot(2, [splice.Steer(vec(2), layers=[1, 2], scale=1.0, name="b")])
    p.assign([1, 2, 0])
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    first = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    outputs = [first]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for slots, scale in (([2, 1, 1], 2.0), ([0, 0, 2], -3.0), ([1, 1, 1], 0.5)):
            p.set_slot(2, [splice.Steer(vec(3), layers=[1, 2], scale=scale, name=f"c{scale}")])
            p.assign(slots)
            got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
            torch.testing.assert_close(got, greedy(model, ids, mask, NEW), rtol=0, atol=0)
            outputs.append(got)
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == len(outputs)  # every change changed tokens


def test_a_changed_model_runs_its_own_graph_on_every_step():
    """Only a generation's first decode step checks all of Dynamo's guards; its later steps run an
    unguarded twin of the graph that step ran. Switching a traced Python constant (every attention's
    scaling) back and forth must still give each setting's eager tokens."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    attentions = [layer.self_attn for layer in model.model.layers]
    default = attentions[0].scaling
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    outputs = []
    for scaling in (default, 8.0, default, 8.0):
        for attention in attentions:
            attention.scaling = scaling
        got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
        torch.testing.assert_close(got, greedy(model, ids, mask, NEW), rtol=0, atol=0)
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1])


def test_eos_pads_the_finished_rows_like_generate():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    eos = int(greedy(model, ids, mask, NEW)[0, ids.shape[1] + 1])  # row 0's second new token
    with torch.inference_mode():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    got = splice.compile_decode(model, max_cache_len=24, backend="eager").generate(
        ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[0, ids.shape[1] + 2:] == 0).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")

    def sample(seed, **kw):
        return decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], temperature=1.5,
                                generator=torch.Generator().manual_seed(seed), **kw)

    torch.testing.assert_close(sample(0), sample(0), rtol=0, atol=0)
    assert not torch.equal(sample(0), sample(1))
    torch.testing.assert_close(sample(3, top_k=1), greedy(model, ids, mask, NEW), rtol=0, atol=0)


def routed_model():
    model = tiny_model("llama")
    router = InfluenceRouter([1, 2], LAYERS, HIDDEN, threshold=0.5)
    return model, splice.patch(model, router=router)


def test_routing_is_refused_by_name_unless_falling_back():
    model, _ = routed_model()
    with pytest.raises(splice.CompileError, match="per-request routing"):
        splice.compile_decode(model, max_cache_len=24, backend="eager")
    ids, mask = left_padded_batch()
    decoder = splice.compile_decode(model, max_cache_len=24, fallback=True, backend="eager")
    got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert not decoder.last_compiled
    torch.testing.assert_close(got, greedy(model, ids, mask, NEW), rtol=0, atol=0)


def _break_graph_in_mlp(model):
    mlp = model.model.layers[1].mlp
    original = mlp.forward

    def forward(x):
        torch._dynamo.graph_break()
        return original(x)

    mlp.forward = forward


def test_a_graph_break_is_an_error_and_changes_nothing():
    model = tiny_model("llama")
    p = splice.patch(model, splice.Steer(vec(1), layers=[2], scale=2.0))
    _break_graph_in_mlp(model)
    ids, mask = left_padded_batch()
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    with pytest.raises(splice.CompileError, match="fallback=False"):
        decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert not p.runtime.driven
    torch.testing.assert_close(greedy(model, ids, mask, NEW), greedy(model, ids, mask, NEW), rtol=0, atol=0)


def test_fallback_decodes_eagerly_after_a_compile_failure():
    model = tiny_model("llama")
    _break_graph_in_mlp(model)
    ids, mask = left_padded_batch()
    decoder = splice.compile_decode(model, max_cache_len=24, fallback=True, backend="eager")
    with pytest.warns(UserWarning, match="decoding eagerly"):
        got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert decoder.failed and not decoder.last_compiled
    torch.testing.assert_close(got, greedy(model, ids, mask, NEW), rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda d, ids, mask: d.generate(ids, mask, max_new_tokens=30), "max_cache_len"),
    (lambda d, ids, mask: d.generate(ids, mask, max_new_tokens=0), "max_new_tokens"),
    (lambda d, ids, mask: d.generate(ids, mask[:, 1:], max_new_tokens=2), "attention_mask"),
    (lambda d, ids, mask: d.generate(ids.float(), mask, max_new_tokens=2), "input_ids"),
    (lambda d, ids, mask: d.generate(ids, mask, max_new_tokens=2, temperature=-1.0), "temperature"),
    (lambda d, ids, mask: d.generate(ids, mask, max_new_tokens=2, temperature=1.0, top_k=0), "top_k"),
])
def test_bad_generation_arguments(call, message):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match=message):
        call(splice.compile_decode(model, max_cache_len=24, backend="eager"), ids, mask)


def test_bad_cache_length():
    with pytest.raises(ValueError, match="max_cache_len"):
        splice.compile_decode(tiny_model("llama"), max_cache_len=1)


def test_compile_options_keep_the_callers_choices():
    """The unguarded twin compiles with the caller's options plus a guard filter: a mode becomes its
    Inductor options (torch.compile takes one or the other), the caller's own options win, and
    another backend's mode is passed on as it is."""
    from torch._inductor import list_mode_options

    from splice.decoding.compiled_decode import _with_options

    got = _with_options({"mode": "max-autotune", "dynamic": False}, guard_filter_fn=len)
    assert got == {"dynamic": False, "options": {"guard_filter_fn": len, **list_mode_options("max-autotune", False)}}
    assert _with_options({"options": {"guard_filter_fn": max}}, guard_filter_fn=len) == {"options": {"guard_filter_fn": max}}
    assert _with_options({"backend": "eager", "mode": "x"}, guard_filter_fn=len) == {"backend": "eager", "mode": "x"}
