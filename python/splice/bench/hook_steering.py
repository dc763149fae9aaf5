"""The way hook-based steering libraries do it: a Python forward hook per layer that adds
``scale * v`` to the layer's output. Used as the baseline in benchmarks and as an independent
check of splice's "out" site in tests."""

from __future__ import annotations

import torch

from ..adapters.architecture import Adapter


def add_output_hooks(model, vectors: dict[int, torch.Tensor], scale: float) -> list:
    """Register one forward hook per layer in ``vectors``; returns the handles to ``remove()``."""
    layers = Adapter(model).layers
    handles = []
    for layer_idx, v in vectors.items():
        delta = (scale * v).to(next(model.parameters()).dtype)

        def hook(module, args, output, delta=delta):
            return output + delta.to(output.device)

        handles.append(layers[layer_idx].register_forward_hook(hook))
    return handles
