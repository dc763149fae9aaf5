"""Row gates: per-request values decided at prefill and read by ``splice::fused_steer`` on every
later token (its ``gates`` argument, ``[tokens, columns]``).

Each registered *decider* (an object with ``layer``, ``width`` and ``decide(hidden, mask) ->
[batch, width]``, e.g. CAST's condition) owns ``width`` consecutive columns. A prefill starts every
row at 0; when the prefill reaches a decider's layer, the decider reads that layer's input and
writes its columns, so later layers of the same prefill and every decode step see the decision.
"""

from __future__ import annotations

import torch
from torch import nn

from .token_state import prompt_token_mask

MAX_COLUMNS = 64


class RowGates(nn.Module):
    def __init__(self, device: torch.device):
        super().__init__()
        self.deciders: list = []
        self.columns: list[int] = []  # first column of each decider
        self.by_layer: dict[int, list[int]] = {}  # layer -> indices into deciders
        self.register_buffer("row", torch.zeros(0, 0, device=device), persistent=False)
        self.token: torch.Tensor | None = None
        self._seq = 0

    @property
    def width(self) -> int:
        return self.columns[-1] + self.deciders[-1].width if self.deciders else 0

    def _index(self, decider) -> int | None:
        return next((i for i, known in enumerate(self.deciders) if known is decider), None)

    def check_room(self, deciders) -> None:
        """Raise (changing nothing) unless ``deciders`` fit beside the registered ones."""
        new = sum(d.width for d in deciders if self._index(d) is None)
        if self.width + new > MAX_COLUMNS:
            raise ValueError(f"at most {MAX_COLUMNS} row-gate columns per model: {self.width} are in use "
                             f"and these deciders need {new} more")

    def column(self, decider) -> int:
        """The first column of ``decider``, registering it (from the next prefill on) if new."""
        i = self._index(decider)
        if i is not None:
            return self.columns[i]
        self.check_room([decider])
        self.columns.append(self.width)
        self.deciders.append(decider)
        self.by_layer.setdefault(decider.layer, []).append(len(self.deciders) - 1)
        return self.columns[-1]

    def begin_forward(self, prefill: bool, batch: int, seq: int) -> None:
        """Called once per forward pass, before its first layer runs."""
        self._seq = seq
        if not self.deciders:
            self.token = None
            return
        if prefill:
            self.row = torch.zeros(batch, self.width, device=self.row.device)
        elif self.row.shape[0] != batch:
            raise RuntimeError(f"splice: batch of {batch} rows continues a prefill of {self.row.shape[0]} rows")
        elif self.row.shape[1] < self.width:  # deciders registered since the prefill have decided nothing
            self.row = torch.nn.functional.pad(self.row, (0, self.width - self.row.shape[1]))
        self.token = self.row.repeat_interleave(seq, 0)

    def observes(self, layer: int, prefill: bool) -> bool:
        return prefill and layer in self.by_layer

    def observe(self, layer: int, hidden: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Let the deciders of ``layer`` read its input ``hidden`` [batch, seq, H] and decide."""
        mask = prompt_token_mask(prompt_len, hidden.shape[1])
        for i in self.by_layer[layer]:
            start, decider = self.columns[i], self.deciders[i]
            self.row[:, start:start + decider.width] = decider.decide(hidden.float(), mask).to(self.row)
        self.token = self.row.repeat_interleave(self._seq, 0)
