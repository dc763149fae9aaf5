"""A set of steering directions, one per layer, with the facts needed to apply them correctly.

Layer convention: ``directions[l]`` belongs to the residual stream at site ``site`` of decoder
layer ``l`` (0-based). ``site="out"`` is the output of layer ``l`` (``hidden_states[l + 1]`` in
Hugging Face's ``output_hidden_states``, except for the last layer, whose entry there is taken
after the final norm), ``"in"`` its input (``hidden_states[l]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SITES = ("in", "out", "attn", "mlp", "heads")
# Hugging Face model_type -> llama.cpp architecture (GGUF general.architecture) where they differ:
# llama.cpp converts Mistral models to its llama graph and names Gemma 3's text model gemma3.
_GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


def gguf_arch(model_type: str) -> str:
    """llama.cpp's architecture name for a Hugging Face ``model_type`` (``"llama"`` for Llama and
    Mistral; for the other supported families it is the model_type itself)."""
    return _GGUF_ARCH.get(model_type, model_type)


@dataclass
class VectorSet:
    """Per-layer float32 directions ``{layer: tensor[hidden]}`` and their provenance.

    ``model`` names the model they came from; ``arch`` is its llama.cpp architecture (see
    :func:`gguf_arch`), which llama.cpp control vectors record as their model hint.
    """

    directions: dict[int, torch.Tensor]
    site: str = "out"
    model: str | None = None
    method: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str | None = None

    def __post_init__(self):
        if not self.directions:
            raise ValueError("a VectorSet needs at least one layer direction")
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}; choose one of {SITES}")
        sizes = {tuple(v.shape) for v in self.directions.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"directions must all be 1-D of one size, got shapes {sorted(sizes)}")
        for layer, v in self.directions.items():
            if not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layer indices must be non-negative ints, got {layer!r}")
            if not torch.isfinite(v).all():
                raise ValueError(f"direction for layer {layer} contains NaN or inf")
        self.directions = {int(k): v.detach().to(torch.float32).cpu().contiguous()
                           for k, v in sorted(self.directions.items())}

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]
