"""Hybrid attention on tiny models: full heads plus sink+window streaming heads."""

import pytest
import torch
from tiny_models import HIDDEN, LAYERS, left_padded_batch, tiny_model

import splice
from splice.adapters.architecture import Adapter
from splice.hybrid.head_map import HeadMap
from splice.runtime.kv_cache import kv_bytes
from splice.runtime.splice_runtime import ATTRIBUTE

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3-windowed"]
KV_HEADS = 2
# Gemma 3 with its own sliding window short enough to matter: layers 0 and 2 attend to 4 tokens, layer 1 to all
GEMMA3_WINDOWED = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


def hybrid_model(family):
    """A tiny model of ``family``; Gemma 2 soft-caps its attention logits hard enough to matter at these
    sizes (a cap of 0.5 on scores scaled by 1, where the real model's cap of 50 on scores scaled by
    256^-0.5 is nearly the identity on tiny random weights: logits move by 0.3 instead of 3e-4) and runs
    Hugging Face's eager attention, the implementation that applies the cap."""
    if family == "gemma2":
        return tiny_model(family, attn_logit_softcapping=0.5, query_pre_attn_scalar=1, attn_implementation="eager")
    if family == "gemma3-windowed":
        return tiny_model("gemma3", **GEMMA3_WINDOWED)
    return tiny_model(family)


def head_map(full=None, sinks=1, window=3, kind="stream"):
    full = {0: {0}, 2: {1}} if full is None else full
    return HeadMap(LAYERS, KV_HEADS, full, sinks=sinks, window=window, kind=kind)


def logits(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def greedy_no_cache(model, ids, mask, n):
    """Greedy tokens recomputing everything each step, with ``generate``'s positions (left padding
    does not shift them: sinks are each row's first real tokens)."""
    with torch.inference_mode():
        for _ in range(n):
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_a_window_covering_the_context_equals_full_attention(family):
    """Every head streams, through a window longer than the context: the model's own attention, also
    on Gemma 3's sliding layers, whose window caps the streaming one (no sinks here: sinks would let a
    sliding layer see tokens it never sees)."""
    model = hybrid_model(family)
    ids, mask = left_padded_batch()
    real = mask.bool()  # what padding queries read is arbitrary (eager attention: every key; SDPA: none)
    expected = logits(model, ids, mask)[real]
    with splice.patch(model, heads=head_map(full={}, sinks=0, window=200, kind="window")):
        torch.testing.assert_close(logits(model, ids, mask)[real], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_heads_change_the_output_when_the_window_is_short(family):
    model = hybrid_model(family)
    ids, mask = left_padded_batch()
    expected = logits(model, ids, mask)
    with splice.patch(model, heads=head_map(window=2)):
        assert not torch.allclose(logits(model, ids, mask)[:, -1], expected[:, -1], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3-windowed"])
@pytest.mark.parametrize("kind, sinks", [("stream", 1), ("stream", 2), ("window", 0)])
def test_cached_generation_equals_masked_full_attention(family, kind, sinks):
    """The compressed cache (sinks + ring, wrapping many times) gives the tokens that recomputing
    everything with the masked full attention gives."""
    model = hybrid_model(family)
    ids, mask = left_padded_batch(lengths=(7, 4, 5))
    with splice.patch(model, heads=head_map(sinks=sinks, window=3, kind=kind)) as p, torch.inference_mode():
        assert p.backends()["band_attention"] == p.backends()["decode_attention"] == "cpp"
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(cached, greedy_no_cache(model, ids, mask, 10))


def test_streaming_heads_hold_fixed_memory():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=True).past_key_values
        with splice.patch(model, heads=head_map(full={0: {0}}, sinks=1, window=4)):
            hybrid = model(input_ids=ids, use_cache=True).past_key_values
    assert [layer.keys.shape[1] for layer in hybrid.layers] == [1, 1, 1] and hybrid.layers[1].keys.stride(-2) == 0
    # layer 0 keeps one full head (half of a full layer); the 5 streaming heads keep 1 + 4 + 1 slots each
    slot_bytes = 2 * 2 * 16 * 4  # batch 2, head_dim 16, fp32, keys and values
    assert kv_bytes(full) == 3 * 2 * 60 * slot_bytes
    assert kv_bytes(hybrid) < 60 * slot_bytes + 5 * 6 * slot_bytes + 2000


def test_composes_with_steering_and_skipping():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0)) * 4
    with splice.patch(model, heads=head_map(window=2)):
        hybrid = logits(model, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=[1], scale=1.0), splice.Skip([2], "mlp"),
                      heads=head_map(window=2)), torch.inference_mode():
        both = logits(model, ids, mask)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, greedy_no_cache(model, ids, mask, 4))
    assert not torch.allclose(both, hybrid, atol=1e-3)


def test_remove_restores_the_attention_modules():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    with splice.patch(model, heads=head_map(window=2)):
        assert all("forward" in vars(layer.self_attn) for layer in model.model.layers)
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)
    assert torch.equal(logits(model, ids, mask), before)


def test_head_maps_from_scores_and_files(tmp_path):
    scores = [[0.9, 0.1], [0.2, 0.8], [0.3, 0.4]]
    m = HeadMap.from_scores(scores, 0.5, sinks=2, window=8)
    assert m.full == {0: frozenset({0}), 1: frozenset({1}), 2: frozenset({1})}
    assert m.full_fraction == 0.5
    loaded = HeadMap.load(m.save(tmp_path / "heads.json"))
    assert loaded.full == m.full and (loaded.sinks, loaded.window, loaded.scores) == (2, 8, scores)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a splice head map"):
        HeadMap.load(tmp_path / "bad.json")


@pytest.mark.parametrize("make, message", [
    (lambda: HeadMap(LAYERS + 1, KV_HEADS, {}), "30|layers"),
    (lambda: HeadMap(LAYERS, KV_HEADS, {}, window=300), "exceeds the model's context"),
    (lambda: HeadMap(LAYERS, KV_HEADS, {}, sinks=0), "at least one attention sink"),
    (lambda: HeadMap(LAYERS, KV_HEADS, {0: {2}}), "out of range"),
    (lambda: HeadMap(LAYERS, KV_HEADS, {5: {0}}), "out of range"),
])
def test_bad_head_maps_fail_before_touching_the_model(make, message):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    with pytest.raises(ValueError, match=message):
        splice.patch(model, heads=make())
    assert not hasattr(model, ATTRIBUTE)
    assert torch.equal(logits(model, ids, mask), before)


def test_gemma2_soft_capping_is_computed_not_dropped():
    """Every head through splice's forward (a window covering the context) gives Gemma 2's eager,
    soft-capped logits, prefill and cached decode alike; the same forward with the cap taken out does not."""
    model = hybrid_model("gemma2")
    ids, mask = left_padded_batch()
    real = mask.bool()
    expected, tokens = logits(model, ids, mask)[real], greedy_no_cache(model, ids, mask, 6)
    covering = head_map(full={}, sinks=0, window=200, kind="window")
    with splice.patch(model, heads=covering), torch.inference_mode():
        torch.testing.assert_close(logits(model, ids, mask)[real], expected, atol=2e-5, rtol=0)
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(cached, tokens)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with splice.patch(model, heads=covering):
        assert not torch.allclose(logits(model, ids, mask)[real], expected, atol=1e-3)


def test_a_streaming_window_is_capped_by_the_layer_s_own():
    from splice.runtime.hybrid_attention import model_window, streaming_window

    model = hybrid_model("gemma3-windowed")
    adapter = Adapter(model)
    windows = [model_window(adapter, layer.self_attn) for layer in adapter.layers]
    assert windows == [4, 0, 4]  # the global layer's attention says None: the config's 4 is not its window
    assert [streaming_window(3, w) for w in windows] == [3, 3, 3]
    assert [streaming_window(9, w) for w in windows] == [4, 9, 4]


def test_head_scores_rank_heads_by_what_streaming_costs():
    from splice.tools.head_profile import head_scores

    model = tiny_model("llama")
    seqs = [(torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(s)), 8) for s in range(2)]
    scores = head_scores(model, seqs, sinks=1, window=4, progress=False)
    assert len(scores) == LAYERS and all(len(row) == KV_HEADS for row in scores)
    assert all(s > 0 for row in scores for s in row)
    covering = head_scores(model, seqs, sinks=1, window=64, progress=False)  # the window sees everything
    assert max(s for row in covering for s in row) < 1e-6
    assert HeadMap.from_scores(scores, 0.5).full_fraction == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_deltas_equal_the_change_streaming_one_head_makes(family):
    """Each delta score is what patching that head alone to stream does to its layer's attention
    output, relative to the residual entering the layer, averaged over the queries past the window."""
    from splice.tools.head_profile import streaming_deltas

    model = hybrid_model(family)
    seqs = [torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    scores = streaming_deltas(model, seqs, sinks=1, window=4, stride=1, progress=False)
    assert len(scores) == LAYERS and all(len(row) == KV_HEADS for row in scores)
    layer, head = 1, 0
    captured = {}
    block = model.model.layers[layer]
    # what the residual stream receives: the attention output, through the post-attention norm on Gemma
    received = block.post_attention_layernorm if Adapter(model).family.sandwich else torch.nn.Identity()
    hooks = [block.register_forward_pre_hook(lambda m, a, k: captured.__setitem__("x", (a or [k["hidden_states"]])[0]),
                                             with_kwargs=True),
             block.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", received(out[0])))]
    full = {l: set(range(KV_HEADS)) for l in range(LAYERS)}
    full[layer] = full[layer] - {head}
    moved = []
    for ids in seqs:
        logits(model, ids, torch.ones_like(ids))
        reference = captured["attn"]
        with splice.patch(model, heads=HeadMap(LAYERS, KV_HEADS, full, sinks=1, window=4)):
            logits(model, ids, torch.ones_like(ids))
        change = (captured["attn"] - reference).norm(dim=-1) / captured["x"].norm(dim=-1)
        moved.append(change[0, 5:].mean())
    for hook in hooks:
        hook.remove()
    assert scores[layer][head] == pytest.approx(float(torch.stack(moved).mean()), rel=1e-4)
    assert all(s > 0 for row in scores for s in row)


def test_streaming_deltas_refuse_short_sequences():
    from splice.tools.head_profile import streaming_deltas

    with pytest.raises(ValueError, match="never reach past sinks"):
        streaming_deltas(tiny_model("llama"), [torch.arange(3, 8)[None]], sinks=1, window=4, progress=False)



def test_interleave_takes_the_top_heads_of_every_score_table_in_turn():
    from splice.tools.head_profile import interleave

    a, b = [[3.0, 2.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 3.0]]
    assert interleave(a, b) == [[4.0, 2.0], [1.0, 3.0]]
    assert HeadMap.from_scores(interleave(a, b), 0.5).full == {0: {0}, 1: {1}}
    assert interleave(a, a) == [[4.0, 3.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="different shapes"):
        interleave(a, [[1.0, 2.0, 3.0]])


@pytest.mark.real_model
def test_passkey_prompts_hide_the_key_at_the_asked_depth():
    from transformers import AutoTokenizer

    from splice.models.loader import default_model_dir
    from splice.tools.passkey import passkey_set

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    tasks = passkey_set(tokenizer, 300, 3)
    assert [round(t.depth, 2) for t in tasks] == [0.1, 0.5, 0.9]
    for task in tasks:
        text = tokenizer.decode(task.ids[0])
        assert task.answer in text and abs(task.ids.shape[1] - 300) < 40
        assert text.index(task.answer) / len(text) == pytest.approx(task.depth, abs=0.15)


def test_hybrid_steering_skipping_and_quantization_in_one_patch():
    """A quantized model patched with hybrid heads, a steering vector and a skipped MLP at once gives
    the tokens and logits of the same patch on its dense equivalent (weights = the dequantized codes)."""
    import copy

    from splice.quant.apply import quantize_model, set_module
    from splice.quant.linear import QuantLinear
    from splice.quant.plan import QuantPlan

    quantized = tiny_model("llama")
    quantize_model(quantized, QuantPlan.uniform(quantized, 4, group_size=32))
    dense = copy.deepcopy(quantized)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            linear.weight.data = m.dequantize()
            set_module(dense, name, linear)
    ids, mask = left_padded_batch()
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    items = (splice.Steer(vector, layers=[1], scale=2.0), splice.Skip([2], "mlp"))
    results = []
    for model in (quantized, dense):
        with splice.patch(model, *items, heads=head_map(window=4)), torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    torch.testing.assert_close(torch.stack(results[0].logits), torch.stack(results[1].logits), atol=1e-4, rtol=1e-4)


@pytest.mark.real_model
def test_profile_heads_cli_writes_a_scored_map_for_the_default_model(tmp_path):
    from splice.cli import main

    path = tmp_path / "heads.json"
    assert main(["profile", "heads", "--json", str(path), "--context", "320", "200", "--window", "64", "--passkeys", "1",
                 "--windows", "1", "--full-fraction", "0.25"]) == 0
    head_map = HeadMap.load(path)
    assert (head_map.num_layers, head_map.num_kv_heads, head_map.window) == (30, 3, 64)
    assert round(head_map.full_fraction * 90) == 22 and path.with_suffix(".png").stat().st_size > 0
    ranked = sorted(s for row in head_map.scores for s in row)
    chosen = [head_map.scores[l][h] for l in range(30) for h in head_map.full_heads(l)]
    assert min(chosen) >= ranked[-22] and ranked[-1] > ranked[0] >= 0
