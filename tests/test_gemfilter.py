"""GemFilter: the scores against a hand computation from the model's own modules, the selection
rule, generation on the kept tokens (batched, left-padded, patched), bad input, the bench and the
layer search on the real model."""

import pytest
import torch
from tiny_models import LAYERS, FoldedTokenizer, left_padded_batch, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import splice
from splice.bench import gemfilter as gemfilter_bench
from splice.bench import gemfilter_report
from splice.longcontext.gemfilter import kept_tokens, prompt_positions, select, token_scores
from splice.tools.gemfilter_layer import choose_layer, key_runs
from splice.tools.passkey import passkey_accuracy, passkey_prompt, question_tokens


def expected_scores(model, ids, mask, layer):
    """s_j from the model's hidden states and its own projections, norms and rotary embedding."""
    with torch.inference_mode():
        pos = prompt_positions(mask)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        block = model.model.layers[layer]
        h = block.input_layernorm(hidden[layer])
        cos, sin = model.model.rotary_emb(h, pos)
        b, n, _ = h.shape
        cfg = model.config
        q = block.self_attn.q_proj(h).view(b, n, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = block.self_attn.k_proj(h).view(b, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k = k.repeat_interleave(group, dim=1)
        return (q[:, :, -1:] * k).sum(-1).sum(1) * mask


@pytest.mark.parametrize("layer", range(LAYERS))
def test_scores_are_the_last_query_dot_products_summed_over_heads(layer):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((9, 5, 7))
    got = token_scores(model, ids, mask, [layer])[layer]
    torch.testing.assert_close(got, expected_scores(model, ids, mask, layer), rtol=1e-4, atol=1e-5)
    assert torch.equal(got[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_selection_pass_stops_at_the_selection_layer():
    model = tiny_model("llama")
    calls = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
    ids, mask = left_padded_batch((6, 4))
    token_scores(model, ids, mask, [1])
    assert calls == [0, 1]
    assert all(not block.self_attn._forward_pre_hooks for block in model.model.layers)


def test_kept_tokens_take_the_top_scores_the_tail_and_no_pads():
    scores = torch.tensor([[0.0, 1.0, 5.0, 2.0, 8.0, 3.0, 0.5], [0.0, 0.0, 0.0, 4.0, 1.0, 9.0, 2.0]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    kept = kept_tokens(scores, mask, splice.GemFilter(layer=0, keep=3, tail=1, pool=1))
    assert [k.tolist() for k in kept] == [[2, 4, 6], [3, 5, 6]]
    short = kept_tokens(scores, mask, splice.GemFilter(layer=0, keep=6, tail=0, pool=1))
    assert [k.tolist() for k in short] == [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6]]  # a 4-token row keeps all 4
    # pooling (kernel 3, zero padding) spreads a peak to its neighbours: row 0's pooled scores are
    # [1/3, 2, 8/3, 5, 13/3, 23/6, 7/6]
    pooled = kept_tokens(scores[:1], mask[:1], splice.GemFilter(layer=0, keep=2, pool=3))
    assert pooled[0].tolist() == [3, 4]


def test_generation_on_every_token_kept_is_plain_generation():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((9, 5, 7))
    spec = splice.GemFilter(layer=1, keep=9)
    got = splice.gemfilter_generate(model, ids, mask, gemfilter=spec, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
def test_batched_generation_continues_each_row_on_its_own_kept_tokens(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch((12, 6, 9))
    spec = splice.GemFilter(layer=1, keep=5, tail=2)
    chosen = select(model, ids, mask, spec)
    got = splice.gemfilter_generate(model, ids, mask, gemfilter=spec, max_new_tokens=4, do_sample=False,
                                    pad_token_id=0)
    assert got.shape == (3, 12 + 4) and torch.equal(got[:, :12], ids)
    for b, kept in enumerate(chosen.kept):
        assert len(kept) == 5 and kept[-2:].tolist() == [10, 11] and bool(mask[b, kept].all())
        alone = ids[b, kept][None]
        with torch.inference_mode():
            expected = model.generate(input_ids=alone, attention_mask=torch.ones_like(alone), max_new_tokens=4,
                                      do_sample=False, pad_token_id=0)
        assert torch.equal(got[b, 12:], expected[0, 5:]), b


def test_generation_composes_with_a_steering_patch():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((10, 8))
    spec = splice.GemFilter(layer=1, keep=6, tail=1)
    chosen = select(model, ids, mask, spec)
    vector = {layer: torch.randn(64, generator=torch.Generator().manual_seed(layer)) for layer in range(LAYERS)}
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with splice.patch(model, splice.Steer(vector, scale=4.0)):
        got = splice.gemfilter_generate(model, ids, mask, gemfilter=spec, **kwargs)
        with torch.inference_mode():
            expected = model.generate(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask, **kwargs)
    with torch.inference_mode():
        unsteered = model.generate(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask, **kwargs)
    assert torch.equal(got[:, 10:], expected[:, 6:]) and not torch.equal(expected, unsteered)


@pytest.mark.parametrize("make,message", [
    (lambda: splice.GemFilter(layer=1, keep=4, tail=5), "fewer than the prompt's last turn"),
    (lambda: splice.GemFilter(layer=1, keep=0), "at least one token"),
    (lambda: splice.GemFilter(layer=1, keep=4, pool=4), "odd kernel"),
    (lambda: splice.GemFilter(layer=1, keep=4, tail=-1), "tail must be >= 0"),
])
def test_bad_filters_are_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("case,message", [
    ("layer", "out of range"), ("right padded", "left-padded"), ("empty row", "at least one token"),
    ("shape", r"\[batch, tokens\]")])
def test_bad_calls_raise_before_the_model_runs(case, message):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((6, 4))
    spec = splice.GemFilter(layer=LAYERS if case == "layer" else 1, keep=3)
    if case == "right padded":
        mask = mask.flip(1)
    if case == "empty row":
        mask[1] = 0
    if case == "shape":
        mask = mask[:, 1:]
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        splice.gemfilter_generate(model, ids, mask, gemfilter=spec, max_new_tokens=2, pad_token_id=0)
    assert not calls and all(not block.self_attn._forward_pre_hooks for block in model.model.layers)


def test_bench_report_times_both_settings_and_its_ratios_follow_its_rows(real_model):
    model = tiny_model("llama")
    report = gemfilter_bench.run(model, FoldedTokenizer(real_model[1]), contexts=(96, 160), samples=2, keep=48,
                                 layer=1, steps=2, repeats=2, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "gemfilter"] and report["layer"] == 1 and report["layer_kept_share"] is None
    full, gem = rows["full"]["b1"], rows["gemfilter"]["b1"]
    assert len(full["prefill_runs"]) == 2 and len(gem["decode_runs"]) == 2
    assert gem["kv_bytes"] < full["kv_bytes"]  # the cache holds the kept tokens only
    ratios = report["ratios"]
    assert ratios["gemfilter_kv_bytes"] == gem["kv_bytes"] / full["kv_bytes"]
    assert ratios["gemfilter_prefill_speedup"] == full["prefill_s"] / gem["prefill_s"]
    assert "| gemfilter |" in gemfilter_report.table(report)


def test_on_the_real_model_the_chosen_layer_keeps_the_key_and_the_answer(real_model):
    model, tok = real_model
    tail = question_tokens(tok)
    calibration = [passkey_prompt(tok, 1536, 0.5, seed=700)]
    choice = choose_layer(model, tok, calibration, keep=256, tail=tail)
    assert choice.layer is not None and choice.kept_share[choice.layer] == 1.0
    assert len(key_runs(tok, calibration[0])) == 2  # the needle names the key twice
    spec = splice.GemFilter(layer=choice.layer, keep=256, tail=tail)
    tasks = [passkey_prompt(tok, 1536, depth, seed=710 + i) for i, depth in enumerate((0.2, 0.8))]

    def filtered(m, ids, mask, **kwargs):
        return splice.gemfilter_generate(m, ids, mask, gemfilter=spec, **kwargs)

    assert passkey_accuracy(model, tok, tasks, filtered) == 1.0
    # the first layer alone does not find the key: the choice matters
    assert choice.kept_share[0] < 1.0
