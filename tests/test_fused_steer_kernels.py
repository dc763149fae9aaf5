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
from splice.ops.steer_layout import (
    ALPHA, BETA, END, GATED, HI, INDEX, KIND, KIND_GATE, KIND_PROJECT, KIND_READ, KIND_SCALE, KIND_WRITE, LO,
    MAX_RANK, NPARAMS, PHASE, PHASE_ALL, START,
)
from splice.ops.steer_reference import entry_active, fused_steer_reference, steer_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {  # r and out are rounded to x.dtype; low-precision results may differ by one rounding step
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
INF = float("inf")
# One slot's program, rows (kind, alpha, beta, lo, hi, gated, index); slot s runs it rotated by 5·s entries.
PROGRAM = (
    (KIND_PROJECT, 2.0, 0.0, 0.0, 0.0, 0, 0),  # add
    (KIND_GATE, 4.0, 0.0, 0.0, 0.0, 0, -1),  # soft token gate on <u, v>
    (KIND_PROJECT, 1.5, 0.0, 0.0, 0.0, 1, 0),  # gated add
    (KIND_PROJECT, 0.0, 1.0, 0.0, 0.0, 0, 0),  # ablate
    (KIND_GATE, INF, 0.0, 0.1, 0.0, 0, -1),  # hard token gate
    (KIND_PROJECT, 1.0, 0.0, 0.0, 0.0, 1, 0),  # gated add
    (KIND_READ, 0.0, 0.0, 0.0, 0.0, 0, 0),  # a rank-2 map: two reads,
    (KIND_READ, 0.0, 0.0, 0.0, 0.0, 0, MAX_RANK - 1),
    (KIND_READ, 0.0, 0.0, 0.0, 0.0, 0, MAX_RANK),  # reads of no register (they do nothing),
    (KIND_READ, 0.0, 0.0, 0.0, 0.0, 0, -1),
    (KIND_WRITE, 0.8, 0.0, 0.1, 0.0, 0, 0),  # then two writes (one gated)
    (KIND_WRITE, -0.5, 0.0, -0.2, 0.0, 1, MAX_RANK - 1),
    (KIND_WRITE, 1.0, 0.0, 0.5, 0.0, 0, MAX_RANK),  # a write of no register (does nothing)
    (KIND_GATE, 10.0, 1.0, 0.05, 0.0, 0, -1),  # cosine gate
    (KIND_PROJECT, 0.0, 1.0, -0.25, 0.25, 1, 0),  # gated clamp
    (KIND_SCALE, -1.0, 0.0, 0.0, 0.0, 1, 0),  # gated scale (zeroes v's dimensions)
    (KIND_GATE, 0.0, 0.0, 0.0, 0.0, 0, 1),  # row gate 1
    (KIND_SCALE, 0.5, 0.0, 0.0, 0.0, 0, 0),  # scale (v's dimensions by 1.5)
    (KIND_PROJECT, 1.0, 0.0, 0.0, 0.0, 1, 0),  # gated add
    (KIND_GATE, 0.0, 0.0, 0.0, 0.0, 0, 5),  # row gate past the last one: 0
    (KIND_PROJECT, 0.5, 0.5, -1.0, 0.1, 1, 0),  # gated mixed
    (KIND_PROJECT, 0.0, 0.0, 0.0, 0.0, 0, 0),  # skipped (alpha = beta = 0)
)
ENTRIES = len(PROGRAM)
NUM_GATES = 2


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


def make_case(t, h, dtype, *, delta=True, weight=True, weight_offset=0.0, slots=4, seed=0):
    """Arguments of fused_steer: PROGRAM in every slot (rotated), every phase, assorted windows, unit
    vectors (0/1 masks for scale entries) and NUM_GATES row gates in [0, 1). Row i uses slot
    (i + 1) % slots, so a single decode row is steered and row slots - 1 is not."""
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(slots, ENTRIES, h, generator=g)
    vecs /= vecs.norm(dim=-1, keepdim=True)
    params = torch.zeros(slots, ENTRIES, NPARAMS)
    for s in range(slots):
        for k in range(ENTRIES):
            kind, *fields = PROGRAM[(k + 5 * s) % ENTRIES]
            params[s, k, [KIND, ALPHA, BETA, LO, HI, GATED, INDEX]] = torch.tensor([kind, *fields]).float()
            params[s, k, PHASE] = (s * ENTRIES + k) % 3
            if kind == KIND_SCALE:
                vecs[s, k] = (torch.rand(h, generator=g) < 0.5).float()
    params[..., START] = torch.randint(0, 6, (slots, ENTRIES), generator=g).float()
    params[..., END] = params[..., START] + torch.randint(1, 12, (slots, ENTRIES), generator=g).float()
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
        torch.rand(t, NUM_GATES, generator=g),
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
@pytest.mark.parametrize("t,h", [(7, 37), (1, 576), (5, 100), (24, 64)])
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
    """The reference case above (its largest shape) has, on steered rows: active and inactive entries
    of every phase; active entries of every kind, each of which matters (emptying the windows of one
    kind changes the result); active reads and writes of no register; and gated adds whose gate
    factor f = <Δu, v>/alpha (Δu measured on the reference's program prefixes) is 0 on some tokens,
    1 on others, and strictly between on others."""
    _, delta, vecs, params, slot, pos, gen, *_, gates = make_case(24, 64, torch.float32)
    p = params.index_select(0, slot.long())
    steered = (slot != 0)[:, None]
    active = entry_active(p, pos, gen) & steered
    for phase in range(3):
        on_phase = (p[..., PHASE] == phase) & steered
        assert active[on_phase].any() and not active[on_phase].all()
    full = steer_reference(delta, vecs, params, slot, pos, gen, gates)
    for kind in (KIND_PROJECT, KIND_GATE, KIND_SCALE, KIND_READ, KIND_WRITE):
        assert active[p[..., KIND] == kind].any()
        emptied = params.clone()
        emptied[..., END] = torch.where(params[..., KIND] == kind, emptied[..., START], emptied[..., END])
        assert not torch.allclose(steer_reference(delta, vecs, emptied, slot, pos, gen, gates), full, atol=1e-3)
    no_register = ((p[..., KIND] == KIND_READ) | (p[..., KIND] == KIND_WRITE)) & (
        (p[..., INDEX] < 0) | (p[..., INDEX] >= MAX_RANK)
    )
    assert active[no_register].any()
    prefixes = [steer_reference(delta, vecs[:, :k], params[:, :k], slot, pos, gen, gates)
                for k in range(ENTRIES + 1)]
    gated_add = active & (p[..., KIND] == KIND_PROJECT) & (p[..., GATED] == 1) & (p[..., BETA] == 0) & (
        p[..., ALPHA] != 0
    )
    v = vecs.index_select(0, slot.long())
    step = torch.stack([((prefixes[k + 1] - prefixes[k]) * v[:, k]).sum(-1) for k in range(ENTRIES)], 1)
    f = (step / p[..., ALPHA])[gated_add]
    assert (f.abs() < 1e-6).any() and ((f - 1).abs() < 1e-5).any() and ((f > 0.01) & (f < 0.99)).any()


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


def entry(kind, v, *, alpha=0.0, beta=0.0, lo=0.0, start=0.0, end=100.0, gated=0, index=0):
    """(v, params row) of one entry of phase PHASE_ALL (hi = 0)."""
    row = torch.zeros(NPARAMS)
    row[[KIND, ALPHA, BETA, LO, START, END, PHASE, GATED, INDEX]] = torch.tensor(
        [kind, alpha, beta, lo, start, end, PHASE_ALL, gated, index], dtype=torch.float32
    )
    return torch.tensor(v, dtype=torch.float32), row


def program(x, *entries, pos=None, gates=None):
    """fused_steer arguments running ``entries`` in order (slot 1 of a 2-slot table) on every row
    of x (no delta, no weight; prompt tokens at positions ``pos``, default 0..T-1)."""
    t = x.shape[0]
    vecs = torch.stack([torch.zeros(len(entries), x.shape[1]), torch.stack([v for v, _ in entries])])
    params = torch.stack([torch.zeros(len(entries), NPARAMS), torch.stack([p for _, p in entries])])
    return (x, None, vecs, params, torch.ones(t, dtype=torch.int32), torch.arange(t) if pos is None else pos,
            torch.zeros(t, dtype=torch.bool), None, 1e-6, 0.0, gates)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_soft_token_gate(device, backend):
    """A cosine gate on e0 (beta = 1, lo = b = 0.2, alpha = 1/τ = 2), then a gated add of 2·e1:
    g = sigmoid((cos − 0.2)·2), u += 2g·e1.

    Token 0: u = (3, 4), cos = 3/5 = 0.6, g = sigmoid(0.8) = 1/(1 + e^-0.8) = 0.689974, r = (3, 5.379949).
    Token 1: u = (-4, 3), cos = -0.8, g = sigmoid(-2) = 0.119203, r = (-4, 3.238406).
    (The raw score <u, e0> = 3 would give g = sigmoid(5.6) = 0.996 for token 0.)"""
    x = torch.tensor([[3.0, 4.0], [-4.0, 3.0]])
    args = program(x, entry(KIND_GATE, [1.0, 0.0], alpha=2.0, beta=1.0, lo=0.2, index=-1),
                   entry(KIND_PROJECT, [0.0, 1.0], alpha=2.0, gated=1))
    r, _ = run(device, backend, args)
    torch.testing.assert_close(r.cpu(), torch.tensor([[3.0, 5.379949], [-4.0, 3.238406]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_hard_token_gate(device, backend):
    """A hard gate (alpha = +inf) g = [<u, e0> > 1], then a gated add of 3·e1.

    Token 0: <u, e0> = 2 > 1, g = 1, r = (2, 0) + (0, 3) = (2, 3). Token 1: 0.5, g = 0, r = (0.5, 0).
    Token 2: 1 is not above 1, g = 0, r = (1, 0)."""
    x = torch.tensor([[2.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    args = program(x, entry(KIND_GATE, [1.0, 0.0], alpha=INF, lo=1.0, index=-1),
                   entry(KIND_PROJECT, [0.0, 1.0], alpha=3.0, gated=1))
    r, _ = run(device, backend, args)
    torch.testing.assert_close(r.cpu(), torch.tensor([[2.0, 3.0], [0.5, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_row_gate(device, backend):
    """Row gate 0, a gated add of 2·e0, row gate 5 (past G = 2: reads 0), a gated add of 10·e1;
    x = (1, 1), gates = [[0.25, 0.9], [1.0, 0.5]].

    Token 0: g = 0.25, u = (1 + 0.5, 1); g = 0, r = (1.5, 1). Token 1: g = 1, r = (3, 1).
    Without gates every row gate reads 0: r = x."""
    x = torch.ones(2, 2)
    entries = (entry(KIND_GATE, [0.0, 0.0], index=0), entry(KIND_PROJECT, [1.0, 0.0], alpha=2.0, gated=1),
               entry(KIND_GATE, [0.0, 0.0], index=5), entry(KIND_PROJECT, [0.0, 1.0], alpha=10.0, gated=1))
    r, _ = run(device, backend, program(x, *entries, gates=torch.tensor([[0.25, 0.9], [1.0, 0.5]])))
    torch.testing.assert_close(r.cpu(), torch.tensor([[1.5, 1.0], [3.0, 1.0]]), atol=1e-6, rtol=0)
    r, _ = run(device, backend, program(x, *entries))
    assert torch.equal(r.cpu(), x)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_low_rank_map(device, backend):
    """u + B(Aᵀu − c) as READ, READ, WRITE, WRITE (registers 9 and 2), A = [e0, (0, 1, 1)],
    c = (0.5, 1), B = [1·(0, 1, 0), 2·(0.5, 0, 0)] (columns alpha·v of the writes).

    Token 0: u = (1, 2, 3), Aᵀu − c = (1 − 0.5, 5 − 1) = (0.5, 4), r = u + 0.5·e1 + 4·e0 = (5, 2.5, 3).
    Token 1 (random) is checked against the matrix formula. Applied as two rank-1 maps in sequence
    (READ, WRITE, READ, WRITE), the second read sees u + 0.5·e1: 5.5 − 1 = 4.5, r = (5.5, 2.5, 3)."""
    a1, a2, b1, b2 = [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.0]
    reads = (entry(KIND_READ, a1, index=9), entry(KIND_READ, a2, index=2))
    writes = (entry(KIND_WRITE, b1, alpha=1.0, lo=0.5, index=9), entry(KIND_WRITE, b2, alpha=2.0, lo=1.0, index=2))
    x = torch.cat([torch.tensor([[1.0, 2.0, 3.0]]), torch.randn(1, 3, generator=torch.Generator().manual_seed(0))])
    r, _ = run(device, backend, program(x, *reads, *writes))
    a, b, c = torch.tensor([a1, a2]).T, torch.tensor([b1, [1.0, 0.0, 0.0]]).T, torch.tensor([0.5, 1.0])
    torch.testing.assert_close(r.cpu(), x + (x @ a - c) @ b.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.cpu()[0], torch.tensor([5.0, 2.5, 3.0]), atol=1e-6, rtol=0)
    r, _ = run(device, backend, program(x[:1], reads[0], writes[0], reads[1], writes[1]))
    torch.testing.assert_close(r.cpu()[0], torch.tensor([5.5, 2.5, 3.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_scale_heads(device, backend):
    """Two heads of size 2: scale −1 on v = (1, 1, 0, 0) zeroes the first (u += −v ⊙ u), scale 0.5 on
    (0, 0, 1, 1) multiplies the second by 1.5. u = (1, 2, 3, 4): r = (0, 0, 4.5, 6)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    args = program(x, entry(KIND_SCALE, [1.0, 1.0, 0.0, 0.0], alpha=-1.0),
                   entry(KIND_SCALE, [0.0, 0.0, 1.0, 1.0], alpha=0.5))
    r, _ = run(device, backend, args)
    torch.testing.assert_close(r.cpu(), torch.tensor([[0.0, 0.0, 4.5, 6.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_inadmissible_gate_blocks(device, backend):
    """A gated add of 10·e2 before any gate (g starts at 1), row gate 0 (gates = 1) in window [0, 2),
    a gated add of e0, an ungated add of e1; x = 0 at positions 0 and 3.

    Token 0 (position 0): g = 1, r = (1, 1, 10). Token 1 (position 3): the gate is outside its window,
    g = 0, the gated add is blocked and the ungated one applies: r = (0, 1, 10)."""
    args = program(torch.zeros(2, 3), entry(KIND_PROJECT, [0.0, 0.0, 1.0], alpha=10.0, gated=1),
                   entry(KIND_GATE, [0.0, 0.0, 0.0], end=2.0, index=0),
                   entry(KIND_PROJECT, [1.0, 0.0, 0.0], alpha=1.0, gated=1),
                   entry(KIND_PROJECT, [0.0, 1.0, 0.0], alpha=1.0),
                   pos=torch.tensor([0, 3]), gates=torch.ones(2, 1))
    r, _ = run(device, backend, args)
    torch.testing.assert_close(r.cpu(), torch.tensor([[1.0, 1.0, 10.0], [0.0, 1.0, 10.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_slot_ignored_without_table(device, backend):
    """Without vecs/params nothing is steered and slot values index nothing, so any value is allowed."""
    x = torch.randn(3, 37)
    args = (x, None, None, None, torch.tensor([0, 7, -3], dtype=torch.int32), torch.arange(3),
            torch.zeros(3, dtype=torch.bool), None, 1e-6, 0.0)
    r, _ = run(device, backend, args)
    assert torch.equal(r.cpu(), x)


def _bad(**over):
    """make_case's arguments (4 slots, ENTRIES entries, 3 tokens, hidden 8) with some replaced by name."""
    names = ("x", "delta", "vecs", "params", "slot", "pos", "gen", "weight", "eps", "weight_offset", "gates")
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
    "vecs float64": (_bad(vecs=torch.zeros(4, ENTRIES, 8, dtype=torch.float64)), RuntimeError,
                     "vecs must be float32"),
    "vecs hidden": (_bad(vecs=torch.zeros(4, ENTRIES, 7)), RuntimeError, "vecs must be float32"),
    "params width": (_bad(params=torch.zeros(4, ENTRIES, NPARAMS - 1)), RuntimeError, "params must be float32"),
    "params slots": (_bad(params=torch.zeros(3, ENTRIES, NPARAMS)), RuntimeError, "params must be float32"),
    "slot int64": (_bad(slot=torch.zeros(3, dtype=torch.int64)), RuntimeError, "slot must be int32"),
    "slot length": (_bad(slot=torch.zeros(2, dtype=torch.int32)), RuntimeError, "slot must be int32"),
    "pos int32": (_bad(pos=torch.zeros(3, dtype=torch.int32)), RuntimeError, "pos must be int64"),
    "gen uint8": (_bad(gen=torch.zeros(3, dtype=torch.uint8)), RuntimeError, "gen must be bool"),
    "weight length": (_bad(weight=torch.ones(7)), RuntimeError, r"weight must be \[hidden\]"),
    "gates float64": (_bad(gates=torch.zeros(3, 2, dtype=torch.float64)), RuntimeError,
                      r"gates must be float32 \[tokens, gates\]"),
    "gates rows": (_bad(gates=torch.zeros(2, 2)), RuntimeError, r"gates must be float32 \[tokens, gates\]"),
    "gates 1-d": (_bad(gates=torch.zeros(3)), RuntimeError, r"gates must be float32 \[tokens, gates\]"),
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

    x, delta, vecs, params, _, pos, gen, weight, eps, offset, gates = make_case(4, 37, torch.float32)
    params[[0, 3], :, ALPHA], params[[0, 3], :, KIND], params[[0, 3], :, GATED] = 1.0, KIND_PROJECT, 0.0
    params[[0, 3], :, START], params[[0, 3], :, END], params[[0, 3], :, PHASE] = 0.0, 1e6, 0.0
    slot = torch.tensor([1, 2, -1, 0], dtype=torch.int32)
    r, out = _launch(x, delta, vecs[1:3], params[1:3], slot, pos, gen, weight, eps, offset, gates)
    ref_r, _ = fused_steer_reference(x, delta, vecs[1:3], params[1:3], slot.clamp(0, 1), pos, gen, weight,
                                           eps, offset, gates)
    plain_r, plain_out = fused_steer_reference(x, delta, None, None, slot, pos, gen, weight, eps, offset)
    torch.testing.assert_close(r[[0, 3]], ref_r[[0, 3]], **TOL[torch.float32])
    torch.testing.assert_close(r[1:3], plain_r[1:3], **TOL[torch.float32])
    torch.testing.assert_close(out[1:3], plain_out[1:3], **TOL[torch.float32])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "dtype,delta,steer,weight,weight_offset,gates",
    [
        (torch.float32, True, True, True, 1.0, True),
        (torch.bfloat16, False, True, True, 0.0, True),
        (torch.float16, True, True, False, 0.0, False),
        (torch.float16, True, False, False, 0.0, True),
        (torch.float32, False, False, False, 0.0, False),
    ],
)
def test_opcheck(device, dtype, delta, steer, weight, weight_offset, gates):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = list(make_case(5, 37, dtype, delta=delta, weight=weight, weight_offset=weight_offset))
    if not steer:
        args[2] = args[3] = None
    if not gates:
        args[10] = None
    torch.library.opcheck(torch.ops.splice.fused_steer, to(device, args))


TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.fused_steer import _fused_steer_kernel as kernel

for dt in ("fp32", "bf16", "fp16"):
    for flag in (True, False):
        types = [f"*{dt}", f"*{dt}", "*fp32", "*fp32", "*i32", "*i64", "*u8", "*fp32", "*fp32", f"*{dt}", f"*{dt}",
                 "i32", "i32", "i32", "i32", "fp32", "fp32", "constexpr", "constexpr", "constexpr", "constexpr"]
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
