"""The decode-step split of ``splice bench quant --profile-decode``: classes, shares, and that
steering time shows up only when a model is steered."""

import pytest
import torch
from tiny_models import HIDDEN, tiny_model

import splice
from splice.bench.step_profile import ORDER, decode_step_split, op_class, split_table


@pytest.mark.parametrize("name, cls", [("aten::mm", "matmul"), ("aten::addmm", "matmul"),
                                       ("splice::quant_matmul", "matmul"),
                                       ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                                       ("splice::fused_steer", "steering"), ("aten::rsqrt", "other ops")])
def test_operators_fall_in_their_class(name, cls):
    assert op_class(name) == cls


def test_split_covers_the_step_and_sees_steering_only_when_steered():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = decode_step_split(model, ids, steps=4)
    with splice.patch(model, splice.Steer(torch.randn(HIDDEN), layers=[0, 1, 2], scale=1.0)):
        steered = decode_step_split(model, ids, steps=4)
    for split in (plain, steered):
        assert list(split) == list(ORDER)
        assert 0.99 <= sum(c["share"] for c in split.values()) <= 1.01
        assert split["matmul"]["seconds"] > 0 and split["attention"]["seconds"] > 0
    assert plain["steering"]["seconds"] == 0 and steered["steering"]["seconds"] > 0
    assert "| steered | " in split_table({"plain": plain, "steered": steered})
