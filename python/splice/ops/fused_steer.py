"""``splice::fused_steer``: residual add + steering + RMSNorm in one pass (math in steer_reference)."""

from __future__ import annotations

import torch

from . import library
from .steer_reference import check_fused_steer, fused_steer_reference

SCHEMA = (
    "fused_steer(Tensor x, Tensor? delta, Tensor? vecs, Tensor? params, Tensor slot, Tensor pos, "
    "Tensor gen, Tensor? weight, float eps, float weight_offset, Tensor? gates=None) -> (Tensor, Tensor)"
)


def _fake(x, delta, vecs, params, slot, pos, gen, weight, eps, weight_offset, gates=None):
    check_fused_steer(x, delta, vecs, params, slot, pos, gen, weight, gates)
    return x.new_empty(x.shape), (x.new_empty(x.shape) if weight is not None else x.new_empty(0))


SPEC = library.define(SCHEMA, fused_steer_reference, _fake, triton="fused_steer:fused_steer_triton")


def fused_steer(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    vecs: torch.Tensor | None,
    params: torch.Tensor | None,
    slot: torch.Tensor,
    pos: torch.Tensor,
    gen: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    gates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(residual, normed)`` for ``x`` [T, H]; see :mod:`splice.ops.steer_reference`."""
    return library.call(SPEC, x, delta, vecs, params, slot, pos, gen, weight, eps, weight_offset, gates)
