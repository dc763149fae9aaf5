"""The KV memory of a layer's streaming heads: ``sinks`` slots plus a ring of ``window`` slots.

``keys``/``values`` are ``[batch, heads, sinks + window + 1, head_dim]``; ``pos`` and ``valid``
``[batch, slots]`` say which token (by original position) each slot holds. Keys are stored after
the rotary embedding, so a kept token keeps its original position and slot order does not matter
to attention. A token at position ``p < sinks`` goes to sink slot ``p``; any other token goes to
ring slot ``sinks + (column mod window)``, overwriting the token that left the window. The last
slot is scratch: padding, and tokens that would leave the window within the same write, land
there and stay invalid. Memory is fixed, whatever the context length.
"""

from __future__ import annotations

import torch


class StreamingKV:
    def __init__(self, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        self.keys = self.values = self.pos = self.valid = None
        self.columns = None  # cache columns written so far (every row): a 0-d tensor updated in place,
        # so a compiled decode step reads it without a guard on its value

    @property
    def slots(self) -> int:
        return self.sinks + self.window + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.valid)
                   if t is not None)

    def _allocate(self, k: torch.Tensor) -> None:
        b, h, _, d = k.shape
        self.keys = k.new_zeros(b, h, self.slots, d)
        self.values = k.new_zeros(b, h, self.slots, d)
        self.pos = torch.zeros(b, self.slots, dtype=torch.long, device=k.device)
        self.valid = torch.zeros(b, self.slots, dtype=torch.bool, device=k.device)
        self.columns = torch.zeros((), dtype=torch.long, device=k.device)

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, real: torch.Tensor) -> None:
        """Store new tokens ``k``/``v`` [B, H, n, D] at positions ``pos`` [B, n] (``real``: not padding)."""
        if self.keys is None:
            self._allocate(k)
        n = k.shape[2]
        cols = torch.arange(n, device=k.device) + self.columns
        ring = self.sinks + cols % self.window
        recent = cols >= self.columns + n - self.window  # older ones would be overwritten in this write
        slot = torch.where(pos < self.sinks, pos, ring.expand_as(pos))
        keep = real & ((pos < self.sinks) | recent)
        slot = torch.where(keep, slot, self.slots - 1)
        index = slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.keys.scatter_(2, index, k)
        self.values.scatter_(2, index, v)
        self.pos.scatter_(1, slot, pos)
        self.valid.scatter_(1, slot, keep)
        self.valid[:, -1] = False
        self.columns.add_(n)
