"""What a user asks for: one steering intervention (``Steer``) and the tokens it applies to.

Operations on a residual quantity ``u`` with direction ``v`` (``v̂ = v / |v|``):

* ``add``:    ``u + scale * v``                       (the vector as given, not normalised)
* ``ablate``: ``u - scale * <u, v̂> v̂``                (scale 1 removes the direction)
* ``clamp``:  ``u + (clamp(<u, v̂>, lo, hi) - <u, v̂>) v̂``  (the projection forced into [lo, hi])

Several interventions compose in the order given. Positions are absolute token positions (the
model's position ids), so they stay right under the KV cache: a decode step at position 57 is
position 57, not 0. Any intervention may carry a ``gate`` (see :mod:`splice.steering.gates`): a
per-token :class:`~splice.steering.gates.TokenGate`, or a decision made at prefill (a
:class:`~splice.steering.gates.RowDecider` such as CAST's ``Condition``) that multiplies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..ops.steer_layout import KIND_PROJECT, PHASE_ALL, PHASE_GENERATED, PHASE_PROMPT
from ..vectors.vector_set import SITES, VectorSet
from .gates import RowColumn, RowDecider, TokenGate
from .program import Entry, entry, gated, row_gate_entry

OPS = ("add", "ablate", "clamp")
PHASES = {"all": PHASE_ALL, "prompt": PHASE_PROMPT, "generated": PHASE_GENERATED}


@dataclass(frozen=True)
class Positions:
    """Tokens an intervention applies to: a phase and a half-open absolute window [start, end)."""

    phase: str = "all"
    start: int = 0
    end: int | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"positions phase must be one of {sorted(PHASES)}, got {self.phase!r}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f"position window [{self.start}, {self.end}) is empty or negative")

    @classmethod
    def parse(cls, value) -> "Positions":
        """Accepts a Positions, a phase name, a ``(start, end)`` pair or a dict of the fields."""
        if isinstance(value, Positions):
            return value
        if isinstance(value, str):
            return cls(phase=value)
        if isinstance(value, dict):
            unknown = set(value) - {"phase", "start", "end"}
            if unknown:
                raise ValueError(f"unknown positions keys {sorted(unknown)}; use phase, start, end")
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(start=int(value[0]), end=None if value[1] is None else int(value[1]))
        raise ValueError(f"cannot read positions from {value!r}: use 'all', 'prompt', 'generated', "
                         "[start, end] or {phase, start, end}")

    def window(self) -> tuple[float, float, float]:
        """(start, end, phase) as the kernel's float params."""
        end = math.inf if self.end is None else float(self.end)
        return float(self.start), end, float(PHASES[self.phase])

    def to_config(self):
        if self.start == 0 and self.end is None:
            return self.phase
        return {"phase": self.phase, "start": self.start, "end": self.end}


@dataclass
class Steer:
    """One intervention: a vector set applied at some layers of one site with one operation.

    ``vector`` is a :class:`VectorSet`, a ``{layer: tensor}`` dict, or a single tensor (then
    ``layers`` is required and the same vector goes to every listed layer). For site ``"heads"``
    (the attention heads' concatenated output, before ``o_proj``) ``head`` selects one query head
    and the vectors have ``head_dim`` entries.
    """

    vector: VectorSet | dict | torch.Tensor
    layers: Sequence[int] | None = None
    op: str = "add"
    scale: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf
    site: str | None = None
    head: int | None = None
    positions: Positions | str | tuple | dict = "all"
    name: str | None = None
    source: str | None = field(default=None, repr=False)  # file the vectors came from, for recipes
    gate: TokenGate | RowDecider | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown steering op {self.op!r}; choose one of {OPS}")
        self.positions = Positions.parse(self.positions)
        if isinstance(self.vector, torch.Tensor):
            if self.layers is None:
                raise ValueError("a single steering tensor needs layers=[...]")
            self.vector = VectorSet({int(l): self.vector for l in self.layers}, site=self.site or "out")
        elif isinstance(self.vector, dict):
            self.vector = VectorSet({int(k): v for k, v in self.vector.items()}, site=self.site or "out")
        elif not isinstance(self.vector, VectorSet):
            raise TypeError(f"vector must be a VectorSet, a dict or a tensor, got {type(self.vector).__name__}")
        self.site = self.site or self.vector.site
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}; choose one of {SITES}")
        self.layers = sorted({int(l) for l in self.layers}) if self.layers is not None else self.vector.layers
        missing = [l for l in self.layers if l not in self.vector.directions]
        if missing:
            raise ValueError(f"no direction for layers {missing}; the vector set has layers {self.vector.layers}")
        for value, label in ((self.scale, "scale"), (self.lo, "lo"), (self.hi, "hi")):
            if math.isnan(value) or (label == "scale" and math.isinf(value)):
                raise ValueError(f"{label} must be a finite number, got {value}")
        if self.lo > self.hi:
            raise ValueError(f"clamp interval is empty: lo={self.lo} > hi={self.hi}")
        if self.op == "clamp" and math.isinf(self.lo) and math.isinf(self.hi):
            raise ValueError("clamp needs lo and/or hi")
        if (self.head is not None) != (self.site == "heads"):
            raise ValueError("head=... goes with site='heads' (and site='heads' needs a head)")
        if self.op != "add" and any(float(self.vector[l].norm()) == 0.0 for l in self.layers):
            raise ValueError(f"{self.op} needs non-zero directions")
        check_gate_type(self.gate)

    def validate_for(self, adapter) -> None:
        """Raise before any change if this intervention does not fit the adapted model."""
        bad = [l for l in self.layers if not 0 <= l < adapter.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")
        expected = adapter.head_dim if self.site == "heads" else adapter.hidden_size
        if self.vector.hidden_size != expected:
            what = "head_dim" if self.site == "heads" else "hidden size"
            raise ValueError(f"vector size {self.vector.hidden_size} does not match the model's {what} {expected}")
        if self.head is not None and not 0 <= self.head < adapter.num_heads:
            raise ValueError(f"head {self.head} out of range: the model has {adapter.num_heads} query heads")
        check_gate_fits(self.gate, self.layers, adapter.site_size(self.site), adapter)

    def entries(self, layer: int, scale: float, site_size: int, column: int | None = None) -> list[Entry]:
        """The kernel's entries for ``layer`` at ``scale``, behind the gate (``column``: the row-gate
        column of a prefill decision at this layer)."""
        return gate_entries(self.gate, layer, self.positions.window(), site_size, column,
                            [self.entry(layer, scale, site_size)])

    def entry(self, layer: int, scale: float, site_size: int) -> Entry:
        """The ungated (vector[site_size], params) for ``layer`` at ``scale``; see steer_layout."""
        v = self.vector[layer]
        if self.op != "add":
            v = v / v.norm()
        if self.head is not None:
            full = torch.zeros(site_size)
            full[self.head * v.numel():(self.head + 1) * v.numel()] = v
            v = full
        if self.op == "add":
            alpha, beta, lo, hi = scale, 0.0, -math.inf, math.inf
        elif self.op == "ablate":
            alpha, beta, lo, hi = 0.0, scale, 0.0, 0.0
        else:
            alpha, beta, lo, hi = 0.0, 1.0, self.lo, self.hi
        return entry(KIND_PROJECT, v, self.positions.window(), alpha=alpha, beta=beta, lo=lo, hi=hi)


def check_gate_type(gate) -> None:
    if gate is not None and not isinstance(gate, (TokenGate, RowDecider, RowColumn)):
        raise TypeError(f"gate must be a TokenGate, a RowDecider (e.g. a Condition) or a RowColumn, "
                        f"got {type(gate).__name__}")


def check_gate_fits(gate, layers, site_size: int, adapter) -> None:
    """Raise before any change if ``gate`` does not fit the intervention's layers or the model."""
    if isinstance(gate, TokenGate):
        gate.check(layers, site_size)
    elif isinstance(gate, RowDecider):
        gate.validate_for(adapter)
        for layer in layers:
            gate.column_offset(layer)  # a decider with per-layer columns must have one for each layer
    elif isinstance(gate, RowColumn):
        gate.decider.validate_for(adapter)


def gate_entries(gate, layer: int, window, site_size: int, column: int | None, body: list[Entry]) -> list[Entry]:
    """``body`` behind ``gate``: a token gate's entry, or the row gate of ``column``, then ``body``."""
    if gate is None:
        return body
    if isinstance(gate, TokenGate):
        return gated(gate.entry(layer, window), body)
    if column is None:
        raise RuntimeError("a prefill-decided gate needs its row-gate column")
    return gated(row_gate_entry(column, site_size, window), body)
