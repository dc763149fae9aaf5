"""Steering on the real default model (SmolLM2-135M-Instruct): exactness and measurable effect."""

import gguf
import pytest
import torch

import splice
from splice.vectors.extract import builtin_pairs, extract_vectors
from splice.vectors.gguf_control import export_control_vector, import_control_vector

pytestmark = pytest.mark.real_model

HAPPY_WORDS = [" happy", " joy", " glad", " wonderful", " great", " love", " amazing", " excited", " delighted",
               " cheerful", " fantastic", " smile"]
PROMPT = "Today I feel"


@pytest.fixture(scope="module")
def happy(real_model):
    model, tok = real_model
    positive, negative = builtin_pairs("happy_sad")
    return extract_vectors(model, tok, positive, negative, progress=False)


def next_token_probs(model, tok, prompt=PROMPT):
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits[0, -1].softmax(-1)


def happy_mass(probs, tok):
    ids = {tok.encode(w, add_special_tokens=False)[0] for w in HAPPY_WORDS}
    return float(probs[list(ids)].sum())


def test_extracted_vector_moves_the_model_toward_the_concept(real_model, happy):
    model, tok = real_model
    base = happy_mass(next_token_probs(model, tok), tok)
    layers = list(range(12, 19))
    with splice.patch(model, splice.Steer(happy, layers=layers, scale=0.4)):
        up = happy_mass(next_token_probs(model, tok), tok)
    with splice.patch(model, splice.Steer(happy, layers=layers, scale=-0.4)):
        down = happy_mass(next_token_probs(model, tok), tok)
    assert up > 5 * base, (base, up)  # measured: 0.011 -> 0.12
    assert down < base / 5, (base, down)  # measured: 0.011 -> 0.000


def test_scale_zero_and_unsteered_patch_leave_logits_unchanged(real_model, happy):
    model, tok = real_model
    enc = tok(["The weather today is", "Once upon a time, a small robot"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        before = model(**enc).logits
        with splice.patch(model) as p:
            plain = model(**enc).logits
            p.set_slot(1, [splice.Steer(happy, scale=0.0)])
            zero = model(**enc).logits
        after = model(**enc).logits
    assert torch.equal(zero, plain)
    torch.testing.assert_close(plain, before, atol=2e-3, rtol=1e-4)  # fp32 sums in another order
    assert torch.equal(after, before)


def test_greedy_generation_is_unchanged_by_an_unsteered_patch(real_model):
    model, tok = real_model
    enc = tok(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        before = model.generate(**enc, **kwargs)
        with splice.patch(model):
            patched = model.generate(**enc, **kwargs)
    assert torch.equal(patched, before)


def test_llama_cpp_control_vector_round_trip_steers_identically(real_model, happy, tmp_path):
    model, tok = real_model
    path = tmp_path / "happy.gguf"
    layers = list(range(12, 19))
    export_control_vector(splice.VectorSet({l: happy[l] for l in layers}, site="out", model=happy.model,
                                           arch=happy.arch), path)
    # the model hint is the architecture, as llama.cpp and repeng write it, not the model's directory
    assert gguf.GGUFReader(path).fields["controlvector.model_hint"].contents() == "llama"
    imported = import_control_vector(path, expect_hidden_size=model.config.hidden_size)
    assert (imported.arch, imported.model) == ("llama", "SmolLM2-135M-Instruct")
    with splice.patch(model, splice.Steer(happy, layers=layers, scale=0.4)):
        direct = next_token_probs(model, tok)
    with splice.patch(model, splice.Steer(imported, scale=0.4)):
        via_gguf = next_token_probs(model, tok)
    assert torch.equal(direct, via_gguf)
