"""A model's sizes read from its configuration alone (no weights): what checking an intervention
against a model needs, in a process that does not hold the model (vLLM's API server)."""

from __future__ import annotations


class ModelShape:
    """Layer count, hidden size and head layout of a causal LM's (text) configuration."""

    def __init__(self, config):
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads)

    def site_size(self, site: str) -> int:
        """Width of a steering site: heads · head_dim at ``heads``, the hidden size elsewhere."""
        return self.num_heads * self.head_dim if site == "heads" else self.hidden_size
