"""The model loader: local directories, the default-model cache, and (marked) the real model."""

import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from splice.models import loader
from splice.models.loader import DEFAULT_MODEL, default_model_dir, load_model

WORDS = ["<unk>", "</s>"] + "the quick brown fox jumps over lazy dog hello world".split()


def _save_tiny(out):
    """A random 2-layer Llama and a word-level tokenizer without a pad token, saved to ``out``."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, _save_tiny(out)


def test_load_local_dir(tiny):
    path, ref = tiny
    model, tok = load_model(path)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "left"
    batch = tok(["hello world", "the quick brown fox"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0] == tok.pad_token_id  # left padding
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)


def test_load_local_dir_as_str_with_dtype(tiny):
    model, _ = load_model(str(tiny[0]), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "no/such/dir", "gpt2"])
def test_unknown_model_names_both_options(name):
    with pytest.raises(ValueError, match=DEFAULT_MODEL) as e:
        load_model(name)
    assert "local Hugging Face model directory" in str(e.value)


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Point SPLICE_CACHE at a temp dir and make 'conversion' write the tiny model; count calls."""
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "bundled_gguf", lambda: tmp_path / "model.gguf")
    calls = []

    def convert(gguf, out):
        calls.append(out)
        _save_tiny(out)

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return tmp_path / "cache" / "models" / DEFAULT_MODEL, calls


def test_default_model_converted_once(fake_conversion, capsys):
    target, calls = fake_conversion
    assert default_model_dir() == target
    assert "converting" in capsys.readouterr().err
    assert (target / ".splice-complete").is_file() and (target / "config.json").is_file()
    assert load_model()[0].config.num_hidden_layers == 2
    assert load_model(DEFAULT_MODEL)[0].config.num_hidden_layers == 2
    assert len(calls) == 1 and "converting" not in capsys.readouterr().err
    assert [p.name for p in target.parent.iterdir()] == [DEFAULT_MODEL]


def test_failed_conversion_leaves_no_cache(fake_conversion, monkeypatch):
    target, _ = fake_conversion

    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    assert list(target.parent.iterdir()) == []


def test_concurrent_conversions_share_one_cache(fake_conversion, monkeypatch):
    """Two processes converting at once: both get the cache, one copy is kept, nothing else is left."""
    target, calls = fake_conversion
    barrier, results = threading.Barrier(2), []

    def convert(gguf, out):
        calls.append(out)
        _save_tiny(out)
        barrier.wait()  # both builds are complete before either is installed

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target] and len(calls) == 2
    assert [p.name for p in target.parent.iterdir()] == [DEFAULT_MODEL]
    assert (target / ".splice-complete").is_file() and load_model()[0].config.num_hidden_layers == 2


def test_incomplete_cache_is_rebuilt(fake_conversion):
    target, calls = fake_conversion
    target.mkdir(parents=True)
    (target / "config.json").write_text("{half")
    assert default_model_dir() == target and len(calls) == 1
    assert (target / ".splice-complete").is_file()
    assert load_model()[0].config.hidden_size == 32


@pytest.mark.real_model
def test_real_default_model(real_model):
    model, tok = real_model
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == \
        (30, 576, 9, 3)
    assert not model.training and model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "Steering vectors move the residual stream. Ça marche? 42!"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.padding_side == "left" and tok.pad_token is not None
    with torch.no_grad():  # a converted model that knows things (a broken dequantization does not)
        logits = model(**tok("The capital of France is", return_tensors="pt")).logits
    assert tok.decode(logits[0, -1].argmax()) == " Paris"
