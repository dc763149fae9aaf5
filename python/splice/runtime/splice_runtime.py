"""The state splice attaches to a patched model (as the submodule ``splice_runtime``).

It holds only non-persistent buffers (plus the plain-Python skip state), so it follows ``model.to(...)`` and leaves
``model.state_dict()`` unchanged.
"""

from __future__ import annotations

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
