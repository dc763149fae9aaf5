"""splice.use_splice_attention: decode steps run splice::decode_attention (counted, so a silent
fallback to SDPA fails), prefill stays on SDPA, and the tokens are SDPA's for every family (sliding
windows and soft-capping included), eager and compiled; bad requests leave the model as it was."""

import pytest
import torch
from tiny_models import CONFIGS, LAYERS, greedy, left_padded_batch, tiny_model
from torch import nn

import splice
from splice.runtime import decode_attention as interface

NEW = 6


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of decode_attention calls made through the "splice" implementation."""
    calls = []
    real = interface.decode_attention

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(interface, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_sdpa_tokens_with_the_kernel_on_every_decode_step(family, kernel_calls):
    overrides = {"sliding_window": 4} if family in ("mistral", "gemma2", "gemma3") else {}
    model = tiny_model(family, **overrides)
    ids, mask = left_padded_batch()
    want = greedy(model, ids, mask, NEW)
    assert splice.use_splice_attention(model) == "sdpa"
    got = greedy(model, ids, mask, NEW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(kernel_calls) == LAYERS * (NEW - 1)  # every decode step's layers; the prefill is SDPA's
    assert splice.use_splice_attention(model, "sdpa") == "splice"
    kernel_calls.clear()
    torch.testing.assert_close(greedy(model, ids, mask, NEW), want, rtol=0, atol=0)
    assert not kernel_calls


def test_decode_logits_match_sdpa_over_a_padded_cache():
    model = tiny_model("gemma2", sliding_window=3)  # soft-capped scores and a window inside the cache
    ids, mask = left_padded_batch()
    step = torch.randint(3, 100, (ids.shape[0], 1), generator=torch.Generator().manual_seed(5))

    def last_logits():
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            full = torch.cat([mask, torch.ones_like(step)], 1)
            return model(input_ids=step, attention_mask=full, past_key_values=out.past_key_values).logits

    want = last_logits()
    splice.use_splice_attention(model)
    torch.testing.assert_close(last_logits(), want, rtol=1e-5, atol=1e-5)


def test_allowed_slots_of_boolean_and_additive_masks():
    allowed = torch.tensor([[True, False, True], [False, True, True]])
    boolean = torch.stack([~allowed, allowed], 1)[:, None]  # [B, 1, 2 queries, L]: the last row counts
    assert torch.equal(interface.allowed_slots(boolean, 2, 3), allowed)
    additive = torch.where(boolean, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(interface.allowed_slots(additive, 2, 3), allowed)
    assert torch.equal(interface.allowed_slots(boolean[:1], 2, 3), allowed[:1].expand(2, 3))
    assert interface.allowed_slots(None, 2, 3) is None


def test_compiled_decoding_with_splice_attention_gives_the_eager_tokens(kernel_calls):
    model = tiny_model("llama")
    splice.use_splice_attention(model)
    ids, mask = left_padded_batch()
    want = greedy(model, ids, mask, NEW)
    torch._dynamo.reset()
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    got = decoder.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert decoder.last_compiled
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


def test_refusals_leave_the_model_as_it_was():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="implementation must be one of"):
        splice.use_splice_attention(model, "flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attention interface"):
        splice.use_splice_attention(nn.Linear(2, 2))


def test_the_real_model_keeps_its_tokens(real_model):
    model, tokenizer = real_model
    batch = tokenizer(["The capital of France is", "Name three colours of the rainbow, then explain why", "1 2 3"],
                      return_tensors="pt", padding=True)
    before = model.config._attn_implementation
    with torch.inference_mode():
        want = model.generate(**batch, max_new_tokens=12, do_sample=False)
        splice.use_splice_attention(model)
        try:
            got = model.generate(**batch, max_new_tokens=12, do_sample=False)
        finally:
            splice.use_splice_attention(model, before)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
