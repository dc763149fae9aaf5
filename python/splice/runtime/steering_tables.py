"""Persistent steering tables: for each (layer, site), ``vecs`` [S, K, H] and ``params`` [S, K, 7].

Row ``s`` holds slot ``s``'s entries in application order; slot 0 stays empty (no steering).
Changing a slot rewrites its rows in place. A table grows (K) only when a slot needs more entries
than any slot had before, and is dropped when no slot uses it, so unsteered sites pass no table
to the kernel at all.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.steer_layout import NPARAMS

Key = tuple[int, str]  # (layer, site)


class SteeringTables(nn.Module):
    """Non-persistent buffers (they follow ``model.to``, stay out of ``state_dict``)."""

    def __init__(self, max_slots: int, site_sizes: dict[str, int], device: torch.device):
        super().__init__()
        self.max_slots = max_slots
        self.site_sizes = site_sizes
        self.device = device
        self.keys: set[Key] = set()

    def _apply(self, fn, recurse=True):
        """Follow device moves but stay float32 whatever dtype the model is cast to."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        self.device = fn(torch.empty(0, device=self.device)).device
        return self

    @staticmethod
    def _names(key: Key) -> tuple[str, str]:
        return f"vecs_{key[0]}_{key[1]}", f"params_{key[0]}_{key[1]}"

    def get(self, layer: int, site: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if (layer, site) not in self.keys:
            return None, None
        vname, pname = self._names((layer, site))
        return getattr(self, vname), getattr(self, pname)

    def _ensure(self, key: Key, entries: int) -> None:
        vecs, params = self.get(*key)
        if vecs is not None and vecs.shape[1] >= entries:
            return
        size = self.site_sizes[key[1]]
        device = vecs.device if vecs is not None else self.device
        new_v = torch.zeros(self.max_slots, entries, size, device=device)
        new_p = torch.zeros(self.max_slots, entries, NPARAMS, device=device)
        if vecs is not None:
            new_v[:, : vecs.shape[1]] = vecs
            new_p[:, : params.shape[1]] = params
        vname, pname = self._names(key)
        self.register_buffer(vname, new_v, persistent=False)
        self.register_buffer(pname, new_p, persistent=False)
        self.keys.add(key)

    def _drop_if_unused(self, key: Key) -> None:
        _, params = self.get(*key)
        if not params[..., :2].any():  # no alpha or beta anywhere: the table does nothing
            for name in self._names(key):
                delattr(self, name)
            self.keys.discard(key)

    def write_slot(self, slot: int, entries: dict[Key, list[tuple[torch.Tensor, list[float]]]]) -> None:
        """Replace slot ``slot``'s entries everywhere by ``entries`` (already validated)."""
        for key in set(self.keys) | set(entries):
            rows = entries.get(key, [])
            if rows:
                self._ensure(key, len(rows))
            vecs, params = self.get(*key)
            if vecs is None:
                continue
            vecs[slot].zero_()
            params[slot].zero_()
            for k, (v, p) in enumerate(rows):
                vecs[slot, k].copy_(v)
                params[slot, k].copy_(torch.tensor(p, dtype=torch.float32))
            self._drop_if_unused(key)
