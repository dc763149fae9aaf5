"""splice: inference-time interventions for Hugging Face causal LMs, with fused kernels."""

from . import ops
from .adapters.architecture import supported_families
from .decoding.compile_check import CompileError
from .decoding.compiled_decode import CompiledDecoder, compile_decode
from .decoding.gemfilter_generate import gemfilter_generate
from .decoding.lfd_generate import lfd_generate
from .longcontext.gemfilter import GemFilter
from .longcontext.layer_fused import LayerFusedDecoding, layer_fused
from .patch import Patch, patch
from .quant.activations import set_quant_activations
from .quant.checkpoint import load_quantized
from .recipe import Recipe, RecipeError, load_recipe
from .runtime.decode_attention import use_splice_attention
from .skipping.spec import Skip
from .steering.gates import Condition, TokenGate
from .steering.maps import Affine, HeadScale, LowRank
from .steering.spec import Positions, Steer
from .vectors.vector_set import VectorSet

__version__ = "0.1.0"

__all__ = ["Affine", "CompileError", "CompiledDecoder", "Condition", "GemFilter", "HeadScale", "LayerFusedDecoding",
           "LowRank", "Patch", "Positions", "Recipe", "RecipeError", "Skip", "Steer", "TokenGate", "VectorSet",
           "compile_decode", "gemfilter_generate", "layer_fused", "lfd_generate", "load_quantized", "load_recipe",
           "ops", "patch", "set_quant_activations", "supported_families", "use_splice_attention"]
