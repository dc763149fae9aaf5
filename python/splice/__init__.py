"""splice: inference-time interventions for Hugging Face causal LMs, with fused kernels."""

from . import ops

__version__ = "0.1.0"
