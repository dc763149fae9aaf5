"""A per-layer attention policy (LayerBoost's three choices): each decoder layer keeps ``full``
attention, streams (``window``: every KV head sees ``sinks`` + a recent ``window``, as a
:class:`~splice.hybrid.head_map.HeadMap` streaming head), or runs ``none`` (the attention block
skipped: ``out = x + mlp(norm2(x))``, as ``splice.Skip(layers, "attn")``).

``splice.patch(model, policy=...)`` applies it through those two existing mechanisms.

Cost model (:func:`choice_costs`, analytical: splice has no measured per-layer attention costs):
attention FLOPs per decoded token at a target context ``T``. With hidden size ``h``, ``H`` query
and ``G`` KV heads of dimension ``d``, a layer's projections cost ``2h(H + 2G)d + 2Hdh`` (q, k, v
and o) and its attention ``4Hd·n`` over ``n`` keys (scores and weighted values), so
``full = proj + 4Hd·T``, ``window = proj + 4Hd·min(T, sinks + window)``, ``none = 0``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.atomic import write_atomic
from .head_map import HeadMap

CHOICES = ("full", "window", "none")


@dataclass
class LayerPolicy:
    """``window_layers`` stream, ``none_layers`` skip their attention, every other layer is full.
    ``report``: what made the policy (the search's measurements), kept in the JSON file."""

    num_layers: int
    window_layers: tuple[int, ...] = ()
    none_layers: tuple[int, ...] = ()
    sinks: int = 4
    window: int = 256
    model: str = ""
    report: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        self.window_layers = _layers("window_layers", self.window_layers, self.num_layers)
        self.none_layers = _layers("none_layers", self.none_layers, self.num_layers)
        both = sorted(set(self.window_layers) & set(self.none_layers))
        if both:
            raise ValueError(f"layers {both} are in both window_layers and none_layers")
        # the streaming head's own checks (sinks >= 1, window >= 1), before anything uses them
        HeadMap(self.num_layers, 1, {}, self.sinks, self.window)

    @classmethod
    def from_choices(cls, choices: list[str], sinks: int = 4, window: int = 256, model: str = "",
                     report: dict | None = None) -> "LayerPolicy":
        """A policy from one choice per layer (``"full"``, ``"window"`` or ``"none"``)."""
        unknown = sorted({c for c in choices if c not in CHOICES}, key=str)
        if unknown:
            raise ValueError(f"unknown layer choices {unknown}; choose from {CHOICES}")
        return cls(len(choices), tuple(l for l, c in enumerate(choices) if c == "window"),
                   tuple(l for l, c in enumerate(choices) if c == "none"), sinks, window, model, report)

    @property
    def choices(self) -> list[str]:
        return ["window" if l in self.window_layers else "none" if l in self.none_layers else "full"
                for l in range(self.num_layers)]

    def shuffled(self, seed: int) -> "LayerPolicy":
        """The same choices in a random order of layers: the control of equal cost (the cost model
        is the same for every layer)."""
        choices = self.choices
        random.Random(seed).shuffle(choices)
        return LayerPolicy.from_choices(choices, self.sinks, self.window, self.model)

    def cost(self, costs: dict[str, float]) -> float:
        """Total cost under per-choice ``costs`` (e.g. :func:`choice_costs`)."""
        return sum(costs[c] for c in self.choices)

    def validate_for(self, adapter) -> None:
        if self.num_layers != adapter.num_layers:
            raise ValueError(f"this layer policy is for a model with {self.num_layers} layers "
                             f"({self.model or 'unnamed'}); the model has {adapter.num_layers}")
        if self.window_layers:
            self.head_map(adapter).validate_for(adapter)

    def head_map(self, adapter) -> HeadMap:
        """Every KV head of a window layer streams; full and none layers keep theirs full (a none
        layer's attention never runs)."""
        every = frozenset(range(adapter.num_kv_heads))
        full = {l: every for l in range(self.num_layers) if l not in self.window_layers}
        return HeadMap(self.num_layers, adapter.num_kv_heads, full, self.sinks, self.window, self.model)

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "sinks": self.sinks, "window": self.window,
                "layers": {"window": list(self.window_layers), "none": list(self.none_layers)},
                "report": self.report}

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LayerPolicy":
        try:
            data = json.loads(Path(path).read_text())
            layers = data["layers"]
            unknown = sorted(set(layers) - {"window", "none"})
            if unknown:
                raise ValueError(f"unknown layer choices {unknown}; a file lists 'window' and 'none' layers")
            return cls(data["num_layers"], tuple(layers.get("window", ())), tuple(layers.get("none", ())),
                       data["sinks"], data["window"], data.get("model", ""), data.get("report"))
        except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path} is not a splice layer policy: {exc}") from exc


def _layers(name: str, layers, num_layers: int) -> tuple[int, ...]:
    if any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
        raise ValueError(f"{name} must be layer indices (ints), got {list(layers)!r}")
    bad = sorted(l for l in layers if not 0 <= l < num_layers)
    if bad:
        raise ValueError(f"{name} {bad} out of range 0..{num_layers - 1}")
    return tuple(sorted(set(layers)))


def choice_costs(adapter, context: int, sinks: int, window: int) -> dict[str, float]:
    """Attention FLOPs per decoded token of one layer at ``context`` tokens, per choice (module
    docstring)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    h, hq, hkv, d = adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    projections = 2 * h * (hq + 2 * hkv) * d + 2 * hq * d * h
    return {"full": float(projections + 4 * hq * d * context),
            "window": float(projections + 4 * hq * d * min(context, sinks + window)), "none": 0.0}
