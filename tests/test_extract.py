"""splice.vectors.extract on a tiny random Llama with an in-code word-level tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from splice.vectors.extract import builtin_pairs, extract_vectors, load_pairs

N_LAYERS = 3
POS = ["the cat is happy", "a very good day", "i love it", "so glad and happy we are here now"]
NEG = ["the cat is sad today", "bad", "i hate it so much", "so sad"]
WORDS = sorted({w for p in POS + NEG for w in p.split()})


def make_tokenizer(pad=True, padding_side="right"):
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   padding_side=padding_side, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Intra-op threads only add sync cost for these tiny models (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def residuals(model):
    """{prompt: [L + 1, T, H]} unpadded: embeddings, then each decoder layer's raw output."""
    tok, got = make_tokenizer(), {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: got.update(last=o))
    table = {}
    with torch.no_grad():
        for prompt in POS + NEG:
            out = model(tok(prompt, return_tensors="pt")["input_ids"], output_hidden_states=True)
            table[prompt] = torch.stack([*out.hidden_states[:-1], got["last"]])[:, 0]
    hook.remove()
    return table


def pair_diffs(residuals, index, position="last"):
    """[pairs, H] differences of ``residuals[prompt][index]`` at the last token or token mean."""
    def read(prompt):
        r = residuals[prompt][index]
        return r[-1] if position == "last" else r.mean(0)
    return torch.stack([read(p) - read(n) for p, n in zip(POS, NEG)])


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_diff_matches_unpadded_runs(model, residuals, padding_side, position):
    tok = make_tokenizer(padding_side=padding_side)
    vs = extract_vectors(model, tok, POS, NEG, batch_size=3, position=position, progress=False)
    assert vs.layers == list(range(N_LAYERS)) and vs.hidden_size == 64
    assert (vs.site, vs.method) == ("out", "mean_diff")
    assert vs.metadata == {"n_pairs": "4", "position": position}
    for layer in range(N_LAYERS):
        want = pair_diffs(residuals, layer + 1, position).mean(0)
        torch.testing.assert_close(vs[layer], want, atol=1e-5, rtol=1e-4)


def test_last_layer_out_is_raw_residual_not_final_norm(model, residuals):
    tok = make_tokenizer()
    vs = extract_vectors(model, tok, POS, NEG, layers=[N_LAYERS - 1], progress=False)
    with torch.no_grad():
        normed = [model(tok(p, return_tensors="pt")["input_ids"], output_hidden_states=True)
                  .hidden_states[-1][0, -1] for p in POS + NEG]
    normed_diff = (torch.stack(normed[:4]) - torch.stack(normed[4:])).mean(0)
    assert not torch.allclose(vs[N_LAYERS - 1], normed_diff, atol=1e-3)
    torch.testing.assert_close(vs[N_LAYERS - 1], pair_diffs(residuals, N_LAYERS).mean(0),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_absolute_positions_and_other_layer_layout(position):
    """GPT-2 (learned absolute positions, layers at ``transformer.h``): padding keeps positions."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300,
                                      n_positions=32)).eval()
    runs = [extract_vectors(gpt2, make_tokenizer(padding_side=side), POS, NEG, batch_size=b,
                            position=position, progress=False)
            for side, b in [("right", 1), ("right", 8), ("left", 8)]]
    assert runs[0].layers == [0, 1]
    for other in runs[1:]:
        for layer in (0, 1):
            torch.testing.assert_close(other[layer], runs[0][layer], atol=1e-5, rtol=1e-4)


def test_batch_size_one_needs_no_pad_token(model, residuals):
    vs = extract_vectors(model, make_tokenizer(pad=False), POS, NEG, layers=[1], batch_size=1,
                         progress=False)
    torch.testing.assert_close(vs[1], pair_diffs(residuals, 2).mean(0), atol=1e-5, rtol=1e-4)


def test_site_in_is_out_of_previous_layer(model, residuals):
    tok = make_tokenizer(padding_side="left")
    out = extract_vectors(model, tok, POS, NEG, site="out", progress=False)
    inp = extract_vectors(model, tok, POS, NEG, site="in", progress=False)
    assert inp.site == "in"
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(inp[layer + 1], out[layer])
    torch.testing.assert_close(inp[0], pair_diffs(residuals, 0).mean(0), atol=1e-6, rtol=1e-5)


def test_pca_sign_norm_and_direction(model, residuals):
    tok = make_tokenizer()
    mean = extract_vectors(model, tok, POS, NEG, layers=[1, 0], progress=False)
    pca = extract_vectors(model, tok, POS, NEG, method="pca", layers=[0, 1], progress=False)
    assert pca.layers == [0, 1] and pca.method == "pca"
    for layer in pca.layers:
        v, m = pca[layer], mean[layer]
        assert torch.dot(v, m) > 0
        torch.testing.assert_close(v.norm(), m.norm())
        u = torch.linalg.svd(pair_diffs(residuals, layer + 1), full_matrices=False).Vh[0]
        assert torch.cosine_similarity(v, u, dim=0).abs() > 1 - 1e-4


def test_eval_mode_and_model_name(model):
    model.train()
    try:
        vs = extract_vectors(model, make_tokenizer(), POS[:2], NEG[:2], progress=True)
        assert model.training
    finally:
        model.eval()
    assert vs.model is None  # a model built from a config has no name
    assert vs.arch == "llama"  # llama.cpp's name for the family, the control-vector model hint


@pytest.mark.parametrize("kind", ["hub id", "local dir"])
def test_model_name_is_never_a_local_path(model, tmp_path, kind):
    name = "HuggingFaceTB/tiny-llama"
    if kind == "local dir":
        name = str(tmp_path / "models" / "tiny-llama")
        Path(name).mkdir(parents=True)
    model.config._name_or_path = name
    try:
        vs = extract_vectors(model, make_tokenizer(), POS[:1], NEG[:1], layers=[0], progress=False)
    finally:
        model.config._name_or_path = ""
    assert vs.model == ("tiny-llama" if kind == "local dir" else name)


@pytest.mark.parametrize("kwargs, error", [
    ({"positive": POS, "negative": NEG[:3]}, "equal length"),
    ({"positive": [], "negative": []}, "non-empty"),
    ({"positive": "happy", "negative": "sadly"}, "sequence of strings"),
    ({"layers": [N_LAYERS]}, "layers must be"),
    ({"layers": [-1]}, "layers must be"),
    ({"layers": [True]}, "layers must be"),
    ({"layers": []}, "layers must be"),
    ({"method": "pca", "positive": POS[:1], "negative": NEG[:1]}, "at least 2 pairs"),
    ({"method": "median"}, "unknown method"),
    ({"site": "attn"}, "supports sites"),
    ({"position": "first"}, "unknown position"),
    ({"batch_size": 0}, "batch_size"),
    ({"tokenizer": make_tokenizer(pad=False)}, "no pad token"),
])
def test_bad_inputs_raise_before_running_model(model, kwargs, error):
    def fail(*args, **kw):
        raise AssertionError("the model ran")
    hook = model.register_forward_pre_hook(fail)
    args = {"tokenizer": make_tokenizer(), "positive": POS, "negative": NEG, **kwargs}
    try:
        with pytest.raises((ValueError, TypeError), match=error):
            extract_vectors(model, progress=False, **args)
    finally:
        hook.remove()


def test_load_pairs(tmp_path):
    good = tmp_path / "pairs.json"
    good.write_text(json.dumps([{"positive": "a", "negative": "b"},
                                {"positive": "c", "negative": "d", "note": "extra keys are fine"}]))
    assert load_pairs(good) == (["a", "c"], ["b", "d"])
    for text, error in [("{", "invalid JSON"), ("[]", "non-empty JSON list"),
                        ('{"positive": "a"}', "non-empty JSON list"),
                        ('[{"positive": "a"}]', "item 0"),
                        ('[{"positive": "a", "negative": 1}]', "item 0")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_pairs(bad)


def test_builtin_pairs():
    positive, negative = builtin_pairs("happy_sad")
    assert len(positive) == len(negative) >= 20
    assert all(p and n and p != n for p, n in zip(positive, negative))
    with pytest.raises(ValueError, match="happy_sad"):
        builtin_pairs("angry_calm")
