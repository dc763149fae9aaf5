"""The table entries of one steering slot, shared by ``splice.patch`` and serving."""

from __future__ import annotations

from collections.abc import Iterable

from ..runtime.steering_tables import Key
from .spec import Steer


def slot_entries(steers: dict[str, Steer], items: Iterable[tuple[str, float]], adapter) -> dict[Key, list]:
    """For each ``(layer, site)``, the entries of ``items`` (``(name, scale)`` pairs of registered
    ``steers``), in the order given: what :meth:`SteeringTables.write_slot` takes."""
    entries: dict[Key, list] = {}
    for name, scale in items:
        steer = steers[name]
        size = adapter.site_size(steer.site)
        for layer in steer.layers:
            entries.setdefault((layer, steer.site), []).append(steer.entry(layer, scale, size))
    return entries
