"""Model-level quantization on tiny models: plans, bit accounting, sensitivity, the budget solver,
quantize_model, checkpoints, and composition with steering and skipping."""

import json
import math

import pytest
import torch
import transformers as T
from test_skip import identity_layer
from tiny_models import HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, left_padded_batch, tiny_model

import splice
from splice.quant.allocate import allocate, formats, plan_for, unit_shapes
from splice.quant.apply import quantize_model
from splice.quant.checkpoint import PLAN, TENSORS, save_quantized
from splice.quant.linear import QuantLinear
from splice.quant.plan import QuantPlan, quantizable, unit_of, units
from splice.tools.quant_sensitivity import LayerInputs, Measurements, fake_quantized, measure

ATTN = "model.layers.1.self_attn"


def tied_llama(seed: int = 0):
    """The tiny llama with ``lm_head`` tied to the embedding, as in SmolLM2."""
    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model, ids=None, mask=None):
    if ids is None:
        ids, mask = left_padded_batch()
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def windows(count=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def measured():
    model = tied_llama()
    return measure(model, windows(), progress=False)


# --- plans ----------------------------------------------------------------------------------
def test_units_fuse_qkv_and_gate_up():
    model = tied_llama()
    u = units(model)
    assert u[f"{ATTN}.qkv"] == [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"]
    assert u["model.layers.1.mlp.gate_up"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert len(u) == 4 * LAYERS + 1 and "lm_head" in u
    assert unit_of("model.layers.0.self_attn.qkv_proj") == "model.layers.0.self_attn.qkv_proj"  # phi3: fused already


def test_fused_groups_must_share_one_width():
    model = tied_llama()
    entries = QuantPlan.uniform(model, 4).to_dict()["entries"]
    entries[f"{ATTN}.k_proj"]["bits"] = 3
    with pytest.raises(ValueError, match=r"one fused matmul \(model.layers.1.self_attn.qkv\)"):
        QuantPlan(entries)
    entries = QuantPlan.uniform(model, 4).to_dict()["entries"]
    del entries["model.layers.2.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"gate_up runs as one fused matmul: plan \['model.layers.2.mlp.up_proj'\]"):
        QuantPlan(entries).validate_for(model)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update({"model.layers.9.mlp.down_proj": e["lm_head"]}), "'model.layers.9.mlp.down_proj' is not in"),
    (lambda e: e.update({"model.norm": e["lm_head"]}), "'model.norm' is a LlamaRMSNorm, not an nn.Linear"),
    (lambda e: e["lm_head"].update(shape=[VOCAB, HIDDEN + 1]), r"'lm_head' is planned as \[out, in\] = \[128, 65\]"),
    (lambda e: e["lm_head"].update(bits=5), "bits must be one of"),
    (lambda e: e["lm_head"].update(group_size=48), "group_size must be one of"),
])
def test_plan_validation_errors_name_the_module(change, message):
    model = tied_llama()
    entries = QuantPlan.uniform(model, 4).to_dict()["entries"]
    change(entries)
    with pytest.raises(ValueError, match=message):
        QuantPlan(entries).validate_for(model)


def test_a_plan_for_another_model_is_refused():
    plan = QuantPlan.uniform(tied_llama(), 4)
    with pytest.raises(ValueError, match="another model"):
        plan.validate_for(tiny_model("phi3"))
    other = tiny_model("llama")
    other.model.layers[0].mlp.down_proj = torch.nn.Linear(96, HIDDEN + 64, bias=False)
    with pytest.raises(ValueError, match="another model"):
        plan.validate_for(other)


def test_bits_per_weight_is_exact_for_a_hand_computed_case():
    model = tied_llama()
    # q/o [64, 64], k/v [32, 64], gate/up [96, 64], down [64, 96], lm_head [128, 64]
    bits = {u: 4 for u in units(model)}
    bits["lm_head"] = 8
    bits["model.layers.0.mlp.down_proj"] = 16
    plan = QuantPlan.for_units(model, bits, group_size=64)
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 2 + 64 * 96
    params = LAYERS * per_layer + 128 * 64
    four = lambda n, k: n * (k * 4 + math.ceil(k / 64) * 32)  # noqa: E731
    layer_bits = 2 * four(64, 64) + 2 * four(32, 64) + 2 * four(96, 64)
    storage = (LAYERS * layer_bits + 2 * four(64, 96) + 64 * 96 * 16 + 128 * (64 * 8 + 32))
    assert plan.bits_per_weight(model) == storage / params
    assert QuantPlan.for_units(model, {"lm_head": 4}).bits_per_weight() == 4.5  # 4 + 32 / 64


def test_plan_json_round_trip(tmp_path):
    model = tied_llama()
    plan = QuantPlan.uniform(model, 3, group_size=32)
    plan.scores["lm_head"] = 0.5
    again = QuantPlan.load(plan.save(tmp_path / "plan.json"))
    assert again.to_dict() == plan.to_dict()
    again.validate_for(model)


# --- sensitivity and allocation ---------------------------------------------------------------
def test_measurements_cover_every_unit_and_fall_with_width(measured, tmp_path):
    assert set(measured.kl) == set(measured.lim) == set(measured.zd) == set(units(tied_llama()))
    for unit, kl in measured.kl.items():
        assert kl["2g64"] > kl["8g64"] >= 0, unit
        assert 0 <= measured.zd[unit] <= 1
    assert len(measured.layer_lim) == LAYERS and measured.lim["lm_head"] == max(measured.layer_lim)
    again = Measurements.load(measured.save(tmp_path / "m.json"))
    assert again.costs() == measured.costs()
    again.check_model(tied_llama(seed=3))  # same shape, other weights: accepted
    with pytest.raises(ValueError, match="these measurements are for"):
        again.check_model(tiny_model("qwen2"))


def test_reuse_with_other_settings_is_refused_naming_the_setting(measured, tmp_path):
    model = tied_llama()
    again = Measurements.load(measured.save(tmp_path / "m.json"))
    assert again.calibration == {"windows": 2, "length": 24, "tokens_sha256": again.calibration["tokens_sha256"]}
    assert again.widths == [2, 3, 4, 8] and again.group_sizes == [64] and again.method == "hqq"
    again.check_reuse(model, windows(), "hqq", (8, 4, 3, 2), (64,))
    again.check_reuse(model, windows())  # settings not given are not compared
    for other, setting in [(dict(windows=windows(2, 24, seed=1)), "tokens_sha256"),
                           (dict(windows=windows(2, 16)), "length"), (dict(windows=windows(3, 24)), "windows"),
                           (dict(method="rtn"), "quantizer hqq"), (dict(widths=(2, 4)), r"widths \[2, 3, 4, 8\]"),
                           (dict(group_sizes=(32, 64)), r"group sizes \[64\]")]:
        args = {"windows": windows(), "method": "hqq", "widths": (2, 3, 4, 8), "group_sizes": (64,), **other}
        with pytest.raises(ValueError, match=setting):
            again.check_reuse(model, **args)
    with pytest.raises(ValueError, match="these measurements are for"):
        again.check_reuse(tiny_model("qwen2"), windows())


def test_a_measurement_file_without_its_settings_is_refused(measured, tmp_path):
    data = json.loads(measured.save(tmp_path / "m.json").read_text())
    del data["calibration"], data["widths"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"calibration, widths; made by an older splice\): re-measure"):
        Measurements.load(tmp_path / "old.json")


def test_measuring_leaves_the_model_unchanged():
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model, windows(1, 8), widths=(2,), progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("target", [2.75, 3.5, 4.25, 6.0])
def test_solver_meets_the_budget_and_beats_random(measured, target):
    model = tied_llama()
    costs = measured.costs()
    plan = plan_for(model, "measured", target, measured)
    assert plan.bits_per_weight(model) <= target
    total = lambda p: sum(costs[u][(p.entries[names[0]].bits, 64)] for u, names in units(model).items())  # noqa: E731
    for seed in range(5):
        rand = plan_for(model, "random", target, seed=seed)
        assert rand.bits_per_weight(model) <= target
        assert total(plan) <= total(rand)
    for method in ("lim", "zd", "uniform"):
        assert plan_for(model, method, target, measured).bits_per_weight(model) <= target


def test_solver_on_a_hand_made_case():
    shapes = {"a": [(64, 64)], "b": [(64, 64)]}
    costs = {"a": {(2, 64): 10.0, (4, 64): 1.0, (8, 64): 0.0}, "b": {(2, 64): 1.0, (4, 64): 0.5, (8, 64): 0.0}}
    # 2.5 / 4.5 / 8.5 bits per weight at 2 / 4 / 8 bits (group 64)
    choices = formats((2, 4, 8), [64])
    pick = lambda target: {u: f[0] for u, f in allocate(costs, shapes, target, choices).items()}  # noqa: E731
    assert pick(4.5) == {"a": 4, "b": 4}
    assert pick(5.5) == {"a": 8, "b": 2}  # cost 1.0 < 1.5 (a4 b4)
    assert pick(8.5) == {"a": 8, "b": 8}
    assert pick(3.5) == {"a": 4, "b": 2}


def test_solver_trades_group_size_for_bits():
    """At 4.25 bits per weight, 4-bit in groups of 32 (5.0 bpw) for the sensitive unit and 3-bit in
    groups of 64 (3.5 bpw) for the other beat 4-bit in groups of 128 (4.25 bpw) for both."""
    shapes = {"a": [(64, 128)], "b": [(64, 128)]}
    costs = {"a": {(3, 64): 9.0, (4, 32): 0.0, (4, 128): 3.0}, "b": {(3, 64): 0.5, (4, 32): 0.0, (4, 128): 0.4}}
    choices = [(3, 64), (4, 32), (4, 128)]
    assert allocate(costs, shapes, 4.25, choices) == {"a": (4, 32), "b": (3, 64)}
    plan = QuantPlan.for_units(tied_llama(), {"lm_head": (4, 32), f"{ATTN}.qkv": (3, 64)})
    assert {(e.bits, e.group_size) for e in plan.entries.values()} == {(4, 32), (3, 64)}


def test_measured_plan_mixes_group_sizes_it_measured():
    model = tied_llama()
    both = measure(model, windows(1, 16), widths=(2, 4), group_sizes=(32, 128), progress=False)
    assert set(next(iter(both.kl.values()))) == {"2g32", "2g128", "4g32", "4g128"}
    plan = plan_for(model, "measured", 4.0, both, widths=(2, 4), group_sizes=(32, 128))
    assert plan.bits_per_weight(model) <= 4.0
    assert {e.group_size for e in plan.entries.values()} <= {32, 128}
    with pytest.raises(ValueError, match="measured at groups"):
        plan_for(model, "measured", 4.0, both, widths=(2, 4), group_sizes=(64,))


def test_runs_from_recorded_layer_inputs_match_full_runs():
    """The measured cost of a unit is the same whether the model runs whole or from the unit's layer."""
    model = tied_llama()
    ids = windows(3, 12)
    inputs = LayerInputs(model, ids, batch_size=2)
    with fake_quantized([model.model.layers[2].mlp.down_proj], 2, 32, "rtn"):
        full = logits(model, ids)
        with inputs.starting_at(2):
            partial = logits(model, ids[:2])  # the first chunk of 2
            partial = torch.cat([partial, logits(model, ids[2:])])
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == LAYERS and not model.model.layers[2]._forward_pre_hooks


def test_budget_and_width_errors(measured):
    model = tied_llama()
    with pytest.raises(ValueError, match="below the smallest width's"):
        plan_for(model, "measured", 2.2, measured)
    with pytest.raises(ValueError, match="below the smallest width's"):
        plan_for(model, "uniform", 2.2)
    with pytest.raises(ValueError, match="bits must be one of"):
        allocate(measured.costs(), unit_shapes(model), 4.0, [(2, 64), (5, 64)])
    with pytest.raises(ValueError, match="group_size must be one of"):
        allocate(measured.costs(), unit_shapes(model), 4.0, [(4, 48)])
    with pytest.raises(ValueError, match="needs measurements"):
        plan_for(model, "lim", 4.0)
    with pytest.raises(ValueError, match="unknown allocation method"):
        plan_for(model, "best", 4.0)


# --- quantize_model ---------------------------------------------------------------------------
def test_quantize_model_at_8_bits_is_close_and_at_2_bits_is_not():
    ref = logits(tied_llama())
    eight, two = tied_llama(), tied_llama()
    report = quantize_model(eight, QuantPlan.uniform(eight, 8))
    quantize_model(two, QuantPlan.uniform(two, 2))
    err8 = float((logits(eight) - ref).abs().max())
    err2 = float((logits(two) - ref).abs().max())
    assert err8 < 0.02 * float(ref.abs().max()) and err2 > 10 * err8
    assert isinstance(eight.lm_head, QuantLinear) and not isinstance(eight.model.embed_tokens, QuantLinear)
    assert all(isinstance(m, QuantLinear) for m in quantizable(eight).values())
    assert report.quantized == report.modules == 7 * LAYERS + 1
    assert report.bytes_after < report.bytes_before / 3


def test_16_bit_entries_stay_dense():
    model = tied_llama()
    bits = {u: 4 for u in units(model)}
    bits["model.layers.1.mlp.down_proj"] = 16
    quantize_model(model, QuantPlan.for_units(model, bits))
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)


def test_a_failed_quantization_leaves_the_model_bit_identical():
    model = tied_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    with pytest.raises(ValueError, match="quantizing model.layers.2.mlp.down_proj to 4 bits failed"):
        quantize_model(model, QuantPlan.uniform(model, 4))
    assert dict(model.named_modules()) == mods
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantizing_a_patched_model_is_refused():
    model = tied_llama()
    with splice.patch(model), pytest.raises(RuntimeError, match="remove the patch"):
        quantize_model(model, QuantPlan.uniform(model, 4))


# --- checkpoints ------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path, measured):
    model = tied_llama()
    plan = plan_for(model, "measured", 3.5, measured)
    quantize_model(model, plan)
    return model, plan, save_quantized(model, plan, tmp_path / "ckpt")


def test_save_load_round_trip_is_bit_identical_and_holds_no_dense_weights(saved):
    model, plan, path = saved
    loaded = splice.load_quantized(path)
    assert torch.equal(logits(loaded), logits(model))
    for name in plan.entries:
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear) and not hasattr(m, "weight")
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "generation_config.json", PLAN, TENSORS])
    assert not list(path.parent.glob(".*tmp"))


def test_dense_tied_head_round_trips(tmp_path):
    model = tied_llama()
    bits = {u: 4 for u in units(model)}
    bits["lm_head"] = 16
    plan = QuantPlan.for_units(model, bits)
    quantize_model(model, plan)
    loaded = splice.load_quantized(save_quantized(model, plan, tmp_path / "ckpt"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_tampered_or_truncated_checkpoints_are_refused(saved):
    _, _, path = saved
    data = (path / TENSORS).read_bytes()
    (path / TENSORS).write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or modified"):
        splice.load_quantized(path)
    (path / TENSORS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="truncated or modified"):
        splice.load_quantized(path)
    (path / TENSORS).write_bytes(data)
    manifest = json.loads((path / PLAN).read_text())
    manifest["plan"]["entries"]["model.layers.0.mlp.down_proj"]["shape"] = [HIDDEN, 64]
    (path / PLAN).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="down_proj' is planned as"):
        splice.load_quantized(path)


def test_save_refuses_an_unquantized_model_and_leaves_nothing(tmp_path):
    model = tied_llama()
    with pytest.raises(ValueError, match="quantize it with"):
        save_quantized(model, QuantPlan.uniform(model, 4), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(saved):
    model, plan, path = saved
    with pytest.raises(FileExistsError):
        save_quantized(model, plan, path)
    save_quantized(model, plan, path, overwrite=True)
    assert torch.equal(logits(splice.load_quantized(path)), logits(model))


# --- composition ----------------------------------------------------------------------------
def test_steering_and_skipping_compose_with_a_quantized_model():
    model = tied_llama()
    quantize_model(model, QuantPlan.uniform(model, 4))
    ids, mask = left_padded_batch()
    plain = logits(model, ids, mask)
    handle = identity_layer(model.model.layers[1])
    expected = logits(model, ids, mask)
    handle.remove()
    with splice.patch(model, splice.Skip([1])):
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=2e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    v, h = torch.randn(HIDDEN, generator=g), torch.randn(HEAD_DIM, generator=g)
    full = torch.cat([torch.zeros(2 * HEAD_DIM), h, torch.zeros((HEADS - 3) * HEAD_DIM)])
    attn = model.model.layers[1].self_attn
    hooks = [model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: out + 2.0 * v),
             attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] + 1.5 * full,))]
    hooked = logits(model, ids, mask)
    for hook in hooks:
        hook.remove()
    steers = [splice.Steer(v, layers=[0], site="mlp", scale=2.0),
              splice.Steer(h, layers=[1], site="heads", head=2, scale=1.5)]  # runs through the QuantLinear o_proj
    with splice.patch(model, *steers):
        torch.testing.assert_close(logits(model, ids, mask), hooked, atol=2e-5, rtol=0)
    assert torch.equal(logits(model, ids, mask), plain)


# --- the real model -------------------------------------------------------------------------
@pytest.mark.real_model
def test_uniform_8_bit_keeps_wikitext_perplexity(real_model):
    from splice.models.loader import load_model
    from splice.tools.calibration_text import perplexity, wikitext_windows

    _, tok = real_model
    model, _ = load_model()  # a private copy: quantization replaces its modules
    ids = wikitext_windows(tok, 2, 128)
    before = perplexity(model, ids)
    report = quantize_model(model, QuantPlan.uniform(model, 8), method="rtn")
    after = perplexity(model, ids)
    assert abs(after / before - 1) < 0.01, (before, after)
    assert report.bits_per_weight == 8.5


def test_quantized_layers_run_outside_inference_mode():
    """A plain ``model(ids)`` call (gradients enabled, as users often write it) works."""
    from splice.quant.linear import QuantLinear

    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 32) and not y.requires_grad


def test_casting_a_quantized_model_keeps_the_packed_format():
    """``model.to(torch.bfloat16)`` casts activations and dense weights, never codes, scales or zeros."""
    model = tied_llama()
    quantize_model(model, QuantPlan.uniform(model, 4, group_size=32))
    ref = logits(model)
    model.to(torch.bfloat16)
    head = model.lm_head
    assert (head.qweight.dtype, head.scales.dtype, head.zeros.dtype) == (torch.uint8, torch.float16, torch.float16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
