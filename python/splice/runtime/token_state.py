"""Per-token steering state, computed once per forward pass from the model's own inputs.

For a batch of ``B`` rows and ``S`` new tokens (``T = B * S``, flattened row-major):

* ``slot[T]``  int32: the slot of the token's row (``row_slot``; every row gets ``default_slot``
  until rows are assigned),
* ``pos[T]``   int64: the token's absolute position (``position_ids``: right under left padding
  and the KV cache),
* ``gen[T]``   bool: the token was generated, i.e. ``pos >= prompt_len[row]``; ``prompt_len`` is
  recorded on the forward pass that starts from an empty cache (the prefill),
* ``prefill``  bool: the current forward pass started from an empty cache.
"""

from __future__ import annotations

import torch
from torch import nn


def prompt_token_mask(prompt_len: torch.Tensor, seq: int) -> torch.Tensor:
    """[batch, seq] float mask of real prompt tokens (left padding: the last ``prompt_len``)."""
    cols = torch.arange(seq, device=prompt_len.device)
    return (cols[None, :] >= seq - prompt_len[:, None]).float()


class TokenState(nn.Module):
    def __init__(self, device: torch.device, default_slot: int = 0):
        super().__init__()
        self.default_slot = default_slot
        self.register_buffer("row_slot", torch.zeros(0, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("prompt_len", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.assigned = False
        self._source = None  # position_ids of the forward the current state belongs to
        self.slot = self.pos = self.gen = None
        self.prefill = False

    def assign(self, row_slots: list[int] | None) -> None:
        """Per-row slots for the next batches; None gives every row ``default_slot``."""
        if row_slots is None:
            self.assigned = False
            return
        self.row_slot = torch.tensor(row_slots, dtype=torch.int32, device=self.row_slot.device)
        self.assigned = True

    def update(self, batch: int, seq: int, position_ids: torch.Tensor, past_key_values,
               prefill: bool | None = None) -> bool:
        """Recompute the per-token tensors, once per forward (keyed on the position_ids object);
        returns True when this call started a new forward pass. ``prefill`` None: read it from the
        cache (empty: a prefill); a caller that knows (a compiled decode loop) passes it."""
        if position_ids is self._source:
            return False
        device = position_ids.device
        pos = position_ids.expand(batch, seq)
        if prefill is None:
            prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        self.prefill = prefill
        if self.prefill:
            self.prompt_len = pos.max(dim=1).values + 1
        elif self.prompt_len.shape[0] != batch:
            raise RuntimeError(f"splice: batch of {batch} rows continues a prefill of "
                               f"{self.prompt_len.shape[0]} rows; start generation from an empty cache")
        if self.assigned:
            if self.row_slot.shape[0] != batch:
                raise ValueError(f"{self.row_slot.shape[0]} row slots assigned for a batch of {batch} rows")
            row_slot = self.row_slot
        else:
            row_slot = torch.full((batch,), self.default_slot, dtype=torch.int32, device=device)
        self.slot = row_slot.repeat_interleave(seq)
        self.gen = (pos >= self.prompt_len[:, None]).reshape(-1)
        self.pos = pos.reshape(-1)
        self._source = position_ids
        return True
