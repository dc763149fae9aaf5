"""Int8 activations on quantized linears (``QuantLinear.activations``, ``splice.set_quant_activations``):
the layer runs quant_matmul_a8, a model switches whole and back, nothing is persisted, bad input
changes nothing, and compiled decoding follows the setting in one graph."""

import pytest
import torch
from tiny_models import greedy, left_padded_batch, tiny_model

import splice
from splice.ops.quant_matmul_a8 import quant_matmul_a8_reference
from splice.ops.quant_matmul_reference import quant_matmul_reference
from splice.quant.apply import quantize_model
from splice.quant.linear import QuantLinear
from splice.quant.plan import QuantPlan


def quantized_tiny():
    model = tiny_model("llama")
    quantize_model(model, QuantPlan.uniform(model, 4))
    return model


def activations(model) -> set[str]:
    return {m.activations for m in model.modules() if isinstance(m, QuantLinear)}


def test_quant_linear_multiplies_quantized_activations():
    layer = QuantLinear.from_weight(torch.randn(24, 100) * 0.05, 4, 32, bias=torch.randn(24))
    x = torch.randn(2, 3, 100)
    args = (x.view(6, 100), layer.qweight, layer.scales, layer.zeros, layer.bias, 4, 32, 24, 100)
    assert layer.activations == "float"
    torch.testing.assert_close(layer(x).view(6, 24), quant_matmul_reference(*args), rtol=2e-5, atol=2e-5)
    layer.activations = "int8"
    torch.testing.assert_close(layer(x).view(6, 24), quant_matmul_a8_reference(*args), rtol=2e-5, atol=2e-5)
    assert "activations=int8" in repr(layer)
    with pytest.raises(ValueError, match="activations must be one of"):
        layer.activations = "fp8"
    assert layer.activations == "int8"


def test_a_model_switches_whole_and_back_and_persists_nothing():
    model = quantized_tiny()
    ids, mask = left_padded_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        float_logits = model(ids, attention_mask=mask).logits
        count = splice.set_quant_activations(model, "int8")
        int8_logits = model(ids, attention_mask=mask).logits
        assert count == sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
        assert activations(model) == {"int8"}
        err = (int8_logits - float_logits).abs().max() / float_logits.abs().max()
        assert 0 < err < 0.05
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        splice.set_quant_activations(model, "float")
        assert torch.equal(model(ids, attention_mask=mask).logits, float_logits)


@pytest.mark.parametrize("quantize,kind,message", [
    (True, "int4", "activations must be one of"),
    (False, "int8", "no quantized linears"),
])
def test_bad_input_changes_nothing(quantize, kind, message):
    model = quantized_tiny() if quantize else tiny_model("llama")
    before = activations(model)
    with pytest.raises(ValueError, match=message):
        splice.set_quant_activations(model, kind)
    assert activations(model) == before


def test_compiled_decoding_follows_the_setting():
    """One graph (fullgraph) with int8 activations, the eager int8 tokens; switching back recompiles
    to the float tokens."""
    torch._dynamo.reset()
    model = quantized_tiny()
    ids, mask = left_padded_batch()
    want_float = greedy(model, ids, mask, 6)
    splice.set_quant_activations(model, "int8")
    want_int8 = greedy(model, ids, mask, 6)
    assert not torch.equal(want_int8, want_float)
    decoder = splice.compile_decode(model, max_cache_len=24, backend="eager")
    got = decoder.generate(ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    torch.testing.assert_close(got, want_int8, rtol=0, atol=0)
    splice.set_quant_activations(model, "float")
    got = decoder.generate(ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    torch.testing.assert_close(got, want_float, rtol=0, atol=0)
    torch._dynamo.reset()
