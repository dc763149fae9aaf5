"""Conditions on steering: a per-token gate computed inside the fused op, and decisions made once
per request at prefill (a row gate per request, read by the fused op on every later token).

* :class:`TokenGate`: ``g = sigmoid((s − threshold) / temperature)`` (temperature 0: ``g = [s >
  threshold]``), with ``s = ⟨u, p̂⟩ / |u|`` (``score="cos"``) or ``⟨u, p̂⟩`` (``"dot"``), ``u`` the
  row being steered at the intervention's own layer and site, ``p̂`` the unit gate direction there.
* :class:`Condition` (CAST, Lee et al. 2024): at prefill, ``h`` is the prompt's hidden state at the
  input of ``layer``, averaged over its tokens (``reduce="mean"``) or its last token (``"last"``);
  the score is ``cos(h, tanh(⟨h, ĉ⟩ ĉ))`` as in IBM's reference code, and the request is steered
  for its whole generation when the score is above (``compare="above"``) or below the threshold.
  Departure from CAST: the mean leaves out the prompt's first token, the attention sink, whose
  hidden state is 10–200× the norm of the others in SmolLM2 and would otherwise be the mean.

A decision made at prefill applies from the layer after ``layer`` on the prompt, and everywhere on
generated tokens; a row whose request carries no decision reads 0 (unsteered).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..ops.steer_layout import KIND_GATE
from ..vectors.vector_set import VectorSet
from .program import Entry, entry

SCORES = ("cos", "dot")
COMPARES = ("above", "below")
REDUCES = ("mean", "last")


def _finite(value: float, label: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value}")
    return value


@dataclass
class TokenGate:
    """A per-token gate on one intervention (math in the module docstring)."""

    direction: VectorSet | dict | torch.Tensor
    threshold: float = 0.0
    temperature: float = 0.0
    score: str = "cos"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"gate score must be one of {SCORES}, got {self.score!r}")
        self.threshold = _finite(self.threshold, "gate threshold")
        self.temperature = _finite(self.temperature, "gate temperature")
        if self.temperature < 0:
            raise ValueError(f"gate temperature must be >= 0 (0: a hard threshold), got {self.temperature}")
        if self.score == "cos" and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"a cosine gate's threshold must lie in [-1, 1], got {self.threshold}")
        if isinstance(self.direction, dict):
            self.direction = VectorSet({int(k): v for k, v in self.direction.items()})
        elif isinstance(self.direction, torch.Tensor):
            if self.direction.dim() != 1:
                raise ValueError(f"a gate direction must be 1-D, got shape {tuple(self.direction.shape)}")
            if not torch.isfinite(self.direction).all():
                raise ValueError("gate direction contains NaN or inf")
        elif not isinstance(self.direction, VectorSet):
            raise TypeError(f"gate direction must be a tensor, a dict or a VectorSet, got {type(self.direction).__name__}")

    def direction_at(self, layer: int) -> torch.Tensor:
        if isinstance(self.direction, VectorSet):
            return self.direction[layer]
        return self.direction.detach().float().cpu()

    def check(self, layers, size: int) -> None:
        """Raise unless the gate has a non-zero direction of ``size`` entries for every layer."""
        if isinstance(self.direction, VectorSet):
            missing = [l for l in layers if l not in self.direction.directions]
            if missing:
                raise ValueError(f"the gate has no direction for layers {missing}")
        for layer in layers:
            p = self.direction_at(layer)
            if p.numel() != size:
                raise ValueError(f"gate direction size {p.numel()} does not match the site size {size}")
            if float(p.norm()) == 0.0:
                raise ValueError(f"gate direction for layer {layer} is zero")

    def entry(self, layer: int, window) -> Entry:
        p = self.direction_at(layer)
        inverse_temperature = math.inf if self.temperature == 0 else 1.0 / self.temperature
        return entry(KIND_GATE, p / p.norm(), window, alpha=inverse_temperature,
                     beta=1.0 if self.score == "cos" else 0.0, lo=self.threshold)

    def to_config(self) -> dict:
        return {"threshold": self.threshold, "temperature": self.temperature, "score": self.score}


class RowDecider(ABC):
    """Decides ``width`` row-gate values per request at prefill, from the prompt's hidden states at
    the input of decoder layer ``layer``. As a gate it reads column ``column_offset(l)`` of its
    decision at layer ``l`` (0 unless a decider says otherwise)."""

    layer: int
    width: int = 1
    name: str | None = None

    def column_offset(self, layer: int) -> int:
        return 0

    @abstractmethod
    def decide(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, width] float32 gate values from ``hidden`` [batch, seq, H] and the prompt-token
        ``mask`` [batch, seq] (float, 1 on real prompt tokens)."""

    @abstractmethod
    def validate_for(self, adapter) -> None:
        """Raise before any change if the decider does not fit the model."""


def finite_tensors(obj, names, what: str) -> None:
    """Replace each of ``obj``'s tensors ``names`` by a float32 CPU copy; ValueError unless finite."""
    for label in names:
        t = getattr(obj, label)
        if not isinstance(t, torch.Tensor) or not torch.isfinite(t).all():
            raise ValueError(f"{what} {label} must be a finite tensor")
        setattr(obj, label, t.detach().float().cpu().contiguous())


def check_reading(obj, what: str) -> None:
    """The checks every learned decider shares: a positive ``std``, a known ``reduce``, a layer."""
    if (obj.std <= 0).any():
        raise ValueError(f"{what} std must be positive")
    if obj.reduce not in REDUCES:
        raise ValueError(f"{what} reduce must be one of {REDUCES}, got {obj.reduce!r}")
    if isinstance(obj.layer, bool) or not isinstance(obj.layer, int) or obj.layer < 0:
        raise ValueError(f"{what} layer must be a non-negative int, got {obj.layer!r}")


@dataclass(frozen=True)
class RowColumn:
    """A gate that reads column ``offset`` of a multi-column decider's decision (e.g. the one-hot
    choice of a probe: vector ``offset`` of its bank)."""

    decider: RowDecider
    offset: int

    def __post_init__(self):
        if not 0 <= self.offset < self.decider.width:
            raise ValueError(f"column {self.offset} out of range for a decider of width {self.decider.width}")


def decider_column(gate, layer: int) -> tuple[RowDecider, int] | None:
    """(decider, column offset) of a prefill-decided gate at ``layer``, or None for other gates."""
    if isinstance(gate, RowColumn):
        return gate.decider, gate.offset
    if isinstance(gate, RowDecider):
        return gate, gate.column_offset(layer)
    return None


def pool(hidden: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """[batch, H] float32: the mean over real tokens but the first, or the last real token (left
    padding); a one-token prompt's mean is that token."""
    hidden = hidden.float()
    if reduce == "last":
        return hidden[:, -1]
    rest = mask * (mask.cumsum(1) > 1)
    rest = torch.where(rest.sum(1, keepdim=True) > 0, rest, mask)
    return (hidden * rest[..., None]).sum(1) / rest.sum(1, keepdim=True).clamp_min(1.0)


def cast_score(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """CAST's condition similarity ``cos(h, tanh(⟨h, ĉ⟩ ĉ))`` for rows ``h`` [N, H]."""
    c = c / c.norm()
    projected = torch.tanh((h @ c)[:, None] * c[None, :])
    return torch.nn.functional.cosine_similarity(h, projected, dim=-1)


@dataclass
class Condition(RowDecider):
    """CAST's condition: steer a request or not, decided once at prefill (module docstring)."""

    vector: torch.Tensor
    layer: int
    threshold: float
    compare: str = "above"
    reduce: str = "mean"
    name: str | None = None
    metadata: dict = field(default_factory=dict)
    source: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() != 1:
            raise ValueError("a condition vector must be a 1-D tensor")
        self.vector = self.vector.detach().float().cpu().contiguous()
        if not torch.isfinite(self.vector).all():
            raise ValueError("condition vector contains NaN or inf")
        if float(self.vector.norm()) == 0.0:
            raise ValueError("condition vector is zero")
        if self.compare not in COMPARES:
            raise ValueError(f"condition compare must be one of {COMPARES}, got {self.compare!r}")
        if self.reduce not in REDUCES:
            raise ValueError(f"condition reduce must be one of {REDUCES}, got {self.reduce!r}")
        self.threshold = _finite(self.threshold, "condition threshold")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"condition layer must be a non-negative int, got {self.layer!r}")

    def score(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch] CAST similarity of each prompt."""
        return cast_score(pool(hidden, mask, self.reduce), self.vector.to(hidden.device))

    def met(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold if self.compare == "above" else scores < self.threshold

    def decide(self, hidden, mask):
        return self.met(self.score(hidden, mask)).float()[:, None]

    def validate_for(self, adapter) -> None:
        if not 0 <= self.layer < adapter.num_layers:
            raise ValueError(f"condition layer {self.layer} out of range: the model has layers "
                             f"0..{adapter.num_layers - 1}")
        if self.vector.numel() != adapter.hidden_size:
            raise ValueError(f"condition vector size {self.vector.numel()} does not match the model's hidden "
                             f"size {adapter.hidden_size}")

    def settings(self) -> dict:
        return {"layer": self.layer, "threshold": self.threshold, "compare": self.compare, "reduce": self.reduce}
