"""The state splice attaches to a patched model (as the submodule ``splice_runtime``).

It holds only non-persistent buffers (plus the plain-Python skip state), so it follows ``model.to(...)`` and leaves
``model.state_dict()`` unchanged.

Per-forward state (token slots, positions, gates, routed rows) is computed once per forward pass by
:meth:`SpliceRuntime.begin_forward`. By default the first spliced layer calls it, reading from the
KV cache whether the pass is a prefill. A driver that runs a compiled forward (``driven``) calls it
itself before the model, so the compiled layers only read the state.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.architecture import Adapter
from .row_gates import RowGates
from .skip_state import SkipState
from .steering_tables import SteeringTables
from .token_state import TokenState

ATTRIBUTE = "splice_runtime"


class SpliceRuntime(nn.Module):
    def __init__(self, adapter: Adapter, max_slots: int):
        super().__init__()
        sizes = {site: adapter.site_size(site) for site in ("in", "out", "attn", "mlp", "heads")}
        self.tables = SteeringTables(max_slots, sizes, adapter.device)
        self.state = TokenState(adapter.device)
        self.skip = SkipState(adapter.num_layers)
        self.gates = RowGates(adapter.device)
        self.driven = False

    def begin_forward(self, batch: int, seq: int, position_ids: torch.Tensor, past_key_values,
                      prefill: bool | None = None) -> None:
        """Set the per-token state for a forward pass over ``batch`` × ``seq`` new tokens (once per pass)."""
        if self.state.update(batch, seq, position_ids, past_key_values, prefill):
            self.skip.begin_forward(self.state.prefill)
            self.gates.begin_forward(self.state.prefill, batch, seq)
