"""A HyLRA layer-reuse policy: which decoder layers keep full attention and how many tokens the
others read.

Every layer in ``full_layers`` attends to its whole KV cache and, per KV head, picks the ``topk``
cache slots its query heads weight most (the sum of their attention probabilities). Every other
*global* layer *reuses*: its queries attend only to the slots its nearest full layer below picked in
the same forward pass. The first global layer is always full (a reusing layer needs a full one below
it). The KV cache of every layer is kept whole: the slots a full layer picks change from token to
token.

``windowed_layers`` are the layers with the model's own sliding window (Gemma 2 and 3's local
layers): they keep their own windowed attention, neither picking slots nor reusing them, since their
caches hold only the window and so number their slots differently from the global layers'.
:meth:`ReusePolicy.validate_for` checks them against the model.

``splice.patch(model, reuse=policy)`` applies it to decoding (prefill runs the model's own full
attention); :mod:`splice.tools.reuse_search` makes one from measured attention.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.hybrid_attention import model_window
from ..utils.atomic import write_atomic


def windowed_layers(adapter) -> tuple[int, ...]:
    """The layers of the adapted model whose own attention has a sliding window."""
    return tuple(l for l in range(adapter.num_layers) if model_window(adapter, adapter.layers[l].self_attn))


@dataclass
class ReusePolicy:
    """``full_layers`` attend fully and pick ``topk`` slots per KV head; the rest reuse them.
    ``report``: what made the policy (the search's measurements), kept in the JSON file."""

    num_layers: int
    full_layers: tuple[int, ...]
    topk: int
    model: str = ""
    report: dict | None = field(default=None, repr=False)
    windowed_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be a positive int, got {self.topk!r}")
        self.full_layers = self._layers("full_layers", self.full_layers)
        self.windowed_layers = self._layers("windowed_layers", self.windowed_layers)
        both = sorted(set(self.full_layers) & set(self.windowed_layers))
        if both:
            raise ValueError(f"layers {both} are windowed and cannot be full: they keep the model's own sliding "
                             "window, and their cache slots are not the global layers'")
        first = min(set(range(self.num_layers)) - set(self.windowed_layers), default=None)
        if first is None:
            raise ValueError("every layer is windowed: layer reuse needs at least one global layer")
        if first not in self.full_layers:
            raise ValueError(f"layer {first} must be full: a reusing layer reads the slots of a full layer below it")

    def _layers(self, name: str, layers) -> tuple[int, ...]:
        layers = tuple(layers)
        if any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
            raise ValueError(f"{name} must be layer indices (ints), got {list(layers)!r}")
        bad = sorted(l for l in layers if not 0 <= l < self.num_layers)
        if bad:
            raise ValueError(f"{name} {bad} out of range 0..{self.num_layers - 1}")
        return tuple(sorted(set(layers)))

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_layers) if l not in self.windowed_layers)

    @property
    def reuse_layers(self) -> tuple[int, ...]:
        return tuple(l for l in self.global_layers if l not in self.full_layers)

    def anchor(self, layer: int) -> int:
        """The full layer whose slots ``layer`` reads (itself when it is full)."""
        return max(l for l in self.full_layers if l <= layer)

    @property
    def selecting_layers(self) -> tuple[int, ...]:
        """Full layers that some reusing layer reads: they must pick slots."""
        return tuple(sorted({self.anchor(l) for l in self.reuse_layers}))

    def random_like(self, seed: int) -> "ReusePolicy":
        """As many full layers (the first global layer and ``len - 1`` other global layers) chosen at
        random: the control."""
        first, *rest = self.global_layers
        others = random.Random(seed).sample(rest, len(self.full_layers) - 1)
        return ReusePolicy(self.num_layers, (first, *others), self.topk, self.model,
                           windowed_layers=self.windowed_layers)

    def validate_for(self, adapter) -> None:
        if self.num_layers != adapter.num_layers:
            raise ValueError(f"this reuse policy is for a model with {self.num_layers} layers "
                             f"({self.model or 'unnamed'}); the model has {adapter.num_layers}")
        own = windowed_layers(adapter)
        if own != self.windowed_layers:
            raise ValueError(f"this reuse policy takes layers {list(self.windowed_layers)} as windowed; the model's "
                             f"own sliding-window layers are {list(own)} (was it made for another model?)")

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "full_layers": list(self.full_layers),
                "windowed_layers": list(self.windowed_layers), "topk": self.topk, "report": self.report}

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ReusePolicy":
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["num_layers"], tuple(data["full_layers"]), data["topk"], data.get("model", ""),
                       data.get("report"), tuple(data.get("windowed_layers", ())))
        except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path} is not a splice reuse policy: {exc}") from exc
