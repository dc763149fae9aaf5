"""The table entries of one steering slot, shared by ``splice.patch`` and serving."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..runtime.steering_tables import Key
from .gates import RowDecider, decider_column
from .maps import Affine, HeadScale, LowRank
from .spec import Steer

INTERVENTIONS = (Steer, LowRank, Affine, HeadScale)
Intervention = Steer | LowRank | Affine | HeadScale


def row_deciders(steers: dict[str, Intervention], names: Iterable[str]) -> list[RowDecider]:
    """The prefill deciders that gate the interventions ``names``, each once, in order."""
    out: list[RowDecider] = []
    for name in names:
        steer = steers[name]
        found = decider_column(steer.gate, steer.layers[0])
        if found is not None and all(found[0] is not d for d in out):
            out.append(found[0])
    return out


def slot_entries(steers: dict[str, Intervention], items: Iterable[tuple[str, float]], adapter,
                 column_of: Callable[[RowDecider], int] | None = None) -> dict[Key, list]:
    """For each ``(layer, site)``, the entries of ``items`` (``(name, scale)`` pairs of registered
    ``steers``), in the order given: what :meth:`SteeringTables.write_slot` takes. ``column_of``
    gives the row-gate column of a prefill decider (required when an item has one)."""
    entries: dict[Key, list] = {}
    for name, scale in items:
        steer = steers[name]
        size = adapter.site_size(steer.site)
        for layer in steer.layers:
            found = decider_column(steer.gate, layer)
            if found is not None and column_of is None:
                raise ValueError(f"{name!r} is gated by a prefill decision, which this path cannot make")
            column = column_of(found[0]) + found[1] if found is not None else None
            entries.setdefault((layer, steer.site), []).extend(steer.entries(layer, scale, size, column))
    return entries
