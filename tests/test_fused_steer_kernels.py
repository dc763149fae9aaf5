"""Every backend of ``splice::fused_steer`` against the fp32 reference, the reference (and every
backend) against hand-derived results, bad arguments, opcheck, and nvcc checks.

Backends: the C++ CPU kernel (through the dispatcher), the Triton kernel (on CPU under
``TRITON_INTERPRET=1``, set in conftest.py; on CUDA when present), the C++ CUDA kernel (CUDA only)
and, where the expected result does not come from it, the reference. The CUDA sources are
compile-checked with nvcc wherever it is installed.
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
    skip_unless_runs,
)

from splice.ops import backend_for, fused_steer, use_backend
from splice.ops.steer_layout import ALPHA, BETA, END, HI, LO, NPARAMS, PHASE, START
from splice.ops.steer_reference import fused_steer_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {  # r and out are rounded to x.dtype; low-precision results may differ by one rounding step
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
# (alpha, beta, lo, hi): add, ablate, clamp, mixed, skipped (alpha = beta = 0)
KINDS = (
    (2.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 1.0, -0.25, 0.25), (0.5, 0.5, -1.0, 0.1), (0.0, 0.0, 0.0, 0.0)
)


def run(device: str, backend: str, args):
    """``fused_steer(*args)`` (CPU tensors, moved to ``device``) on ``backend``, or skip where it
    cannot run here. Compiled kernels run through the dispatcher, Triton and the reference directly."""
    skip_unless_runs(device, backend)
    if backend == "triton":
        from splice.kernels.fused_steer import fused_steer_triton

        return fused_steer_triton(*to(device, args))
    if backend == "reference":
        return fused_steer_reference(*args)
    assert backend_for("fused_steer", device) == backend
    return torch.ops.splice.fused_steer(*to(device, args))


def exact_rounding(device: str, backend: str, dtype: torch.dtype) -> bool:
    """Whether the backend rounds fp32 to ``dtype`` to nearest even. Triton's interpreter truncates
    fp32 -> bfloat16 casts (compiled Triton rounds to nearest even)."""
    return not (device == "cpu" and backend == "triton" and dtype == torch.bfloat16)


def make_case(t, h, dtype, *, delta=True, weight=True, weight_offset=0.0, slots=4, entries=5, seed=0):
    """Arguments of fused_steer: unit vectors, entries of every kind/phase and assorted windows.
    Row i uses slot (i + 1) % slots, so a single decode row is steered and row slots - 1 is not."""
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(slots, entries, h, generator=g)
    vecs /= vecs.norm(dim=-1, keepdim=True)
    params = torch.zeros(slots, entries, NPARAMS)
    for s in range(slots):
        for k in range(entries):
            params[s, k, [ALPHA, BETA, LO, HI]] = torch.tensor(KINDS[(s + k) % len(KINDS)])
            params[s, k, PHASE] = (s * entries + k) % 3
    params[..., START] = torch.randint(0, 6, (slots, entries), generator=g).float()
    params[..., END] = params[..., START] + torch.randint(1, 12, (slots, entries), generator=g).float()
    return (
        torch.randn(t, h, generator=g).mul(2).to(dtype),
        torch.randn(t, h, generator=g).to(dtype) if delta else None,
        vecs,
        params,
        (torch.arange(t, dtype=torch.int32) + 1) % slots,
        torch.randint(0, 12, (t,), generator=g),
        torch.rand(t, generator=g) < 0.5,
        torch.randn(h, generator=g) if weight else None,
        1e-6,
        weight_offset,
    )


def to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


VARIANTS = [  # (delta, weight, weight_offset)
    pytest.param(True, True, 0.0, id="delta-w"),
    pytest.param(True, False, 0.0, id="delta-noweight"),
    pytest.param(False, True, 1.0, id="nodelta-w+1"),
    pytest.param(False, False, 0.0, id="nodelta-noweight"),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t,h", [(7, 37), (1, 576), (5, 100)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("delta,weight,weight_offset", VARIANTS)
def test_matches_reference(device, backend, t, h, dtype, delta, weight, weight_offset):
    args = make_case(t, h, dtype, delta=delta, weight=weight, weight_offset=weight_offset)
    r, out = run(device, backend, args)
    ref_r, ref_out = fused_steer_reference(*args)
    assert r.dtype == dtype and r.shape == (t, h) and out.dtype == dtype
    torch.testing.assert_close(r.cpu(), ref_r, **TOL[dtype])
    if weight:
        torch.testing.assert_close(out.cpu(), ref_out, **TOL[dtype])
    else:
        assert out.numel() == 0
    unsteered = args[4] == 0  # slot 0 rows: r is x (+ delta), rounded once
    if not delta:
        assert torch.equal(r.cpu()[unsteered], args[0][unsteered])
    elif exact_rounding(device, backend, dtype):
        assert torch.equal(r.cpu()[unsteered], ref_r[unsteered])


def test_case_exercises_windows_and_phases():
    """The reference case above has active and inactive entries of every phase on steered rows."""
    from splice.ops.steer_reference import entry_active

    _, _, _, params, slot, pos, gen, *_ = make_case(64, 8, torch.float32)
    p = params.index_select(0, slot.long())
    active = entry_active(p, pos, gen) & (slot != 0)[:, None]
    for phase in range(3):
        on_phase = (p[..., PHASE] == phase) & (slot != 0)[:, None]
        assert active[on_phase].any() and not active[on_phase].all()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("phase,rows", [(0, [2, 3]), (1, [2]), (2, [3])], ids=["all", "prompt", "generated"])
def test_window_and_phase_select_rows(device, backend, phase, rows):
    """One add entry with window [2, 4): only rows in the window whose phase matches change."""
    t, h = 6, 37
    params = torch.zeros(2, 1, NPARAMS)
    params[1, 0, [ALPHA, START, END, PHASE]] = torch.tensor([1.0, 2.0, 4.0, float(phase)])
    x = torch.randn(t, h)
    args = (x, None, torch.ones(2, 1, h), params, torch.ones(t, dtype=torch.int32), torch.arange(t),
            torch.tensor([False, False, False, True, True, True]), None, 1e-6, 0.0)
    r, _ = run(device, backend, args)
    changed = [i for i in range(t) if not torch.equal(r[i].cpu(), x[i])]
    assert changed == rows
    torch.testing.assert_close(r.cpu()[rows], x[rows] + 1.0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (-0.5, 0.5)], ids=["ablate", "clamp"])
def test_clamp_and_ablate_projection(device, backend, lo, hi):
    """beta = 1 on a unit v clamps <r, v> into [lo, hi] and leaves the orthogonal part alone."""
    t, h = 4, 100
    v = torch.randn(h)
    v /= v.norm()
    params = torch.zeros(2, 1, NPARAMS)
    params[1, 0, [BETA, LO, HI, END]] = torch.tensor([1.0, lo, hi, 100.0])
    x = torch.randn(t, h) + torch.tensor([3.0, -3.0, 0.2, 0.0])[:, None] * v
    args = (x, None, v.expand(2, 1, h).contiguous(), params, torch.ones(t, dtype=torch.int32),
            torch.arange(t), torch.zeros(t, dtype=torch.bool), None, 1e-6, 0.0)
    r, _ = run(device, backend, args)
    r = r.cpu()
    proj, proj_x = r @ v, x @ v
    torch.testing.assert_close(proj, proj_x.clamp(lo, hi), atol=1e-5, rtol=0)
    torch.testing.assert_close(r - proj[:, None] * v, x - proj_x[:, None] * v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_hand_computed_case(device, backend):
    """Two entries applied in order (add along e0, then ablate along v = (0.6, 0.8)) to delta, added
    to x, then RMSNorm with weight + offset; worked out by hand. Token 1 is outside the entries'
    window [0, 5) and token 2 is in slot 0, so both are x + delta.

    Token 0: u = (3, 4) + e0 = (4, 4); <u, v> = 5.6, u -= 5.6 v -> (0.64, -0.48); r = (0, 0) + u.
    out = r / sqrt(mean(r^2)) * (w + 0.5) = r / sqrt(0.32) * (1.5, 2.5) = (1.697056, -2.121320).
    Tokens 1, 2: r = (4, 5), out = (4, 5) / sqrt(20.5) * (1.5, 2.5) = (1.325178, 2.760788).
    (Ablating first would give r = (1, 0) for token 0.)"""
    params = torch.zeros(2, 2, NPARAMS)
    params[1, 0, [ALPHA, END]] = torch.tensor([1.0, 5.0])
    params[1, 1, [BETA, END]] = torch.tensor([1.0, 5.0])
    vecs = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.6, 0.8]]])
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    delta = torch.tensor([[3.0, 4.0]]).expand(3, 2).contiguous()
    args = (x, delta, vecs, params, torch.tensor([1, 1, 0], dtype=torch.int32), torch.tensor([0, 5, 0]),
            torch.zeros(3, dtype=torch.bool), torch.tensor([1.0, 2.0]), 0.0, 0.5)
    r, out = run(device, backend, args)
    torch.testing.assert_close(r.cpu(), torch.tensor([[0.64, -0.48], [4.0, 5.0], [4.0, 5.0]]), atol=1e-6, rtol=1e-6)
    expected = torch.tensor([[1.697056, -2.121320], [1.325178, 2.760788], [1.325178, 2.760788]])
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_slot_ignored_without_table(device, backend):
    """Without vecs/params nothing is steered and slot values index nothing, so any value is allowed."""
    x = torch.randn(3, 37)
    args = (x, None, None, None, torch.tensor([0, 7, -3], dtype=torch.int32), torch.arange(3),
            torch.zeros(3, dtype=torch.bool), None, 1e-6, 0.0)
    r, _ = run(device, backend, args)
    assert torch.equal(r.cpu(), x)


def _bad(**over):
    """make_case's arguments (4 slots, 5 entries, 3 tokens, hidden 8) with some replaced by name."""
    names = ("x", "delta", "vecs", "params", "slot", "pos", "gen", "weight", "eps", "weight_offset")
    args = dict(zip(names, make_case(3, 8, torch.float32)))
    args.update(over)
    return tuple(args.values())


BAD_ARGS = {  # name: (args, exception, message)
    "slot = slots": (_bad(slot=torch.tensor([1, 4, 0], dtype=torch.int32)), IndexError,
                     r"slot\[1\] = 4 is out of range for 4 slots"),
    "slot negative": (_bad(slot=torch.tensor([0, 1, -1], dtype=torch.int32)), IndexError,
                      r"slot\[2\] = -1 is out of range for 4 slots"),
    "slot, table of no entries": (_bad(vecs=torch.zeros(4, 0, 8), params=torch.zeros(4, 0, NPARAMS),
                                       slot=torch.tensor([0, 9, 0], dtype=torch.int32)), IndexError,
                                  r"slot\[1\] = 9 is out of range for 4 slots"),
    "x 1-d": (_bad(x=torch.zeros(8), delta=None), RuntimeError, r"x must be \[tokens, hidden\]"),
    "x int": (_bad(x=torch.zeros(3, 8, dtype=torch.int32), delta=None), RuntimeError, "x must be float32"),
    "delta shape": (_bad(delta=torch.zeros(3, 7)), RuntimeError, "delta must match x"),
    "delta dtype": (_bad(delta=torch.zeros(3, 8, dtype=torch.float16)), RuntimeError, "delta must match x"),
    "vecs alone": (_bad(params=None), RuntimeError, "vecs and params go together"),
    "vecs float64": (_bad(vecs=torch.zeros(4, 5, 8, dtype=torch.float64)), RuntimeError, "vecs must be float32"),
    "vecs hidden": (_bad(vecs=torch.zeros(4, 5, 7)), RuntimeError, "vecs must be float32"),
    "params width": (_bad(params=torch.zeros(4, 5, NPARAMS - 1)), RuntimeError, "params must be float32"),
    "params slots": (_bad(params=torch.zeros(3, 5, NPARAMS)), RuntimeError, "params must be float32"),
    "slot int64": (_bad(slot=torch.zeros(3, dtype=torch.int64)), RuntimeError, "slot must be int32"),
    "slot length": (_bad(slot=torch.zeros(2, dtype=torch.int32)), RuntimeError, "slot must be int32"),
    "pos int32": (_bad(pos=torch.zeros(3, dtype=torch.int32)), RuntimeError, "pos must be int64"),
    "gen uint8": (_bad(gen=torch.zeros(3, dtype=torch.uint8)), RuntimeError, "gen must be bool"),
    "weight length": (_bad(weight=torch.ones(7)), RuntimeError, r"weight must be \[hidden\]"),
}


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments_raise(device, backend, case):
    """Every backend, forced through the entry point, raises the C++ kernels' error."""
    args, error, message = BAD_ARGS[case]
    skip_unless_runs(device, backend)
    with use_backend(backend), pytest.raises(error, match=message):
        fused_steer(*to(device, args))


def test_triton_kernel_leaves_out_of_range_slot_unsteered():
    """Past the host checks (which CUDA tensors skip), the Triton kernel itself reads no table row for
    an out-of-range slot and leaves its token unsteered. The table is rows 1-2 of a 4-slot one whose
    rows 0 and 3 (what slots -1 and 2 would read) steer every token, so a stray read shows."""
    skip_unless_runs("cpu", "triton")
    from splice.kernels.fused_steer import _launch

    x, delta, vecs, params, _, pos, gen, weight, eps, offset = make_case(4, 37, torch.float32)
    params[[0, 3], :, ALPHA] = 1.0
    params[[0, 3], :, START], params[[0, 3], :, END], params[[0, 3], :, PHASE] = 0.0, 1e6, 0.0
    slot = torch.tensor([1, 2, -1, 0], dtype=torch.int32)
    r, out = _launch(x, delta, vecs[1:3], params[1:3], slot, pos, gen, weight, eps, offset)
    ref_r, _ = fused_steer_reference(x, delta, vecs[1:3], params[1:3], slot.clamp(0, 1), pos, gen, weight,
                                           eps, offset)
    plain_r, plain_out = fused_steer_reference(x, delta, None, None, slot, pos, gen, weight, eps, offset)
    torch.testing.assert_close(r[[0, 3]], ref_r[[0, 3]], **TOL[torch.float32])
    torch.testing.assert_close(r[1:3], plain_r[1:3], **TOL[torch.float32])
    torch.testing.assert_close(out[1:3], plain_out[1:3], **TOL[torch.float32])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "dtype,delta,steer,weight,weight_offset",
    [
        (torch.float32, True, True, True, 1.0),
        (torch.bfloat16, False, True, True, 0.0),
        (torch.float16, True, False, False, 0.0),
        (torch.float32, False, False, False, 0.0),
    ],
)
def test_opcheck(device, dtype, delta, steer, weight, weight_offset):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = list(make_case(5, 37, dtype, delta=delta, weight=weight, weight_offset=weight_offset))
    if not steer:
        args[2] = args[3] = None
    torch.library.opcheck(torch.ops.splice.fused_steer, to(device, args))


TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.fused_steer import _fused_steer_kernel as kernel

for dt in ("fp32", "bf16", "fp16"):
    for flag in (True, False):
        types = [f"*{dt}", f"*{dt}", "*fp32", "*fp32", "*i32", "*i64", "*u8", "*fp32", f"*{dt}", f"*{dt}",
                 "i32", "i32", "i32", "fp32", "fp32", "constexpr", "constexpr", "constexpr", "constexpr"]
        constexprs = dict(HAS_DELTA=flag, HAS_VECS=flag, HAS_WEIGHT=flag, BLOCK=1024)
        source = ASTSource(kernel, dict(zip(kernel.arg_names, types)), constexprs)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernel_compiles_for_sm90():
    """The Triton kernel compiles (not interpreted) to sm_90 cubins for every dtype and flag set; no
    GPU is needed. Runs in a subprocess because TRITON_INTERPRET is read when the kernel is defined."""
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """fused_steer_kernel.cuh (no torch headers) compiles, warning-free, for all three dtypes."""
    compile_header(tmp_path, (
        '#include "fused_steer_kernel.cuh"\n'
        + "".join(
            f"template cudaError_t splice::gpu::launch_fused_steer<{t}>("
            f"const splice::gpu::SteerArgs<{t}>&, cudaStream_t);\n"
            for t in ("float", "__nv_bfloat16", "__half")
        )
    ))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    """csrc/cuda/fused_steer.cu compiles against the installed torch's headers."""
    compile_launcher(tmp_path, "fused_steer")
