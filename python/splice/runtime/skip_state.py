"""Which layers, parts and rows run in the current forward pass (read by every spliced layer).

Three sources combine:

* ``static``: ``(run_attn, run_mlp)`` per layer, from :class:`~splice.skipping.spec.Skip`;
* ``draft``: layers a self-speculative draft pass skips (set only while a draft runs); they
  leave their KV cache untouched, the verification pass rewrites it;
* ``router``: per-request routing. During the prefill every row runs every layer and the router
  observes each candidate layer; on the first decode step its decision becomes, per layer, the
  index of the rows that still run it (``None``: all rows; empty: none).
"""

from __future__ import annotations

import torch


class SkipState:
    def __init__(self, num_layers: int):
        self.static = [(True, True)] * num_layers
        self.draft: frozenset[int] = frozenset()
        self.router = None
        self.rows: list[torch.Tensor | None] = [None] * num_layers
        self._decided = True

    @property
    def active(self) -> bool:
        return self.router is not None or bool(self.draft) or not all(a and m for a, m in self.static)

    def parts(self, layer: int) -> tuple[bool, bool]:
        if layer in self.draft:
            return False, False
        return self.static[layer]

    def begin_forward(self, prefill: bool) -> None:
        """Called once per forward pass, before its first layer runs."""
        if self.router is None:
            return
        if prefill:
            self.rows = [None] * len(self.rows)
            self.router.reset()
            self._decided = False
        elif not self._decided:
            skip = self.router.decide()  # [batch, layers] bool, one host sync per request batch
            for layer in self.router.layers:
                keep = (~skip[:, layer]).nonzero().flatten().to(self.router.device)
                self.rows[layer] = None if keep.numel() == skip.shape[0] else keep
            self._decided = True

    def observing(self, layer: int, prefill: bool) -> bool:
        return prefill and self.router is not None and layer in self.router.layer_set
