"""Quantizers, the packed format, every backend of ``splice::quant_matmul`` against the fp32
reference, the reference against a hand-written dequantization, bad arguments, opcheck, QuantLinear,
and nvcc / Triton compile checks. Empty inputs, forced backends, bad arguments and opcheck run for
``splice::quant_matmul_a8`` too.

Backends: the C++ CPU kernel (through the dispatcher; decode and prefill paths), the Triton kernel
(on CPU under ``TRITON_INTERPRET=1``, set in conftest.py, at small shapes; on CUDA when present) and
the C++ CUDA kernel (CUDA only). CUDA sources are compile-checked with nvcc wherever it is installed.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from kernel_checks import (
    ALL_BACKENDS,
    BACKENDS,
    compile_header,
    compile_launcher,
    compile_triton_sm90,
    launcher_opt_in,
    needs_nvcc,
    skip_unless_runs,
)

from splice.ops import backend_for, quant_matmul, quant_matmul_a8, use_backend
from splice.ops.quant_format import BITS, GROUP_SIZES, dequantize_codes
from splice.ops.quant_matmul_a8 import quant_matmul_a8_reference
from splice.ops.quant_matmul_reference import quant_matmul_reference
from splice.ops.quant_packing import PackedWeight, pack_codes, padded_k, row_bytes, unpack_codes
from splice.quant.linear import QuantLinear
from splice.quant.quantizers import quantize

DTYPES = (torch.float32, torch.bfloat16)
# Every backend sums in fp32 in its own order; y is rounded once to x.dtype. Errors are relative to max |y|.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights: a normal over the root of a chi-square / 3."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(n, k, 3, generator=g).pow(2).mean(-1)
    return 0.02 * torch.randn(n, k, generator=g) / chi2.sqrt()


def make_case(t, n, k, bits, group_size, dtype, *, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    pw = PackedWeight.from_quantized(quantize(w, bits, group_size))
    x = torch.randn(t, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    return (x, pw.qweight, pw.scales, pw.zeros, b, bits, group_size, n, k)


def to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# The ops on the packed format (entry point, reference). The checks that do not depend on their math
# run for both; test_quant_matmul_a8.py tests the int8 activations themselves.
OPS = {"quant_matmul": (quant_matmul, quant_matmul_reference),
       "quant_matmul_a8": (quant_matmul_a8, quant_matmul_a8_reference)}


def run(device: str, backend: str, args, op: str = "quant_matmul"):
    """``op(*args)`` (CPU tensors, moved to ``device``) on ``backend``, or skip."""
    skip_unless_runs(device, backend)
    if backend == "triton":
        return getattr(importlib.import_module(f"splice.kernels.{op}"), f"{op}_triton")(*to(device, args))
    assert backend_for(op, device) == backend
    return getattr(torch.ops.splice, op)(*to(device, args))


def relative_error(y, ref) -> float:
    return float((y.cpu().float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def assert_matches(y, args, op: str = "quant_matmul"):
    ref = OPS[op][1](*args)
    x = args[0]
    assert y.dtype == x.dtype and y.shape == ref.shape and y.is_contiguous()
    err = relative_error(y, ref)
    assert err <= TOL[x.dtype], f"relative error {err:.2e}"


# ---- quantizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["rtn", "rtn_sym", "rtn_int"])
@pytest.mark.parametrize("k,group_size", [(96, 64), (576, 128), (100, 32)])
def test_round_to_nearest_error_bound(bits, method, k, group_size):
    """Every weight is within s/2 of (q − z)·s, up to the float16 rounding of s and z."""
    w = heavy_tailed(13, k)
    q = quantize(w, bits, group_size, method)
    groups = math.ceil(k / group_size)
    assert q.codes.shape == (13, k) and q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits
    assert q.scales.shape == q.zeros.shape == (13, groups) and q.scales.dtype == q.zeros.dtype == torch.float16
    err = (w - dequantize_codes(q.codes, q.scales, q.zeros, group_size)).abs()
    s = q.scales.float().repeat_interleave(group_size, 1)[:, :k]
    assert bool((err <= s * (0.5 + 2**bits * 2**-10)).all())
    if method == "rtn_sym":
        assert bool((q.zeros == 2 ** (bits - 1)).all())
    if method == "rtn_int":
        assert bool((q.zeros == q.zeros.round()).all() and (q.zeros >= 0).all() and (q.zeros < 2**bits).all())


def test_symmetric_vs_asymmetric():
    """On a one-sided (all positive) weight the asymmetric grid is much finer than the symmetric one."""
    w = torch.rand(8, 128) + 1.0

    def err(method):
        q = quantize(w, 4, 64, method)
        return (w - dequantize_codes(q.codes, q.scales, q.zeros, 64)).pow(2).mean()

    assert err("rtn") * 10 < err("rtn_sym")


@pytest.mark.parametrize("bits", BITS)
def test_hqq_reduces_error_vs_rtn(bits):
    """HQQ refinement of the zero points lowers the reconstruction error of a heavy-tailed weight."""
    w = heavy_tailed(24, 576)

    def err(method):
        q = quantize(w, bits, 64, method)
        return (w - dequantize_codes(q.codes, q.scales, q.zeros, 64)).abs()

    rtn, hqq = err("rtn"), err("hqq")
    assert hqq.mean() < rtn.mean() and hqq.pow(2).mean() < rtn.pow(2).mean()


def test_constant_and_zero_groups_are_exact():
    """Asymmetric grids reproduce constant groups (the symmetric grid is only within s/2)."""
    w = torch.zeros(3, 70)
    w[1] = 0.25
    w[2, :32] = -3.0
    for method in ("rtn", "hqq"):
        q = quantize(w, 4, 32, method)
        torch.testing.assert_close(dequantize_codes(q.codes, q.scales, q.zeros, 32), w, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits"),
        (dict(group_size=48), "group_size"),
        (dict(method="gptq"), "method"),
        (dict(w=torch.ones(4)), r"\[N, K\]"),
        (dict(w=torch.ones(2, 4, dtype=torch.int32)), "float"),
        (dict(w=torch.tensor([[1.0, float("nan")]])), "non-finite"),
    ],
)
def test_quantize_rejects_bad_input(kwargs, match):
    args = dict(w=torch.randn(4, 64), bits=4, group_size=32, method="rtn") | kwargs
    with pytest.raises(ValueError, match=match):
        quantize(args.pop("w"), **args)


# ---- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 17, 96, 100, 576, 1536])
def test_pack_unpack_round_trip(bits, k):
    codes = torch.randint(0, 2**bits, (7, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, row_bytes(k, bits)) == (7, padded_k(k) * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_packed_layout_is_documented():
    """Spot checks of the documented layout (splice.ops.quant_packing): tiles, nibbles, planes."""
    k = torch.arange(64)
    assert pack_codes((k % 16).view(1, -1).to(torch.uint8), 4)[0, 3] == 3 | (3 << 4)  # codes 3 and 19
    c2 = torch.zeros(1, 64, dtype=torch.uint8)
    c2[0, 16 * 2 + 5] = 3  # tile 0, byte 5, bits 4-5
    assert pack_codes(c2, 2)[0].tolist() == [0] * 5 + [3 << 4] + [0] * 10
    c3 = torch.zeros(1, 64, dtype=torch.uint8)
    c3[0, 18] = 4 + 1  # high bit in plane byte 2, bit 2; low bits at byte 2, bits 2-3
    p3 = pack_codes(c3, 3)[0]
    assert p3[2] == 1 << 2 and p3[16 + 2] == 1 << 2 and int(p3.sum()) == 8


def test_packed_weight_fields_and_nbytes():
    q = quantize(torch.randn(10, 576), 4, 128)
    pw = PackedWeight.from_quantized(q)
    assert pw.shape == (10, 576) and pw.qweight.shape == (10, 288) and pw.scales.shape == (10, 5)
    assert pw.nbytes == 10 * 288 + 2 * 10 * 5 * 2
    torch.testing.assert_close(pw.dequantize(), dequantize_codes(q.codes, q.scales, q.zeros, 128))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=6), "bits"),
        (dict(group_size=16), "group_size"),
        (dict(shape=(10,)), "shape"),
        (dict(shape=(10, 512)), "qweight"),
        (dict(qweight=torch.zeros(10, 288, dtype=torch.int8)), "qweight"),
        (dict(scales=torch.zeros(10, 5)), "scales"),
        (dict(zeros=torch.zeros(10, 4, dtype=torch.float16)), "zeros"),
        (dict(scales=torch.zeros(5, 10, dtype=torch.float16).T), "contiguous"),
        (dict(zeros=[0.0]), "tensor"),
    ],
)
def test_packed_weight_validation(change, match):
    pw = PackedWeight.from_quantized(quantize(torch.randn(10, 576), 4, 128))
    fields = dict(qweight=pw.qweight, scales=pw.scales, zeros=pw.zeros, bits=4, group_size=128, shape=pw.shape)
    with pytest.raises((ValueError, TypeError), match=match):
        PackedWeight(**(fields | change))


# ---- quant_matmul backends -------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 2, 4, 5, 7, 16, 32, 33], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("n,k", [(7, 96), (24, 576), (5, 100), (17, 1536)])
def test_cpp_matches_reference(bits, group_size, dtype, t, n, k):
    """Every path: the multi-token kernel (t ≤ 32, partial row and token blocks), AVX-512's fused
    GEMV (t ≤ 4 where built) and prefill (GEMM); partial last groups, K not a multiple of 64."""
    args = make_case(t, n, k, bits, group_size, dtype, bias=t == 2, seed=t)
    assert_matches(run("cpu", "cpp", args), args)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_match_reference(device, backend, bits, group_size, dtype):
    args = make_case(3, 7, 96, bits, group_size, dtype, bias=True)
    assert_matches(run(device, backend, args), args)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t,n,k,bits,group_size", [(1, 40, 576, 4, 128), (19, 33, 100, 3, 32), (2, 9, 200, 2, 64)])
def test_backends_odd_shapes(device, backend, t, n, k, bits, group_size):
    args = make_case(t, n, k, bits, group_size, torch.float32)
    assert_matches(run(device, backend, args), args)


def test_smollm_shape_decode_and_prefill():
    """The real model's lm_head-like shape on the C++ kernel (a fraction of the rows, every path)."""
    for t in (1, 64):
        args = make_case(t, 3000, 576, 4, 128, torch.bfloat16, seed=3)
        assert_matches(run("cpu", "cpp", args), args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_tokens(device, backend, op):
    """No tokens: an empty [0, N] result in x's dtype (nothing else to compare)."""
    args = make_case(0, 7, 96, 4, 64, torch.bfloat16)
    y = run(device, backend, args, op)
    assert (y.shape, y.dtype) == ((0, 7), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_forced_backend_through_entry(device, backend, op):
    """splice.ops.<op> with the backend forced (the path library.call takes)."""
    skip_unless_runs(device, backend)
    args = make_case(2, 7, 96, 8, 32, torch.float32)
    with use_backend(backend):
        y = OPS[op][0](*to(device, args))
    assert_matches(y, args, op)


@pytest.mark.parametrize("bits", BITS)
def test_reference_is_dequantized_matmul(bits):
    """The reference against W written out element by element from the codes before packing, with a
    partial last group (K = 40, group 32) and bias; in float64."""
    g = torch.Generator().manual_seed(bits)
    n, k, group = 3, 40, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, 2, generator=g) + 0.5).half()
    zeros = (torch.rand(n, 2, generator=g) * 2**bits).half()
    x, bias = torch.randn(5, k, generator=g), torch.randn(n, generator=g)
    w = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            w[i, j] = (int(codes[i, j]) - float(zeros[i, j // group])) * float(scales[i, j // group])
    expected = x.double() @ w.T + bias.double()
    y = quant_matmul_reference(x, pack_codes(codes, bits), scales, zeros, bias, bits, group, n, k)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


OPCHECK_CASES = [
    (1, 4, 64, torch.float32, True), (6, 3, 32, torch.bfloat16, False), (2, 8, 128, torch.float32, False),
    (5, 2, 64, torch.float32, True),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("t,bits,group_size,dtype,bias", OPCHECK_CASES)
def test_opcheck(device, t, bits, group_size, dtype, bias, op):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = make_case(t, 9, 100, bits, group_size, dtype, bias=bias)
    torch.library.opcheck(getattr(torch.ops.splice, op), to(device, args))


BAD_ARGUMENTS = [  # (argument index, bad value, error message)
    (0, torch.randn(3, 95), "x must be"),
    (0, torch.randn(3, 96, dtype=torch.float16), "float32 or bfloat16"),
    (0, torch.randn(96), "x must be"),
    (1, torch.zeros(7, 47, dtype=torch.uint8), "qweight must be"),
    (1, torch.zeros(7, 48, dtype=torch.int8), "qweight must be"),
    (2, torch.zeros(7, 2), "scales must be"),
    (3, torch.zeros(7, 3, dtype=torch.float16), "zeros must be"),
    (4, torch.zeros(6), "bias must be"),
    (5, 5, "bits must be"),
    (6, 16, "group_size must be"),
    (7, 0, "must be positive"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("index,value,match", BAD_ARGUMENTS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_arguments_raise(device, backend, index, value, match, op):
    """Every backend, forced through the entry point, raises the C++ kernels' error."""
    skip_unless_runs(device, backend)
    args = list(make_case(3, 7, 96, 4, 64, torch.float32))
    args[index] = value
    with use_backend(backend), pytest.raises(RuntimeError, match=match):
        OPS[op][0](*to(device, args))


# ---- QuantLinear -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_quant_linear(bits):
    lin = torch.nn.Linear(100, 24)
    q = QuantLinear.from_linear(lin, bits, 32)
    assert {name for name, _ in q.named_buffers()} == {"qweight", "scales", "zeros", "bias"}
    assert not any(p.numel() for p in q.parameters())
    assert f"bits={bits}, group_size=32" in repr(q)
    x = torch.randn(2, 5, 100)
    y = q(x)
    assert y.shape == (2, 5, 24) and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ q.dequantize().T + lin.bias.detach(), atol=1e-4, rtol=1e-4)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < {2: 0.6, 3: 0.3, 4: 0.12, 8: 0.01}[bits]
    assert q.nbytes == 24 * row_bytes(100, bits) + 2 * 24 * 4 * 2
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_quant_linear_rejects_bad_bias():
    pw = PackedWeight.from_quantized(quantize(torch.randn(4, 64), 4, 32))
    with pytest.raises(ValueError, match="bias"):
        QuantLinear(pw, torch.zeros(5))


# ---- compile checks --------------------------------------------------------------------------

TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.quant_matmul import _quant_matmul_kernel as kernel

for dt in ("fp32", "bf16"):
    for bits in (2, 3, 4, 8):
        types = [f"*{dt}", "*u8", "*fp16", "*fp16", "*fp32", f"*{dt}"] + ["i32"] * 6 + ["constexpr"] * 6
        constexprs = dict(BITS=bits, GROUP=64, HAS_BIAS=bits == 4, BLOCK_T=16, BLOCK_N=32, BLOCK_K=64)
        source = ASTSource(kernel, dict(zip(kernel.arg_names, types)), constexprs)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernel_compiles_for_sm90():
    """The Triton kernel compiles (not interpreted) to sm_90 cubins for every width and dtype."""
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """quant_matmul_kernel.cuh (no torch headers) compiles, warning-free, for both dtypes and all widths."""
    compile_header(tmp_path, (
        '#include "quant_matmul_kernel.cuh"\n'
        + "".join(
            f"template cudaError_t splice::gpu::launch_quant_matmul<{t}>("
            f"const splice::gpu::QuantMatmulArgs<{t}>&, cudaStream_t);\n"
            for t in ("float", "__nv_bfloat16")
        )
    ))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    """csrc/cuda/quant_matmul.cu compiles against the installed torch's headers."""
    compile_launcher(tmp_path, "quant_matmul")
