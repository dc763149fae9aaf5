"""A HyLRA layer-reuse policy: which decoder layers keep full attention and how many tokens the
others read.

Every layer in ``full_layers`` attends to its whole KV cache and, per KV head, picks the ``topk``
cache slots its query heads weight most (the sum of their attention probabilities). Every other
layer *reuses*: its queries attend only to the slots its nearest full layer below picked in the
same forward pass. Layer 0 is always full (a reusing layer needs a full one below it). The KV cache
of every layer is kept whole: the slots a full layer picks change from token to token.

``splice.patch(model, reuse=policy)`` applies it to decoding (prefill runs the model's own full
attention); :mod:`splice.tools.reuse_search` makes one from measured attention.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.atomic import write_atomic


@dataclass
class ReusePolicy:
    """``full_layers`` attend fully and pick ``topk`` slots per KV head; the rest reuse them.
    ``report``: what made the policy (the search's measurements), kept in the JSON file."""

    num_layers: int
    full_layers: tuple[int, ...]
    topk: int
    model: str = ""
    report: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be a positive int, got {self.topk!r}")
        layers = tuple(self.full_layers)
        if any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
            raise ValueError(f"full_layers must be layer indices (ints), got {list(layers)!r}")
        bad = sorted(l for l in layers if not 0 <= l < self.num_layers)
        if bad:
            raise ValueError(f"full_layers {bad} out of range 0..{self.num_layers - 1}")
        if 0 not in layers:
            raise ValueError("layer 0 must be full: a reusing layer reads the slots of a full layer below it")
        self.full_layers = tuple(sorted(set(layers)))

    @property
    def reuse_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_layers) if l not in self.full_layers)

    def anchor(self, layer: int) -> int:
        """The full layer whose slots ``layer`` reads (itself when it is full)."""
        return max(l for l in self.full_layers if l <= layer)

    @property
    def selecting_layers(self) -> tuple[int, ...]:
        """Full layers that some reusing layer reads: they must pick slots."""
        return tuple(sorted({self.anchor(l) for l in self.reuse_layers}))

    def random_like(self, seed: int) -> "ReusePolicy":
        """As many full layers (layer 0 and ``len - 1`` others) chosen at random: the control."""
        others = random.Random(seed).sample(range(1, self.num_layers), len(self.full_layers) - 1)
        return ReusePolicy(self.num_layers, (0, *others), self.topk, self.model)

    def validate_for(self, adapter) -> None:
        if self.num_layers != adapter.num_layers:
            raise ValueError(f"this reuse policy is for a model with {self.num_layers} layers "
                             f"({self.model or 'unnamed'}); the model has {adapter.num_layers}")

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "full_layers": list(self.full_layers),
                "topk": self.topk, "report": self.report}

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ReusePolicy":
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["num_layers"], tuple(data["full_layers"]), data["topk"], data.get("model", ""),
                       data.get("report"))
        except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path} is not a splice reuse policy: {exc}") from exc
