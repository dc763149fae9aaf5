"""Which attention each KV head of each layer runs: ``full``, or streaming (sinks + window).

A streaming KV head (and the query heads that share it under grouped-query attention) lets query
``i`` see key ``j`` only when ``j <= i`` and (``pos_i - pos_j < window`` or ``pos_j < sinks``):
the first ``sinks`` tokens (StreamingLLM's attention sinks) plus a recent window, by the tokens'
original positions. ``kind="stream"`` needs at least one sink; ``kind="window"`` is a plain
sliding window (no sinks). All non-full heads of a map share ``kind``, ``sinks`` and ``window``. Removing a layer's attention altogether is
``splice.Skip(layers, "attn")``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.atomic import write_atomic


@dataclass
class HeadMap:
    """``full[l]``: the KV heads of layer ``l`` with full attention; the others stream."""

    num_layers: int
    num_kv_heads: int
    full: dict[int, frozenset[int]]
    sinks: int = 4
    window: int = 256
    model: str = ""
    scores: list[list[float]] | None = field(default=None, repr=False)
    kind: str = "stream"

    def __post_init__(self):
        self.full = {int(l): frozenset(int(h) for h in heads) for l, heads in self.full.items()}
        if self.kind not in ("stream", "window"):
            raise ValueError(f"unknown streaming kind {self.kind!r}; choose 'stream' (sinks + window) or 'window'")
        if self.kind == "stream" and self.sinks < 1:
            raise ValueError("a streaming head needs at least one attention sink (sinks >= 1); "
                             "use kind='window' for a plain sliding window")
        if self.kind == "window" and self.sinks != 0:
            raise ValueError("kind='window' has no sinks: pass sinks=0 or use kind='stream'")
        if self.window < 1:
            raise ValueError(f"the streaming window must be at least 1 token, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        bad_layers = sorted(l for l in self.full if not 0 <= l < self.num_layers)
        if bad_layers:
            raise ValueError(f"head map layers {bad_layers} out of range 0..{self.num_layers - 1}")
        bad = sorted((l, h) for l, heads in self.full.items() for h in heads if not 0 <= h < self.num_kv_heads)
        if bad:
            raise ValueError(f"KV head indices {bad} out of range: layers have {self.num_kv_heads} KV heads")

    @classmethod
    def from_scores(cls, scores: list[list[float]], full_fraction: float, sinks: int = 4, window: int = 256,
                    model: str = "", kind: str = "stream") -> "HeadMap":
        """Keep full attention for the ``full_fraction`` of KV heads with the highest scores."""
        if not 0.0 <= full_fraction <= 1.0:
            raise ValueError(f"full_fraction must be in [0, 1], got {full_fraction}")
        layers, heads = len(scores), len(scores[0])
        ranked = sorted(((s, l, h) for l, row in enumerate(scores) for h, s in enumerate(row)), reverse=True)
        keep = ranked[:round(full_fraction * layers * heads)]
        full: dict[int, set[int]] = {l: set() for l in range(layers)}
        for _, l, h in keep:
            full[l].add(h)
        return cls(layers, heads, full, sinks, window, model, scores, kind)

    def random_like(self, seed: int = 0) -> "HeadMap":
        """A map with as many full heads, chosen uniformly at random (the control for a measured map)."""
        count = sum(len(self.full_heads(l)) for l in range(self.num_layers))
        heads = [(l, h) for l in range(self.num_layers) for h in range(self.num_kv_heads)]
        chosen = random.Random(seed).sample(heads, count)
        full = {l: {h for ll, h in chosen if ll == l} for l in range(self.num_layers)}
        return HeadMap(self.num_layers, self.num_kv_heads, full, self.sinks, self.window, self.model, kind=self.kind)

    def streaming(self, layer: int) -> list[int]:
        return [h for h in range(self.num_kv_heads) if h not in self.full.get(layer, frozenset())]

    def full_heads(self, layer: int) -> list[int]:
        return sorted(self.full.get(layer, frozenset()))

    @property
    def full_fraction(self) -> float:
        return sum(len(self.full_heads(l)) for l in range(self.num_layers)) / (self.num_layers * self.num_kv_heads)

    def validate_for(self, adapter) -> None:
        if (self.num_layers, self.num_kv_heads) != (adapter.num_layers, adapter.num_kv_heads):
            raise ValueError(f"this head map is for a model with {self.num_layers} layers of {self.num_kv_heads} KV "
                             f"heads ({self.model or 'unnamed'}); the model has {adapter.num_layers} layers of "
                             f"{adapter.num_kv_heads}")
        context = int(getattr(adapter.config, "max_position_embeddings", 0) or 0)
        if context and self.sinks + self.window > context:
            raise ValueError(f"sinks + window = {self.sinks + self.window} exceeds the model's context of {context}")

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "kind": self.kind, "sinks": self.sinks, "window": self.window,
                "full": {str(l): sorted(h) for l, h in sorted(self.full.items())}, "scores": self.scores}

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "HeadMap":
        try:
            data = json.loads(Path(path).read_text())
            return cls(int(data["num_layers"]), int(data["num_kv_heads"]),
                       {int(l): h for l, h in data["full"].items()}, int(data["sinks"]), int(data["window"]),
                       data.get("model", ""), data.get("scores"), data.get("kind", "stream"))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a splice head map: {exc}") from exc
