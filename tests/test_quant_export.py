"""Export to compressed-tensors pack-quantized: exact round trip through compressed-tensors' own
unpacking, refusals, the config, the CLI, and which widths vLLM (CPU build) loads."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from tiny_models import tiny_model
from vllm_probe import WNA16_MISSING, has_wna16_kernel

import splice
from splice.cli import main as cli_main
from splice.quant.apply import quantize_model
from splice.quant.checkpoint import TENSORS, save_quantized
from splice.quant.compressed_tensors_export import export_compressed_tensors
from splice.quant.linear import QuantLinear
from splice.quant.plan import QuantPlan, units
from splice.quant.sliderquant import SliderQuantSettings
from splice.tools.gptq_calibration import gptq_quantize_model
from splice.tools.sliderquant_calibration import sliderquant_model


def llama(seed: int = 0):
    """A tied Llama whose input sizes (128, 256) are whole groups of 32, 64 and 128."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=256, tie_word_embeddings=True)
    return T.LlamaForCausalLM(config).eval()


def read(out: Path) -> tuple[dict, QuantizationConfig, dict]:
    config = json.loads((out / "config.json").read_text())
    return config, QuantizationConfig.model_validate(config["quantization_config"]), load_file(out / TENSORS)


def scheme_of(qconfig: QuantizationConfig, name: str):
    (scheme,) = [s for s in qconfig.config_groups.values() if name in s.targets]
    return scheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("method", ["rtn_sym", "rtn_int", "gptq", "sliderquant"])
def test_round_trip_through_compressed_tensors_is_exact(tmp_path, bits, group_size, method):
    """compressed-tensors' own decompress gives splice's dequantized weight bit for bit (float16, the
    scales' dtype), and its unpacked codes and zero points are splice's minus 2**(bits − 1)."""
    model = llama()
    plan = QuantPlan.uniform(model, bits, group_size)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    if method == "gptq":  # calibrated on random tokens: 4 × 64 = 256 tokens, the largest input size
        gptq_quantize_model(model, plan, ids, progress=False)
    elif method == "sliderquant":  # one decoder layer: one window
        sliderquant_model(model, plan, ids, SliderQuantSettings(fill=0, window=1), progress=False)
    else:
        quantize_model(model, plan, method)
    config, qconfig, state = read(export_compressed_tensors(model, tmp_path / "ct"))
    assert qconfig.format == "pack-quantized" and qconfig.quant_method == "compressed-tensors"
    assert config["tie_word_embeddings"] is False and "model.embed_tokens.weight" in state
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 8 and qconfig.ignore == []
    for name, m in quantized.items():
        scheme = scheme_of(qconfig, name)
        w = scheme.weights
        assert (w.num_bits, w.group_size, w.strategy, w.symmetric) == (bits, group_size, "group", method == "rtn_sym")
        local = {k[len(name) + 1:]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        assert set(local) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if w.symmetric else {"weight_zero_point"})
        dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert dense.dtype == torch.float16 and torch.equal(dense, m.dequantize().to(torch.float16))
        offset = 2 ** (bits - 1)
        codes = unpack_from_int32(local["weight_packed"], bits, local["weight_shape"])
        assert torch.equal(codes.to(torch.int16) + offset, m.packed().codes().to(torch.int16))
        assert torch.equal(local["weight_scale"], m.scales)
        if not w.symmetric:
            zeros = unpack_from_int32(local["weight_zero_point"], bits, m.scales.shape, packed_dim=0)
            assert torch.equal(zeros.to(torch.float16) + offset, m.zeros)


def test_dense_modules_are_ignored_and_a_dense_tied_head_stays_tied(tmp_path):
    model = llama()
    mlp = [u for u in units(model) if u.endswith(("gate_up", "down_proj"))]
    quantize_model(model, QuantPlan.for_units(model, dict.fromkeys(mlp, 4), 64), "rtn_int")
    config, qconfig, state = read(export_compressed_tensors(model, tmp_path / "ct"))
    attn = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert sorted(qconfig.ignore) == sorted(attn + ["lm_head"])
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state
    assert all(torch.equal(state[f"{n}.weight"], model.get_submodule(n).weight) for n in attn)
    assert config["dtype"] == "float16"


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_fractional_zero_points_are_refused_and_nothing_is_written(tmp_path, method):
    model = llama()
    quantize_model(model, QuantPlan.uniform(model, 4, 64), method)
    with pytest.raises(ValueError, match="fractional zero points.*rtn_int.*rtn_sym"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_partial_groups_unquantized_patched_and_existing_targets_are_refused(tmp_path):
    model = tiny_model("llama")  # intermediate size 96: down_proj is not a whole number of 64-groups
    quantize_model(model, QuantPlan.uniform(model, 4, 64), "rtn_int")
    with pytest.raises(ValueError, match="down_proj: in_features 96 is not a multiple of group size 64"):
        export_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(ValueError, match="no QuantLinear"):
        export_compressed_tensors(llama(), tmp_path / "ct")
    model = llama()
    quantize_model(model, QuantPlan.uniform(model, 4, 64), "rtn_int")
    with splice.patch(model, max_slots=2), pytest.raises(RuntimeError, match="patched by splice"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ct").mkdir()
    with pytest.raises(FileExistsError):
        export_compressed_tensors(model, tmp_path / "ct")
    assert export_compressed_tensors(model, tmp_path / "ct", overwrite=True) == tmp_path / "ct"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_cli_exports_a_saved_checkpoint(tmp_path):
    model = llama()
    plan = QuantPlan.uniform(model, 4, 32)
    quantize_model(model, plan, "rtn_sym")
    save_quantized(model, plan, tmp_path / "q")
    assert cli_main(["export", "--from", str(tmp_path / "q"), "--to", str(tmp_path / "ct")]) == 0
    _, qconfig, state = read(tmp_path / "ct")
    assert not (tmp_path / "ct" / "plan.json").exists() and "lm_head.weight_packed" in state
    assert [(s.weights.num_bits, s.weights.group_size, s.weights.symmetric) for s in qconfig.config_groups.values()] \
        == [(4, 32, True)]


# ---- vLLM (CPU build): which exports load ------------------------------------------------------

vllm_missing = importlib.util.find_spec("vllm") is None
PROBE = Path(__file__).with_name("vllm_probe.py")
STEPS = 16


def probe(path: Path, ids: list[int], dtype: str = "auto") -> dict:
    """Greedy tokens and log-probs from a fresh vLLM engine in a subprocess, or the error it raised."""
    run = subprocess.run([sys.executable, str(PROBE), str(path), dtype, json.dumps(ids), str(STEPS)],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"vLLM probe crashed:\n{run.stderr[-3000:]}"
    return json.loads(lines[-1])


def smol():
    from splice.models.loader import load_model

    return load_model()  # a fresh copy: quantizing changes it in place


@pytest.fixture(scope="module")
def smol_4bit(tmp_path_factory):
    """The default model at 4 bits mixing every form vLLM should load: symmetric g32 attention
    (rtn_sym), asymmetric g64 gate/up and g128 down (rtn_int), a quantized untied lm_head (g64), and
    layer 0's attention dense. Returns (splice model, tokenizer, export dir)."""
    model, tok = smol()
    u = units(model)
    attn = {n: (4, 32) for n in u if n.endswith(("qkv", "o_proj")) and ".layers.0." not in n}
    rest = {n: (4, 128 if n.endswith("down_proj") else 64) for n in u if n.endswith(("gate_up", "down_proj"))}
    quantize_model(model, QuantPlan.for_units(model, attn), "rtn_sym")
    quantize_model(model, QuantPlan.for_units(model, {**rest, "lm_head": (4, 64)}), "rtn_int")
    return model, tok, export_compressed_tensors(model, tmp_path_factory.mktemp("smol") / "ct", tokenizer=tok)


@pytest.mark.slow
@pytest.mark.skipif(vllm_missing, reason="vllm is not importable")
@pytest.mark.skipif(not has_wna16_kernel(), reason=WNA16_MISSING)
def test_vllm_loads_4_bit_and_matches_splice_greedy(smol_4bit):
    """vLLM (float16, CPUWNA16 kernel) generates splice's own greedy tokens for 16 steps, and each
    token's log-prob is within 0.05 of splice's (float32) on the same sequence."""
    model, tok, out = smol_4bit
    _, qconfig, _ = read(out)
    assert {(s.weights.group_size, s.weights.symmetric) for s in qconfig.config_groups.values()} \
        == {(32, True), (64, False), (128, False)}
    assert_vllm_matches_splice(model, tok, out)


def assert_vllm_matches_splice(model, tok, out: Path) -> None:
    """vLLM's greedy tokens on ``out`` equal ``model``'s for STEPS steps, log-probs within 0.05."""
    ids = tok("The capital of France is").input_ids
    got = probe(out, ids)
    assert "error" not in got, got
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=STEPS,
                              do_sample=False)[0, len(ids):].tolist()
        logits = model(torch.tensor([ids + got["tokens"]])).logits[0, len(ids) - 1:-1].float()
    assert got["tokens"] == ours
    logprobs = logits.log_softmax(-1).gather(1, torch.tensor(got["tokens"])[:, None])[:, 0]
    assert (logprobs - torch.tensor(got["logprobs"])).abs().max() < 0.05


@pytest.mark.slow
@pytest.mark.skipif(vllm_missing, reason="vllm is not importable")
@pytest.mark.skipif(not has_wna16_kernel(), reason=WNA16_MISSING)
def test_vllm_serves_a_gptq_export_with_splice_greedy_tokens(tmp_path):
    """GPTQ 4-bit g64 (integer zero points) on every decoder linear, calibrated on WikiText-2: the
    export loads in vLLM and generates splice's own greedy tokens."""
    from splice.tools.calibration_text import wikitext_windows

    model, tok = smol()
    plan = QuantPlan.for_units(model, {n: (4, 64) for n in units(model) if n != "lm_head"})
    report = gptq_quantize_model(model, plan, wikitext_windows(tok, 8, 256), progress=False)
    assert report.quant.quantized == len(plan.entries) == report.quant.modules
    assert_vllm_matches_splice(model, tok, export_compressed_tensors(model, tmp_path / "ct", tokenizer=tok))


@pytest.mark.slow
@pytest.mark.skipif(vllm_missing, reason="vllm is not importable")
@pytest.mark.skipif(not has_wna16_kernel(), reason=WNA16_MISSING)
def test_vllm_cpu_has_no_float32_path_for_pack_quantized(smol_4bit):
    _, tok, out = smol_4bit
    got = probe(out, tok("Hi").input_ids, dtype="float32")
    assert "cpu_gemm_wna16" in got.get("error", "") and "not implemented for 'Float'" in got["error"], got


@pytest.mark.slow
@pytest.mark.skipif(vllm_missing, reason="vllm is not importable")
@pytest.mark.parametrize("bits, quant_type", [(2, "uint2"), (3, "uint3"), (8, "uint8")])
def test_vllm_cpu_refuses_2_3_and_8_bit(tmp_path, bits, quant_type):
    """The export itself is exact at these widths (above); vLLM's CPU build has no kernel for them."""
    model, tok = smol()
    quantize_model(model, QuantPlan.for_units(model, {"model.layers.0.mlp.gate_up": (bits, 64)}), "rtn_int")
    got = probe(export_compressed_tensors(model, tmp_path / "ct", tokenizer=tok), tok("Hi").input_ids)
    assert "CPUWNA16" in got.get("error", "") and f"Quant type ({quant_type})" in got["error"], got
