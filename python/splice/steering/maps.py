"""Learned or given maps on a site's row ``u``, applied inside the fused op like steering vectors.

* :class:`LowRank` (LoReFT's form): ``u ← u + scale · B (Aᵀu − c)``, ``A``, ``B`` [H, r] with
  ``r ≤ 16``, ``c`` [r]; every projection ``Aᵀu`` is read before any write. LoReFT's
  ``h + Rᵀ(Wh + b − Rh)`` is ``B = Rᵀ``, ``Aᵀ = W − R``, ``c = −b``.
* :class:`Affine` (LinEAS): ``u ← u + scale · ((a − 1) ⊙ u + b)``, ``a``, ``b`` [H]; scale 1 is
  ``a ⊙ u + b``.
* :class:`HeadScale` (PH3, ITI-style head edits): the chosen query heads' outputs (site ``heads``,
  before ``o_proj``) multiplied by ``scale``; scale 0 prunes them.

Each takes per-layer tensors (``{layer: tensor}``), the positions and an optional gate, as
:class:`~splice.steering.spec.Steer` does, and gives the kernel a short program per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..ops.steer_layout import KIND_READ, KIND_SCALE, KIND_WRITE, MAX_RANK
from ..vectors.vector_set import SITES
from .gates import RowDecider, TokenGate
from .program import Entry, add_entry, entry
from .spec import Positions, check_gate_fits, check_gate_type, gate_entries


def _tensors(value, what: str) -> dict[int, torch.Tensor]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{what} must be a non-empty {{layer: tensor}} dict")
    out = {}
    for layer, t in value.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{what}: layer indices must be non-negative ints, got {layer!r}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{what}[{layer}] must be a float tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}[{layer}] contains NaN or inf")
        out[layer] = t.detach().float().cpu().contiguous()
    return dict(sorted(out.items()))


@dataclass(kw_only=True)
class _SiteMap:
    """What every map shares: layers, site, scale, positions, gate, name."""

    layers: Sequence[int] | None = None
    site: str = "out"
    scale: float = 1.0
    positions: Positions | str | tuple | dict = "all"
    gate: TokenGate | RowDecider | None = None
    name: str | None = None
    source: str | None = field(default=None, repr=False)

    def _common(self, available: list[int]) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}; choose one of {SITES}")
        self.positions = Positions.parse(self.positions)
        self.scale = float(self.scale)
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        self.layers = sorted({int(l) for l in self.layers}) if self.layers is not None else available
        missing = [l for l in self.layers if l not in available]
        if missing:
            raise ValueError(f"no map for layers {missing}; the map has layers {available}")
        check_gate_type(self.gate)

    def _validate_layers(self, adapter, size: int) -> None:
        bad = [l for l in self.layers if not 0 <= l < adapter.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")
        expected = adapter.site_size(self.site)
        if size != expected:
            raise ValueError(f"map size {size} does not match the model's site {self.site!r} size {expected}")
        check_gate_fits(self.gate, self.layers, expected, adapter)

    def entries(self, layer: int, scale: float, site_size: int, column: int | None = None) -> list[Entry]:
        return gate_entries(self.gate, layer, self.positions.window(), site_size, column,
                            self.program(layer, scale, site_size))


@dataclass(kw_only=True)
class LowRank(_SiteMap):
    """``u ← u + scale · B (Aᵀu − c)`` at each of ``layers`` (module docstring)."""

    A: dict = field(default_factory=dict)
    B: dict = field(default_factory=dict)
    c: dict | None = None

    def __post_init__(self):
        self.A, self.B = _tensors(self.A, "A"), _tensors(self.B, "B")
        if set(self.A) != set(self.B):
            raise ValueError(f"A and B must cover the same layers, got {sorted(self.A)} and {sorted(self.B)}")
        self.c = _tensors(self.c, "c") if self.c is not None else {l: torch.zeros(a.shape[1]) for l, a in self.A.items()}
        for layer, a in self.A.items():
            b, c = self.B[layer], self.c.get(layer)
            if a.dim() != 2 or a.shape != b.shape:
                raise ValueError(f"A[{layer}] and B[{layer}] must both be [hidden, rank], got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
            if not 1 <= a.shape[1] <= MAX_RANK:
                raise ValueError(f"rank {a.shape[1]} at layer {layer} is not in 1..{MAX_RANK}")
            if c is None or c.shape != (a.shape[1],):
                raise ValueError(f"c[{layer}] must be a [{a.shape[1]}] tensor")
        sizes = {a.shape[0] for a in self.A.values()}
        if len(sizes) != 1:
            raise ValueError(f"A's rows differ between layers: {sorted(sizes)}")
        self._common(list(self.A))

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a in self.A.values())

    def validate_for(self, adapter) -> None:
        self._validate_layers(adapter, next(iter(self.A.values())).shape[0])

    def program(self, layer: int, scale: float, site_size: int) -> list[Entry]:
        a, b, c = self.A[layer], self.B[layer], self.c[layer]
        window = self.positions.window()
        reads = [entry(KIND_READ, a[:, j], window, alpha=1.0, index=j) for j in range(a.shape[1])]
        writes = [entry(KIND_WRITE, b[:, j], window, alpha=scale, lo=float(c[j]), index=j) for j in range(a.shape[1])]
        return reads + writes


@dataclass(kw_only=True)
class Affine(_SiteMap):
    """``u ← u + scale · ((a − 1) ⊙ u + b)`` at each of ``layers`` (module docstring)."""

    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)

    def __post_init__(self):
        self.a, self.b = _tensors(self.a, "a"), _tensors(self.b, "b")
        if set(self.a) != set(self.b):
            raise ValueError(f"a and b must cover the same layers, got {sorted(self.a)} and {sorted(self.b)}")
        shapes = {tuple(t.shape) for t in [*self.a.values(), *self.b.values()]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"a and b must all be 1-D of one size, got shapes {sorted(shapes)}")
        self._common(list(self.a))

    def validate_for(self, adapter) -> None:
        self._validate_layers(adapter, next(iter(self.a.values())).shape[0])

    def program(self, layer: int, scale: float, site_size: int) -> list[Entry]:
        window = self.positions.window()
        return [entry(KIND_SCALE, self.a[layer] - 1.0, window, alpha=scale), add_entry(self.b[layer], scale, window)]


@dataclass(kw_only=True)
class HeadScale(_SiteMap):
    """Query heads ``heads[layer]`` multiplied by ``scale`` at site ``heads`` (0: pruned)."""

    heads: dict = field(default_factory=dict)
    scale: float = 0.0
    site: str = "heads"

    def __post_init__(self):
        if not isinstance(self.heads, dict) or not self.heads:
            raise ValueError("heads must be a non-empty {layer: [head, ...]} dict")
        if self.site != "heads":
            raise ValueError(f"HeadScale acts at site 'heads', got {self.site!r}")
        self.heads = {int(l): sorted({int(h) for h in hs}) for l, hs in sorted(self.heads.items())}
        if any(not hs for hs in self.heads.values()):
            raise ValueError("every layer of a HeadScale needs at least one head")
        self._common(list(self.heads))
        self._head_dim = None

    def validate_for(self, adapter) -> None:
        bad = {l: [h for h in hs if not 0 <= h < adapter.num_heads] for l, hs in self.heads.items()}
        bad = {l: hs for l, hs in bad.items() if hs}
        if bad:
            raise ValueError(f"heads {bad} out of range: the model has {adapter.num_heads} query heads")
        self._head_dim = adapter.head_dim
        self._validate_layers(adapter, adapter.site_size("heads"))

    def program(self, layer: int, scale: float, site_size: int) -> list[Entry]:
        if self._head_dim is None:
            raise RuntimeError("HeadScale.validate_for(adapter) must run before its entries are built")
        hd = self._head_dim
        mask = torch.zeros(site_size)
        for h in self.heads[layer]:
            mask[h * hd:(h + 1) * hd] = 1.0
        return [entry(KIND_SCALE, mask, self.positions.window(), alpha=scale - 1.0)]
