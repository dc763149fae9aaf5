"""Plain-PyTorch fp32 reference for ``splice::fused_steer``; every backend is tested against it.

Contract (``T`` tokens, hidden size ``H``, ``S`` slots, ``K`` entries per slot, ``G`` row gates)::

    x       [T, H]   residual stream (any float dtype)
    delta   [T, H]   optional sub-layer output to add to ``x``
    vecs    [S, K, H] float32 steering directions, ``params`` [S, K, NPARAMS] float32
    slot    [T] int32 slot of each token (slot 0 carries no steering)
    pos     [T] int64 absolute position of each token, ``gen`` [T] bool: token was generated
    gates   [T, G] optional float32 row gates (a prompt-level decision per token's request)

    u = delta if given else x                              (the steered quantity, fp32)
    g = 1, reg[0..MAX_RANK) = 0
    for k in 0..K-1, in order, for the entries of the token's slot:
        one step of entry k's kind (splice.ops.steer_layout), if its window and phase admit
        the token; an inadmissible gate entry sets g = 0
    r   = (x + u if delta is given else u)                 rounded to x.dtype
    out = r * rsqrt(mean(r^2) + eps) * (weight + weight_offset)   rounded to x.dtype

An entry is admitted when ``start <= pos < end`` and its phase admits the token
(PHASE_ALL, PHASE_PROMPT: not generated, PHASE_GENERATED: generated). ``add`` is
``alpha = scale, beta = 0``; ablation is ``beta = 1, lo = hi = 0`` on a unit vector; clamping
the projection to ``[lo, hi]`` is ``beta = 1`` on a unit vector. A row-gate entry whose ``index``
is not below ``G`` (or with no ``gates``) reads 0; a register index outside ``[0, MAX_RANK)``
makes its read or write do nothing. Without ``weight`` the second output is an empty tensor.

Arguments: ``x`` is float32, float64, bfloat16 or float16 (the CUDA kernel takes the last three),
every tensor lies on x's device, and where ``vecs`` is given every ``slot`` value lies in ``[0, S)``.
:func:`check_fused_steer` checks shapes, dtypes and devices (RuntimeError), so it also runs on fake
tensors; its messages are those of the C++ kernels (csrc/cpu/steer_layout.h). Slot values are checked
on the host for CPU tensors (IndexError, :func:`check_steer_slots`); on CUDA only on the device, so
that nothing waits for the GPU: the CUDA and Triton kernels leave such a token unsteered and fail a
device assert (Triton's only under ``TRITON_DEBUG=1``), the reference's ``index_select`` asserts.
"""

from __future__ import annotations

import torch

from .host_checks import first_out_of_range
from .steer_layout import (
    ALPHA, BETA, END, GATED, HI, INDEX, KIND, KIND_GATE, KIND_PROJECT, KIND_READ, KIND_SCALE, KIND_WRITE, LO,
    MAX_RANK, NPARAMS, PHASE, PHASE_GENERATED, PHASE_PROMPT, START,
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_fused_steer(x, delta, vecs, params, slot, pos, gen, weight, gates=None) -> None:
    """Raise RuntimeError unless the arguments fit the contract (shapes, dtypes, devices)."""
    op = "fused_steer"
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [tokens, hidden], got {list(x.shape)}")
    torch._check(x.dtype in DTYPES, lambda: f"{op}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    t, h = x.shape
    if delta is not None:
        torch._check(delta.shape == x.shape and delta.dtype == x.dtype,
                     lambda: f"{op}: delta must match x in shape and dtype")
    torch._check((vecs is None) == (params is None), lambda: f"{op}: vecs and params go together")
    if vecs is not None:
        torch._check(vecs.dim() == 3 and vecs.shape[2] == h and vecs.dtype == torch.float32,
                     lambda: f"{op}: vecs must be float32 [slots, entries, hidden]")
        torch._check(
            params.dim() == 3 and params.shape[:2] == vecs.shape[:2] and params.shape[2] == NPARAMS
            and params.dtype == torch.float32,
            lambda: f"{op}: params must be float32 [slots, entries, {NPARAMS}]",
        )
    for name, tensor, dtype in (("slot", slot, torch.int32), ("pos", pos, torch.int64), ("gen", gen, torch.bool)):
        torch._check(tensor.dim() == 1 and tensor.shape[0] == t and tensor.dtype == dtype,
                     lambda: f"{op}: {name} must be {str(dtype).removeprefix('torch.')} [tokens]")
    if weight is not None:
        torch._check(weight.dim() == 1 and weight.shape[0] == h, lambda: f"{op}: weight must be [hidden]")
    if gates is not None:
        torch._check(gates.dim() == 2 and gates.shape[0] == t and gates.dtype == torch.float32,
                     lambda: f"{op}: gates must be float32 [tokens, gates]")
    named = (("delta", delta), ("vecs", vecs), ("params", params), ("weight", weight), ("slot", slot),
             ("pos", pos), ("gen", gen), ("gates", gates))
    for name, tensor in named:
        if tensor is not None:
            torch._check(tensor.device == x.device,
                         lambda: f"{op}: {name} must be on {x.device}, got {tensor.device}")


def check_steer_slots(slot: torch.Tensor, vecs: torch.Tensor | None) -> None:
    """Raise IndexError unless every ``slot`` value lies in ``[0, vecs.shape[0])`` (nothing to check
    without ``vecs``); for CPU tensors only (see :func:`first_out_of_range`)."""
    i = first_out_of_range(slot, vecs.shape[0]) if vecs is not None else None
    if i is not None:
        raise IndexError(f"fused_steer: slot[{i}] = {int(slot[i])} is out of range for {vecs.shape[0]} slots")


def entry_active(params: torch.Tensor, pos: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """[T, K] mask of entries that apply to each token, from gathered ``params`` [T, K, NPARAMS]."""
    posf = pos.to(torch.float32)[:, None]
    phase = params[..., PHASE]
    gen = gen[:, None]
    phase_ok = (phase == 0) | ((phase == PHASE_PROMPT) & ~gen) | ((phase == PHASE_GENERATED) & gen)
    return (params[..., START] <= posf) & (posf < params[..., END]) & phase_ok


def _gate_value(u, vk, pk, gates) -> torch.Tensor:
    """[T] value a gate entry gives the gate register (see steer_layout, KIND_GATE)."""
    index = pk[:, INDEX].long()
    if gates is not None and gates.shape[1] > 0:
        in_range = (index >= 0) & (index < gates.shape[1])
        row = gates.gather(1, index.clamp(0, gates.shape[1] - 1)[:, None])[:, 0]
        row = torch.where(in_range, row, torch.zeros_like(row))
    else:
        row = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    score = (u * vk).sum(-1)
    score = torch.where(pk[:, BETA] == 1, score / u.norm(dim=-1).clamp_min(1e-30), score)
    alpha, lo = pk[:, ALPHA], pk[:, LO]
    hard = (score > lo).to(u.dtype)
    soft = torch.sigmoid((score - lo) * torch.where(torch.isinf(alpha), torch.zeros_like(alpha), alpha))
    token = torch.where(torch.isinf(alpha), hard, soft)
    return torch.where(index >= 0, row, token)


def steer_reference(u: torch.Tensor, vecs, params, slot, pos, gen, gates=None) -> torch.Tensor:
    """Run each token's slot program (see steer_layout) on ``u`` [T, H] (fp32), in entry order."""
    if vecs is None or vecs.shape[1] == 0:
        return u
    v = vecs.index_select(0, slot.long())  # [T, K, H]
    p = params.index_select(0, slot.long())  # [T, K, NPARAMS]
    active = entry_active(p, pos, gen) & (slot != 0)[:, None]
    t = u.shape[0]
    g = torch.ones(t, dtype=u.dtype, device=u.device)
    regs = torch.zeros(t, MAX_RANK, dtype=u.dtype, device=u.device)
    zero = torch.zeros_like(g)
    for k in range(v.shape[1]):
        vk, pk, on = v[:, k], p[:, k], active[:, k]
        kind = pk[:, KIND]
        f = torch.where(pk[:, GATED] == 1, g, torch.ones_like(g))
        proj = (u * vk).sum(-1)
        index = pk[:, INDEX].long()
        reg_ok = (index >= 0) & (index < MAX_RANK)
        reg_col = index.clamp(0, MAX_RANK - 1)
        # KIND_PROJECT
        lo, hi = pk[:, LO], pk[:, HI]
        gain = pk[:, ALPHA] + pk[:, BETA] * (torch.minimum(torch.maximum(proj, lo), hi) - proj)
        step = torch.where(on & (kind == KIND_PROJECT), f * gain, zero)[:, None] * vk
        # KIND_SCALE
        step = step + torch.where(on & (kind == KIND_SCALE), f * pk[:, ALPHA], zero)[:, None] * vk * u
        # KIND_WRITE
        written = regs.gather(1, reg_col[:, None])[:, 0] - lo
        step = step + torch.where(on & (kind == KIND_WRITE) & reg_ok, f * pk[:, ALPHA] * written, zero)[:, None] * vk
        # KIND_READ (reads the u this entry sees) and KIND_GATE (sets g)
        reads = on & (kind == KIND_READ) & reg_ok
        regs = torch.where(reads[:, None] & (torch.arange(MAX_RANK, device=u.device) == reg_col[:, None]),
                           proj[:, None], regs)
        is_gate = kind == KIND_GATE
        g = torch.where(is_gate & on, _gate_value(u, vk, pk, gates), torch.where(is_gate, zero, g))
        u = u + step
    return u


def fused_steer_reference(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    vecs: torch.Tensor | None,
    params: torch.Tensor | None,
    slot: torch.Tensor,
    pos: torch.Tensor,
    gen: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    gates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + steering + RMSNorm, computed in fp32 and rounded once; see module docstring."""
    check_fused_steer(x, delta, vecs, params, slot, pos, gen, weight, gates)
    check_steer_slots(slot, vecs)
    xf = x.to(torch.float32, copy=True)  # never an alias of x, whatever the dtype
    u = steer_reference(delta.to(torch.float32) if delta is not None else xf, vecs, params, slot, pos, gen, gates)
    r = (xf + u if delta is not None else u).to(x.dtype)
    if weight is None:
        return r, x.new_empty(0)
    rf = r.to(torch.float32)
    normed = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)
    return r, (normed * (weight.to(torch.float32) + weight_offset)).to(x.dtype)
