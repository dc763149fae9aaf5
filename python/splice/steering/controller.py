"""A steering controller (Guiding Giants, "lightweight controllers for weighted activation steering"):
a small network reads the prompt at one layer and outputs a global scale and per-layer weights for a
steering vector, decided once per request at prefill.

``o = W₂ tanh(W₁ ((h − μ) / σ) + c₁) + c₂`` with ``h`` the prompt's pooled input of ``layer``
(:func:`splice.steering.gates.pool`); the global scale is ``s = sigmoid(o₀)`` and the weight of
steered layer ``l_j`` is ``w_j = sigmoid(o_{j+1})``, so the vector at ``l_j`` is applied with gate
``s · w_j`` (times the intervention's own scale). The paper's controller reads activations during
generation; splice's decides at prefill, like its other row gates, so decode costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gates import RowDecider, check_reading, finite_tensors, pool

PARAMETERS = ("w1", "c1", "w2", "c2", "mean", "std")


def controller_gates(pooled, w1, c1, w2, c2, mean, std) -> torch.Tensor:
    """[batch, layers] gates ``s · w_j`` of the module docstring (differentiable in every argument)."""
    z = (pooled - mean.to(pooled)) / std.to(pooled)
    o = torch.sigmoid(torch.tanh(z @ w1.to(pooled).T + c1.to(pooled)) @ w2.to(pooled).T + c2.to(pooled))
    return o[:, :1] * o[:, 1:]


@dataclass
class Controller(RowDecider):
    w1: torch.Tensor  # [hidden_units, H]
    c1: torch.Tensor  # [hidden_units]
    w2: torch.Tensor  # [1 + len(layers), hidden_units]
    c2: torch.Tensor  # [1 + len(layers)]
    mean: torch.Tensor  # [H]
    std: torch.Tensor  # [H]
    layer: int
    layers: list[int]  # the steered layers, in the order of the weights
    reduce: str = "mean"
    name: str | None = None
    source: str | None = field(default=None, repr=False)

    def __post_init__(self):
        finite_tensors(self, PARAMETERS, "controller")
        self.layers = [int(l) for l in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"a controller needs distinct steered layers, got {self.layers}")
        units, h = self.w1.shape if self.w1.dim() == 2 else (0, 0)
        expected = {"w1": (units, h), "c1": (units,), "w2": (1 + len(self.layers), units),
                    "c2": (1 + len(self.layers),), "mean": (h,), "std": (h,)}
        wrong = {n: tuple(getattr(self, n).shape) for n, shape in expected.items() if getattr(self, n).shape != shape}
        if units < 1 or wrong:
            raise ValueError(f"controller shapes do not fit (hidden units {units}, hidden size {h}, "
                             f"{len(self.layers)} layers): {wrong}")
        check_reading(self, "controller")

    @property
    def width(self) -> int:
        return len(self.layers)

    def column_offset(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"the controller has no weight for layer {layer}; its layers are {self.layers}")
        return self.layers.index(layer)

    def gates(self, pooled: torch.Tensor) -> torch.Tensor:
        return controller_gates(pooled, *(getattr(self, n) for n in PARAMETERS))

    def decide(self, hidden, mask):
        return self.gates(pool(hidden, mask, self.reduce))

    def validate_for(self, adapter) -> None:
        bad = [l for l in [self.layer, *self.layers] if not 0 <= l < adapter.num_layers]
        if bad:
            raise ValueError(f"controller layers {bad} out of range: the model has layers 0..{adapter.num_layers - 1}")
        if self.mean.numel() != adapter.hidden_size:
            raise ValueError(f"controller input size {self.mean.numel()} does not match the model's hidden size "
                             f"{adapter.hidden_size}")
