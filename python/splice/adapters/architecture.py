"""Architecture adapters: where a causal LM keeps its decoder layers, norms and attention heads.

Two layer shapes cover the supported families:

* pre-norm (Llama, Mistral, Qwen2, Qwen3, Phi-3)::

      h = x + attn(norm1(x));  out = h + mlp(norm2(h))

* sandwich (Gemma 2, Gemma 3)::

      h = x + post_attn_norm(attn(norm1(x)));  out = h + post_ff_norm(mlp(pre_ff_norm(h)))

Gemma's RMSNorm scales by ``1 + weight`` (``norm_offset = 1``); the others by ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .shape import ModelShape


@dataclass(frozen=True)
class Family:
    """Static facts about one architecture family."""

    name: str
    model_types: tuple[str, ...]
    sandwich: bool = False
    norm_offset: float = 0.0


FAMILIES = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("phi3", ("phi3",)),
    Family("gemma2", ("gemma2",), sandwich=True, norm_offset=1.0),
    Family("gemma3", ("gemma3_text",), sandwich=True, norm_offset=1.0),
)


def supported_families() -> list[str]:
    return [f.name for f in FAMILIES]


def _family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ValueError(f"splice does not support model_type {model_type!r}; supported families: {names}")


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a Hugging Face RMSNorm module (its attribute name varies by family)."""
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of norm module {type(norm).__name__}")


class Adapter(ModelShape):
    """A loaded model seen through its family: layers, sizes, and the modules splice replaces."""

    def __init__(self, model: nn.Module):
        super().__init__(model.config)
        self.family = _family_for(self.config.model_type)
        self.model = model
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no decoder layer list at .model.layers")
        self.layers: nn.ModuleList = layers
        self.num_layers = len(layers)
        self.name = str(getattr(self.config, "_name_or_path", "") or self.config.model_type)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and ``lm_head``."""
        norm = getattr(getattr(self.model, "model", self.model), "norm", None)
        if not isinstance(norm, nn.Module):
            raise ValueError(f"{type(self.model).__name__} has no final norm at .model.norm")
        return norm

    @property
    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (lm_head)")
        return head

    def o_proj(self, layer_idx: int) -> nn.Linear:
        """The attention output projection; its input is the concatenation of the head outputs."""
        return self.layers[layer_idx].self_attn.o_proj

    def describe(self) -> str:
        return (f"{self.family.name}: {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads} query / {self.num_kv_heads} KV heads of {self.head_dim}")
