"""What a user asks for when skipping layers statically: ``Skip(layers, part)``.

``part`` is ``"layer"`` (the whole decoder layer: its output is its input), ``"attn"`` (only the
attention sub-layer: ``out = x + mlp(norm2(x))``) or ``"mlp"`` (only the MLP sub-layer:
``out = x + attn(norm1(x))``). A skipped attention does no work and keeps no KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

PARTS = ("layer", "attn", "mlp")


@dataclass(frozen=True)
class Skip:
    """Skip ``part`` of each layer in ``layers`` (0-based decoder layer indices)."""

    layers: tuple[int, ...]
    part: str = "layer"

    def __init__(self, layers: Iterable[int], part: str = "layer"):
        if part not in PARTS:
            raise ValueError(f"unknown skip part {part!r}; choose one of {PARTS}")
        try:
            values = tuple(sorted({int(l) for l in layers}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"skip layers must be integers, got {layers!r}") from exc
        if not values:
            raise ValueError("Skip needs at least one layer")
        object.__setattr__(self, "layers", values)
        object.__setattr__(self, "part", part)

    def validate_for(self, adapter) -> None:
        bad = [l for l in self.layers if not 0 <= l < adapter.num_layers]
        if bad:
            raise ValueError(f"skip layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")


def skipped_parts(skips: Iterable[Skip], num_layers: int) -> list[tuple[bool, bool]]:
    """``(run_attn, run_mlp)`` of every layer once ``skips`` apply; refuses skipping every layer."""
    parts = [[True, True] for _ in range(num_layers)]
    for skip in skips:
        for layer in skip.layers:
            if skip.part in ("layer", "attn"):
                parts[layer][0] = False
            if skip.part in ("layer", "mlp"):
                parts[layer][1] = False
    if num_layers and not any(a or m for a, m in parts):
        raise ValueError("skipping every layer leaves no model: keep at least one layer's attention or MLP")
    return [(a, m) for a, m in parts]


ALL_SITES = frozenset({"in", "out", "attn", "mlp", "heads"})


def unsteerable_sites(parts: list[tuple[bool, bool]], routed: Iterable[int] = ()) -> dict[int, frozenset[str]]:
    """Steering sites that do not exist once layers skip: a skipped attention has no ``attn`` or
    ``heads`` output, a skipped MLP no ``mlp`` output, and a skipped or routed layer none at all
    (splice refuses steering there rather than moving it to another layer)."""
    out = {layer: ALL_SITES for layer in routed}
    for layer, (run_attn, run_mlp) in enumerate(parts):
        if not (run_attn or run_mlp):
            out[layer] = ALL_SITES
        elif layer not in out and not (run_attn and run_mlp):
            out[layer] = frozenset({"attn", "heads"} if not run_attn else {"mlp"})
    return out
