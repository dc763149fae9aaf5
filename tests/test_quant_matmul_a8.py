"""``splice::quant_matmul_a8``: the int8 activation codes against hand-computed ones, every backend
against the fp32 reference (int8 dot products on AVX-512 VNNI, the float fallback past 32 tokens,
Triton under ``TRITON_INTERPRET=1``, CUDA where present), that the activations really are quantized,
and the Triton / nvcc compile checks (empty inputs, forced backends, bad arguments and opcheck are in
test_quant_kernels.py, for both ops).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import test_quant_kernels as kernel_tests
import torch
from kernel_checks import (
    BACKENDS,
    compile_header,
    compile_launcher,
    compile_triton_sm90,
    launcher_opt_in,
    needs_nvcc,
)
from test_quant_kernels import make_case, relative_error

from splice.ops import library, quant_matmul
from splice.ops.act_quant import dequantize_activations, quantize_activations
from splice.ops.quant_format import BITS, GROUP_SIZES
from splice.ops.quant_matmul_a8 import quant_matmul_a8_reference
from splice.ops.quant_matmul_reference import quant_matmul_reference

run = functools.partial(kernel_tests.run, op="quant_matmul_a8")
assert_matches = functools.partial(kernel_tests.assert_matches, op="quant_matmul_a8")


# ---- activation codes ------------------------------------------------------------------------


def test_activation_codes_by_hand():
    """A block whose max is 127 keeps its values as codes, ties round to even; an all-zero block
    has d = 0; the partial last block (K = 70) scales by its own max."""
    x = torch.zeros(1, 70)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -3.5, -126.4])
    x[0, 64:67] = torch.tensor([0.25, -0.5, 0.125])
    x8, d = quantize_activations(x)
    assert x8.dtype == torch.int8 and x8.shape == (1, 70) and d.shape == (1, 3)
    assert x8[0, :6].tolist() == [127, 0, 2, 2, -4, -126]
    assert x8[0, 6:64].eq(0).all() and d[0, 1] == 0
    assert x8[0, 64:67].tolist() == [64, -127, 32]  # 0.25 · 254 = 63.5 → 64 (even)
    assert d.tolist() == [[1.0, 0.0, pytest.approx(0.5 / 127)]]


def test_dequantized_error_is_half_a_step():
    x = torch.randn(4, 200) * torch.logspace(-3, 2, 200)
    x8, d = quantize_activations(x)
    step = d.repeat_interleave(32, dim=1)[:, :200]
    assert ((dequantize_activations(x) - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert x8.abs().max() == 127


def test_activation_quantization_rejects_non_matrix():
    with pytest.raises(ValueError, match="tokens, features"):
        quantize_activations(torch.randn(2, 3, 4))


# ---- backends against the reference ----------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 8, 17, 32, 33], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("n,k", [(7, 96), (24, 576), (5, 100), (9, 1536)])
def test_cpp_matches_reference(bits, group_size, dtype, t, n, k):
    """Partial row and token register blocks, K not a multiple of the code tiles (100), partial last
    groups, and the float fallback past 32 tokens (t = 33); a bias on the one-token (GEMV) path and
    on a multi-token one."""
    args = make_case(t, n, k, bits, group_size, dtype, bias=t in (1, 2), seed=t + n)
    assert_matches(run("cpu", "cpp", args), args)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_match_reference(device, backend, bits, dtype):
    args = make_case(3, 7, 100, bits, 32, dtype, bias=True)
    assert_matches(run(device, backend, args), args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_activations_are_quantized(device, backend):
    """The kernel multiplies x̂, not x: in fp32 it matches the a8 reference 100× more closely than
    it matches quant_matmul of the unquantized x."""
    args = make_case(4, 64, 576, 4, 64, torch.float32, seed=5)
    y = run(device, backend, args)
    assert relative_error(y, quant_matmul_a8_reference(*args)) * 100 < relative_error(y, quant_matmul_reference(*args))


def test_smollm_shapes():
    """The real model's projections and a slice of its lm_head, at decode batch sizes."""
    for t, (n, k) in [(1, (576, 1536)), (8, (1536, 576)), (16, (4000, 576))]:
        args = make_case(t, n, k, 4, 64, torch.bfloat16, seed=t)
        assert_matches(run("cpu", "cpp", args), args)


def test_int8_dot_products_where_the_cpu_has_them():
    """Built with -march=native on a CPU with AVX-512 VNNI, the C++ kernel uses int8 dot products."""
    if not library.extension_loaded():
        pytest.skip("splice._C not built")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = "avx512_vnni" in flags and "avx512bw" in flags and os.environ.get("SPLICE_NATIVE") != "0"
    assert library.int8_dot_products() == expected


def test_quant_matmul_is_unchanged_by_the_a8_op():
    """Defining quant_matmul_a8 left quant_matmul's own path (float activations) as it was."""
    args = make_case(3, 24, 576, 4, 64, torch.float32)
    torch.testing.assert_close(quant_matmul(*args), quant_matmul_reference(*args), rtol=2e-5, atol=2e-5)


# ---- compile checks --------------------------------------------------------------------------

TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.quant_matmul_a8 import _act_quant_kernel as kernel

for dt in ("fp32", "bf16"):
    source = ASTSource(kernel, dict(zip(kernel.arg_names, [f"*{dt}", "*fp32", "i32", "i32"])), {})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["cubin"]
"""


def test_triton_kernel_compiles_for_sm90():
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """act_quant_kernel.cuh (no torch headers) compiles, warning-free, for both dtypes."""
    compile_header(tmp_path, (
        '#include "act_quant_kernel.cuh"\n'
        + "".join(
            f"template cudaError_t splice::gpu::launch_act_quant<{t}>(const {t}*, float*, int64_t, int64_t, "
            "cudaStream_t);\n"
            for t in ("float", "__nv_bfloat16")
        )
    ))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    compile_launcher(tmp_path, "quant_matmul_a8")
