"""Layer Fused Decoding: fused logits against a hand computation from the model's own modules, the
IKS layer choice, generation (no-op weight, left padding, sampling, select modes, a steering patch),
hooks removed after success and failure, bad input, and the real model on the knowledge conflicts."""

import math

import pytest
import torch
import transformers as T
from tiny_models import LAYERS, left_padded_batch, tiny_model

import splice
from splice.longcontext.layer_fused import candidates, jsd, layer_fused
from splice.tools import lfd_eval
from splice.tools.knowledge_conflict import builtin_facts


def lens(model, hidden):
    return model.lm_head(model.model.norm(hidden))


def hidden_and_ffn_inputs(model, ids, mask):
    """(plain logits, per-layer outputs, per-layer residual entering the FFN) from the HF modules."""
    entering = {}
    handles = [block.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args, i=i: entering.__setitem__(i, args[0].clone())) for i, block in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    outputs = {i: out.hidden_states[i + 1] for i in range(len(model.model.layers) - 1)}
    return out.logits, outputs, entering


def hand_jsd(p_logits, q_logits):
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def six_layer_llama(seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5).add_(1.0)
    return model


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("layer", range(LAYERS - 1))
def test_fused_logits_are_final_plus_weighted_lens_of_the_layer(family, layer):
    model = tiny_model(family)
    ids, mask = left_padded_batch((7, 4, 5))
    plain, outputs, _ = hidden_and_ffn_inputs(model, ids, mask)
    with layer_fused(model, splice.LayerFusedDecoding(layer=layer, weight=0.7)) as fusion, torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).logits
    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.inference_mode():
        if cap:  # Gemma 2 soft-caps the fused logits: cap(raw + 0.7 · lens), raw = the uncapped logits
            expected = cap * torch.tanh((cap * torch.atanh(plain / cap) + 0.7 * lens(model, outputs[layer])) / cap)
        else:
            expected = plain + 0.7 * lens(model, outputs[layer])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert bool((fusion.chosen == layer).all())


def test_jsd_is_the_jensen_shannon_divergence():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g) * 3
    torch.testing.assert_close(jsd(a, b).double(), hand_jsd(a, b), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(jsd(a, b), jsd(b, a))
    assert torch.allclose(jsd(a, a), torch.zeros(5), atol=1e-6)
    assert bool((jsd(a, b) <= math.log(2) + 1e-6).all())


def test_candidates_are_the_latter_half_without_the_last_layer():
    assert candidates(30) == list(range(15, 29))
    assert candidates(6) == [3, 4]
    assert candidates(2) == []


@pytest.mark.parametrize("select", ["step", "prompt"])
def test_auto_fuses_the_lowest_iks_candidate_at_every_position(select):
    model = six_layer_llama()
    ids, mask = left_padded_batch((7, 4, 5))
    plain, outputs, entering = hidden_and_ffn_inputs(model, ids, mask)
    with torch.inference_mode():
        iks = torch.stack([hand_jsd(lens(model, entering[l]), lens(model, outputs[l])) for l in (3, 4)])
        chosen = torch.tensor([3, 4])[iks.argmin(0)]
        fused_hidden = torch.where((chosen == 3)[..., None], outputs[3], outputs[4])
        expected = plain + 1.5 * lens(model, fused_hidden)
    assert 0 < int((chosen == 3).sum()) < chosen.numel(), "the hand check should see both candidates chosen"
    with layer_fused(model, splice.LayerFusedDecoding("auto", weight=1.5, select=select)) as fusion, \
            torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fusion.scores.double(), iks, rtol=1e-3, atol=1e-6)
    assert torch.equal(fusion.chosen, chosen)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silenced", [3, 4])
def test_auto_chooses_the_layer_whose_ffn_adds_nothing(silenced):
    model = six_layer_llama()
    with torch.no_grad():
        model.model.layers[silenced].mlp.down_proj.weight.zero_()
    ids, mask = left_padded_batch((6, 3))
    with layer_fused(model, splice.LayerFusedDecoding("auto")) as fusion, torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert bool((fusion.chosen[real] == silenced).all())
    assert bool((fusion.scores[[3, 4].index(silenced)][real] < 1e-6).all())


@pytest.mark.parametrize("layer", [1, "auto"])
def test_weight_zero_generates_what_plain_generate_does(layer):
    model = six_layer_llama()
    ids, mask = left_padded_batch((7, 4, 5))
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    got = splice.lfd_generate(model, ids, mask, lfd=splice.LayerFusedDecoding(layer, weight=0.0), **greedy)
    assert torch.equal(got, plain)
    sampled = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)
    torch.manual_seed(3)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=mask, **sampled)
    torch.manual_seed(3)
    got = splice.lfd_generate(model, ids, mask, lfd=splice.LayerFusedDecoding(layer, weight=0.0), **sampled)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("spec", [splice.LayerFusedDecoding(2, 1.0), splice.LayerFusedDecoding("auto", 2.0),
                                  splice.LayerFusedDecoding("auto", 2.0, select="prompt")])
def test_left_padded_rows_get_what_they_get_alone(spec):
    model = six_layer_llama()
    ids, mask = left_padded_batch((7, 4, 5))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = splice.lfd_generate(model, ids, mask, lfd=spec, **kwargs)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert not torch.equal(batch, plain), "the fusion should change the greedy continuation"
    for b in range(len(ids)):
        n = int(mask[b].sum())
        alone = splice.lfd_generate(model, ids[b:b + 1, -n:], lfd=spec, **kwargs)
        assert torch.equal(batch[b, 7:], alone[0, n:]), b


def test_select_prompt_keeps_the_prompt_choice_while_step_rechooses():
    model = six_layer_llama(seed=4)
    ids, mask = left_padded_batch((7, 4, 5))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    seen = {}
    for select in ("prompt", "step"):
        per_step = []
        with layer_fused(model, splice.LayerFusedDecoding("auto", 1.0, select=select)) as fusion:
            record = fusion.head.register_forward_hook(
                lambda *a: None if fusion.busy else per_step.append(fusion.chosen[:, -1].clone()))
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            record.remove()
        seen[select] = torch.stack(per_step)
        assert all_hooks(model) == 0
    assert bool((seen["prompt"] == seen["prompt"][0]).all())
    assert torch.equal(seen["prompt"][0], seen["step"][0])
    assert not bool((seen["step"] == seen["step"][0]).all()), "step mode should change layer on some step"


def test_composes_with_a_steering_patch():
    model = six_layer_llama()
    ids, mask = left_padded_batch((7, 4))
    vector = {layer: torch.randn(64, generator=torch.Generator().manual_seed(layer)) for layer in range(6)}
    spec = splice.LayerFusedDecoding(2, 0.8)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with splice.patch(model, splice.Steer(vector, scale=4.0)):
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            expected = out.logits + 0.8 * lens(model, out.hidden_states[3])
        with layer_fused(model, spec), torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            steered = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(splice.lfd_generate(model, ids, mask, lfd=splice.LayerFusedDecoding(2, 0.0), **kwargs),
                           steered)
    with torch.inference_mode():
        unsteered = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(unsteered, out.logits, atol=1e-3)


class Boom(Exception):
    pass


def test_hooks_are_removed_after_success_and_after_an_exception():
    model = six_layer_llama()
    ids, mask = left_padded_batch((7, 4))
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert all_hooks(model) == 0
    splice.lfd_generate(model, ids, mask, lfd=splice.LayerFusedDecoding("auto"), max_new_tokens=3, pad_token_id=0)
    assert all_hooks(model) == 0

    def explode(input_ids, scores):
        raise Boom

    with pytest.raises(Boom):
        splice.lfd_generate(model, ids, mask, lfd=splice.LayerFusedDecoding("auto"), max_new_tokens=3,
                            pad_token_id=0, logits_processor=T.LogitsProcessorList([explode]))
    assert all_hooks(model) == 0
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("make,message", [
    (lambda: splice.LayerFusedDecoding(layer=True), "layer must be a layer index or 'auto'"),
    (lambda: splice.LayerFusedDecoding(layer="middle"), "layer must be a layer index or 'auto'"),
    (lambda: splice.LayerFusedDecoding(weight=-0.5), "weight must be a finite number >= 0"),
    (lambda: splice.LayerFusedDecoding(weight=float("nan")), "weight must be a finite number >= 0"),
    (lambda: splice.LayerFusedDecoding(weight="1"), "weight must be a finite number >= 0"),
    (lambda: splice.LayerFusedDecoding(select="token"), "select must be one of"),
])
def test_bad_specs_are_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("spec,message", [
    (splice.LayerFusedDecoding(layer=5), "layer 5 out of range"),
    (splice.LayerFusedDecoding(layer=6), "layer 6 out of range"),
    (splice.LayerFusedDecoding(layer=-1), "layer -1 out of range"),
    ("auto", "must be a splice.LayerFusedDecoding"),
])
def test_bad_input_raises_before_the_model_runs(spec, message):
    model = six_layer_llama()
    calls = count_forwards(model)
    ids, mask = left_padded_batch((5, 3))
    with pytest.raises(ValueError, match=message):
        splice.lfd_generate(model, ids, mask, lfd=spec, max_new_tokens=2, pad_token_id=0)
    assert calls == [] and all_hooks(model) == 1


def test_right_padding_a_model_without_adapter_and_a_two_layer_auto_are_refused():
    model = six_layer_llama()
    calls = count_forwards(model)
    ids, mask = left_padded_batch((5, 3))
    with pytest.raises(ValueError, match="left-padded"):
        splice.lfd_generate(model, ids.flip(1), mask.flip(1), lfd=splice.LayerFusedDecoding(), max_new_tokens=2)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64)).eval()
    gpt2_calls = count_forwards(gpt2)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        splice.lfd_generate(gpt2, ids, mask, lfd=splice.LayerFusedDecoding(1), max_new_tokens=2)
    two = T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)).eval()
    two_calls = count_forwards(two)
    with pytest.raises(ValueError, match="needs at least 3 layers"):
        splice.lfd_generate(two, ids, mask, lfd=splice.LayerFusedDecoding("auto"), max_new_tokens=2)
    assert calls == gpt2_calls == two_calls == []
    assert all_hooks(model) == all_hooks(gpt2) == all_hooks(two) == 1


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_lfd_loses_the_top1_context_answer(real_model):
    """On SmolLM2-135M the unpatched model already follows the passage (top-1 is the context answer on
    almost every known fact). With LFD (auto, weight 1) the middle layers' logit lens puts punctuation
    and word fragments on top: the top-1 context share collapses and the margin share does not rise."""
    model, tok = real_model
    facts = [f for f in builtin_facts() if f["relation"] == "capital"][:12]
    report = lfd_eval.evaluate(model, tok, [splice.LayerFusedDecoding("auto", 1.0)], facts=facts)
    plain, fused = report["settings"]
    assert report["known"] >= 8
    assert plain["top1_context"] >= 0.9 and plain["follows_context"] >= 0.9
    assert fused["top1_context"] < 0.5 * plain["top1_context"]
    assert fused["follows_context"] <= plain["follows_context"]
    assert set(fused["layers"]) <= set(candidates(30)) and sum(fused["layers"].values()) == report["known"]


def test_rates_count_margins_and_top1_answers():
    from splice.tools.knowledge_conflict import Conflict
    conflicts = [Conflict("a", "m", "c", memory_id=1, context_id=2), Conflict("b", "m", "c", memory_id=3, context_id=0)]
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0], [0.5, 0.0, 0.0, 2.0]])
    got = lfd_eval.rates(logits, conflicts)
    assert got == {"follows_context": 0.5, "top1_context": 0.5, "top1_memory": 0.5, "mean_margin": (4.0 - 1.5) / 2}


def test_cli_parses_layers_and_refuses_a_bad_weight(capsys):
    from splice.cli import main, parser
    args = parser().parse_args(["eval", "lfd", "--layers", "auto", "16", "--weights", "0.5"])
    assert args.layers == ["auto", 16] and args.weights == [0.5]
    with pytest.raises(SystemExit, match="weight must be a finite number >= 0"):
        main(["eval", "lfd", "--weights", "-1"])
