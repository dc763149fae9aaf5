"""Every backend of ``splice::index_attention`` against the fp32 reference, the reference against the
contract written out as loops and against ``splice::decode_attention`` (every slot chosen), fake
tensors and opcheck, bad arguments, out-of-range indices, and compile checks of the Triton and CUDA
kernels.

Backends are forced with :func:`splice.ops.use_backend`: the C++ CPU kernel, the Triton kernel (on CPU
under ``TRITON_INTERPRET=1``, set in conftest.py, at small shapes; on CUDA when present), the C++ CUDA
kernel (CUDA only) and, for argument errors, the reference.
"""

from __future__ import annotations

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
)
from test_attention_kernels import TOL, assert_close, loop_attention, run
from torch._subclasses.fake_tensor import FakeTensorMode

from splice.ops import decode_attention, index_attention
from splice.ops.index_attention_reference import index_attention_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, Hq, Hkv, L, D, K): GQA groups 3 and 1, K below L and above it (padded with -1), K across several
# blocks of 64, head sizes that are not a multiple of 16.
SHAPES = [(3, 6, 2, 45, 16, 20), (2, 3, 3, 200, 24, 150), (2, 9, 3, 30, 20, 41), (1, 6, 2, 1, 8, 3)]


def index_case(b, hq, hkv, length, d, count, dtype, seed=0):
    """Inputs with ``count`` entries per (row, KV head): distinct slots in scrambled order, about a quarter
    of them -1, the rest -1 where count > length; row 1 (where it exists) has no slot for KV head 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, length, d, generator=g).to(dtype) for _ in range(2))
    idx = torch.full((b, hkv, count), -1, dtype=torch.int64)
    for r in range(b):
        for h in range(hkv):
            slots = torch.randperm(length, generator=g)[:count]
            idx[r, h, torch.randperm(count, generator=g)[: slots.numel()]] = slots
    idx[torch.rand(idx.shape, generator=g) < 0.25] = -1
    if b > 1:
        idx[1, 0] = -1
    return q, k, v, idx, d**-0.5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape):
    """Skipped (-1) entries, K below and above L, GQA and MHA; a KV head with no slot gives 0 for the
    query heads of its group."""
    args = index_case(*shape, dtype)
    out = run(device, backend, index_attention, *args)
    assert_close(out, index_attention_reference(*args), dtype)
    if shape[0] > 1:
        group = shape[1] // shape[2]
        assert torch.equal(out[1, :group].cpu(), torch.zeros_like(out[1, :group].cpu()))
        assert out[1, group:].abs().sum() > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_matches_reference(device, backend, dtype):
    """Gemma 2's logit soft-capping, on scores large enough that the cap changes them (|s| up to ~10
    against a cap of 2)."""
    q, k, v, idx, scale = index_case(3, 6, 2, 45, 16, 30, dtype)
    args = (q * 3, k, v, idx, scale, 2.0)
    ref = index_attention_reference(*args)
    assert not torch.allclose(ref.float(), index_attention_reference(*args[:-1]).float(), atol=1e-2)
    assert_close(run(device, backend, index_attention, *args), ref, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_long_index_is_split(device, backend):
    """K long enough that the C++ kernel splits one (row, KV head) over chunks of idx and merges them."""
    length, count = (300, 250) if backend == "triton" and device == "cpu" else (2500, 2100)
    args = index_case(1, 3, 1, length, 16, count, torch.float32)
    assert_close(run(device, backend, index_attention, *args), index_attention_reference(*args), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_strided_inputs(device, backend, dtype):
    """q as a [B, H, D] view of [H, B, D]; k and v the first L slots of a longer cache (strided along
    every dimension but the head dimension, read in place); and a v strided along D (copied)."""
    q, k, v, idx, scale = index_case(2, 6, 2, 40, 16, 25, dtype)
    ref = index_attention_reference(q, k, v, idx, scale)
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    k_long, v_long = (torch.cat([t, torch.randn_like(t[:, :, :9])], dim=2) for t in (k, v))
    v_wide = torch.stack([v, torch.full_like(v, float("nan"))], dim=-1)
    assert not q_view.is_contiguous()
    for kk, vv in ((k_long[:, :, :40], v_long[:, :, :40]), (k, v_wide[..., 0])):
        assert not vv.is_contiguous()
        assert_close(run(device, backend, index_attention, q_view, kk, vv, idx, scale), ref, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_inputs(device, backend):
    """No entries (K = 0) and an empty cache with only skipped entries give 0; no rows gives no rows."""
    q, k, v, idx, scale = index_case(2, 6, 2, 9, 8, 4, torch.float32)
    out = run(device, backend, index_attention, q, k, v, idx[:, :, :0], scale)
    assert torch.equal(out.cpu(), torch.zeros_like(q))
    none = torch.full_like(idx, -1)
    out = run(device, backend, index_attention, q, k[:, :, :0], v[:, :, :0], none, scale)
    assert torch.equal(out.cpu(), torch.zeros_like(q))
    assert run(device, backend, index_attention, q[:0], k[:0], v[:0], idx[:0], scale).shape == (0, 6, 8)


@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_reference_is_the_contract(softcap):
    """Each query over the slots its KV head's entries name (skipping -1), GQA, a head with none."""
    q, k, v, idx, scale = index_case(3, 6, 2, 9, 4, 7, torch.float32)
    chosen = [[set(idx[b, g][idx[b, g] >= 0].tolist()) for g in range(2)] for b in range(3)]
    expected = loop_attention(q[:, :, None], k, v, scale, lambda b, g, i, j: j in chosen[b][g], softcap)[:, :, 0]
    torch.testing.assert_close(index_attention_reference(q, k, v, idx, scale, softcap).double(), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_slots_is_decode_attention(device, backend):
    """idx naming every slot (in any order) is decode_attention with every slot valid; naming a row's
    valid slots (the same for every KV head, -1 elsewhere) is decode_attention over that mask."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, length, d = 3, 6, 2, 70, 16
    q = torch.randn(b, hq, d, generator=g)
    k, v = (torch.randn(b, hkv, length, d, generator=g) for _ in range(2))
    every = torch.stack([torch.randperm(length, generator=g) for _ in range(b * hkv)]).view(b, hkv, length)
    ones = torch.ones(b, length, dtype=torch.bool)
    expected = run(device, backend, decode_attention, q, k, v, ones, 0.3)
    torch.testing.assert_close(run(device, backend, index_attention, q, k, v, every, 0.3), expected, **TOL[q.dtype])
    valid = torch.rand(b, length, generator=g) > 0.4
    slots = torch.where(valid, torch.arange(length), -1)[:, None].expand(b, hkv, length)
    expected = run(device, backend, decode_attention, q, k, v, valid, 0.3, 1.5)
    torch.testing.assert_close(run(device, backend, index_attention, q, k, v, slots, 0.3, 1.5), expected,
                               **TOL[q.dtype])


def _args(**over):
    args = dict(zip(("q", "k", "v", "idx", "scale"), index_case(1, 4, 2, 6, 8, 3, torch.float32)))
    args.update(over)
    return tuple(args.values())


BAD_ARGS = {  # name: (args, message)
    "idx int32": (_args(idx=torch.zeros(1, 2, 3, dtype=torch.int32)), "idx must be int64"),
    "idx 2-d": (_args(idx=torch.zeros(1, 3, dtype=torch.int64)), "idx must be int64"),
    "idx batch": (_args(idx=torch.zeros(2, 2, 3, dtype=torch.int64)), "idx must be int64"),
    "idx heads": (_args(idx=torch.zeros(1, 4, 3, dtype=torch.int64)), "idx must be int64"),
    "q int": (_args(q=torch.zeros(1, 4, 8, dtype=torch.int32)), "q must be float32"),
    "q 4-d": (_args(q=torch.zeros(1, 4, 1, 8)), "q must be 3-d"),
    "k dtype": (_args(k=torch.zeros(1, 2, 6, 8, dtype=torch.bfloat16)), "k must be"),
    "v shape": (_args(v=torch.zeros(1, 2, 5, 8)), "v must have k's shape"),
    "head size": (_args(q=torch.zeros(1, 4, 4)), "head size"),
    "heads not a multiple": (_args(q=torch.zeros(1, 3, 8)), "multiple of KV heads"),
    "negative softcap": ((*_args(), -1.0), "softcap must be"),
    "infinite softcap": ((*_args(), float("inf")), "softcap must be"),
}


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments_raise(device, backend, case):
    args, message = BAD_ARGS[case]
    with pytest.raises(RuntimeError, match=message):
        run(device, backend, index_attention, *args)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_index_out_of_range_raises(backend):
    """On CPU tensors every backend checks the entries on the host first, with the C++ kernel's message
    naming the first bad entry; -1 entries are fine. On CUDA the kernels assert on the device instead,
    which cannot be run here."""
    q, k, v, idx, scale = index_case(2, 4, 2, 7, 8, 5, torch.float32)
    idx[1, 0, 2], idx[1, 1, 0] = 7, 12
    with pytest.raises(IndexError, match=r"index_attention: idx\[1, 0, 2\] = 7 is out of range for 7 slots"):
        run("cpu", backend, index_attention, q, k, v, idx, scale)


def test_fake_tensors():
    """Under FakeTensorMode the op gives q's shape and dtype, and rejects bad shapes with the same
    messages; nothing reads index values there."""
    q, k, v, idx, scale = index_case(2, 6, 2, 9, 8, 4, torch.bfloat16)
    with FakeTensorMode() as mode:
        fq, fk, fv, fi = (mode.from_tensor(t) for t in (q, k, v, idx))
        out = torch.ops.splice.index_attention(fq, fk, fv, fi, scale)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="idx must be int64"):
            torch.ops.splice.index_attention(fq, fk, fv, fi[0], scale)
        with pytest.raises(RuntimeError, match="softcap must be"):
            torch.ops.splice.index_attention(fq, fk, fv, fi, scale, -2.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, k, v, idx, scale = (a.to(device) if isinstance(a, torch.Tensor) else a
                           for a in index_case(2, 6, 2, 13, 8, 9, dtype))
    torch.library.opcheck(torch.ops.splice.index_attention, (q, k, v, idx, scale))
    torch.library.opcheck(torch.ops.splice.index_attention, (q, k, v, idx, scale, 1.5))
    torch.library.opcheck(torch.ops.splice.index_attention, (q.transpose(0, 1).contiguous().transpose(0, 1),
                                                             k[:, :, :10], v[:, :, :10], torch.where(idx < 10, idx, -1),
                                                             scale))


TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.index_attention import _index_attention_kernel as kernel

for dt in ("fp32", "bf16", "fp16"):
    types = [f"*{dt}", f"*{dt}", f"*{dt}", "*i64", f"*{dt}", "fp32", "fp32"] + ["i32"] * 4 + ["i64"] * 6
    consts = dict(D=64, GROUP_PAD=4, BLOCK_N=32, BLOCK_D=64)
    signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(consts)))
    assert triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernel_compiles_for_sm90():
    """The Triton kernel compiles (not interpreted) to sm_90 cubins for every dtype; in a subprocess
    because TRITON_INTERPRET is read when the kernel is defined."""
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """index_attention_kernel.cuh (no torch headers) compiles warning-free for every dtype, with and
    without NDEBUG."""
    compile_header(tmp_path, (
        '#include "index_attention_kernel.cuh"\n'
        + "".join(
            f"template cudaError_t splice::gpu::launch_index_attention<{t}>("
            f"const splice::gpu::IndexAttentionArgs<{t}>&, cudaStream_t);\n"
            for t in ("float", "__nv_bfloat16", "__half")
        )
    ), (), ("-DNDEBUG",))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    """csrc/cuda/index_attention.cu compiles against the installed torch's headers."""
    compile_launcher(tmp_path, "index_attention")
