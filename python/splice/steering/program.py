"""Table entries of ``splice::fused_steer``: one step of a token's steering program each (the kinds
and fields are those of :mod:`splice.ops.steer_layout`).

An intervention turns into a short list of entries per (layer, site); a gated intervention puts a
gate entry first and marks its own entries gated, so the gate governs exactly those entries.
"""

from __future__ import annotations

import math

import torch

from ..ops.steer_layout import (
    ALPHA, BETA, END, GATED, HI, INDEX, KIND, KIND_GATE, KIND_PROJECT, LO, NPARAMS, PHASE, START,
)

Entry = tuple[torch.Tensor, list[float]]


def entry(kind: int, vector: torch.Tensor, window: tuple[float, float, float], *, alpha: float = 0.0,
          beta: float = 0.0, lo: float = -math.inf, hi: float = math.inf, index: int = -1) -> Entry:
    """One table entry: ``vector`` [site size] and its params row (``window``: start, end, phase)."""
    params = [0.0] * NPARAMS
    params[KIND], params[ALPHA], params[BETA], params[LO], params[HI] = float(kind), alpha, beta, lo, hi
    params[START], params[END], params[PHASE] = window
    params[INDEX] = float(index)
    return vector, params


def gated(gate: Entry, entries: list[Entry]) -> list[Entry]:
    """``gate`` followed by ``entries``, each multiplied by the gate's value."""
    out = [gate]
    for vector, params in entries:
        params = list(params)
        params[GATED] = 1.0
        out.append((vector, params))
    return out


def row_gate_entry(column: int, size: int, window) -> Entry:
    """A gate entry that reads the token's row gate ``column`` (a decision made at prefill)."""
    return entry(KIND_GATE, torch.zeros(size), window, alpha=1.0, index=column)


def add_entry(vector: torch.Tensor, scale: float, window) -> Entry:
    return entry(KIND_PROJECT, vector, window, alpha=scale)
