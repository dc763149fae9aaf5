"""G-ACT's selector: at prefill a linear probe on the prompt picks which vector of a bank the
request gets (Sharma et al. 2025, "Steering Conceptual Bias via Transformer Latent-Subspace
Activation").

``choice = argmax_k (W ((h − μ) / σ) + b)_k`` with ``h`` the prompt's pooled input of ``layer``
(:func:`splice.steering.gates.pool`); the decision is one-hot over the ``K`` columns, so bank
vector ``k``, gated by ``probe.choice(k)``, steers exactly the requests the probe assigns to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gates import RowColumn, RowDecider, check_reading, finite_tensors, pool


@dataclass
class ProbeSelect(RowDecider):
    weight: torch.Tensor  # [K, H]
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [H]
    std: torch.Tensor  # [H]
    layer: int
    reduce: str = "mean"
    name: str | None = None
    source: str | None = field(default=None, repr=False)

    def __post_init__(self):
        finite_tensors(self, ("weight", "bias", "mean", "std"), "probe")
        k, h = self.weight.shape if self.weight.dim() == 2 else (0, 0)
        if k < 2 or self.bias.shape != (k,) or self.mean.shape != (h,) or self.std.shape != (h,):
            raise ValueError(f"a probe needs weight [K >= 2, H], bias [K], mean and std [H]; got "
                             f"{[tuple(getattr(self, n).shape) for n in ('weight', 'bias', 'mean', 'std')]}")
        check_reading(self, "probe")

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = (pool(hidden, mask, self.reduce) - self.mean.to(hidden.device)) / self.std.to(hidden.device)
        return h @ self.weight.to(hidden.device).T + self.bias.to(hidden.device)

    def decide(self, hidden, mask):
        return torch.nn.functional.one_hot(self.logits(hidden, mask).argmax(-1), self.width).float()

    def choice(self, k: int) -> RowColumn:
        """The gate of bank vector ``k``: open for the requests the probe assigns to ``k``."""
        return RowColumn(self, k)

    def validate_for(self, adapter) -> None:
        if not 0 <= self.layer < adapter.num_layers:
            raise ValueError(f"probe layer {self.layer} out of range: the model has layers 0..{adapter.num_layers - 1}")
        if self.weight.shape[1] != adapter.hidden_size:
            raise ValueError(f"probe size {self.weight.shape[1]} does not match the model's hidden size "
                             f"{adapter.hidden_size}")
