"""splice.ops: one registered torch op per kernel (``torch.ops.splice.*``) and its Python entry."""

from . import library
from .attention import band_attention, decode_attention
from .fused_steer import fused_steer
from .index_attention import index_attention
from .library import BACKENDS, available_backends, backend_for, use_backend
from .quant_matmul import quant_matmul
from .quant_matmul_a8 import quant_matmul_a8
from .row_select import gather_rows, scatter_rows

library.load_kernels()

__all__ = [
    "BACKENDS", "available_backends", "backend_for", "band_attention", "decode_attention", "fused_steer",
    "gather_rows", "index_attention", "quant_matmul", "quant_matmul_a8", "scatter_rows", "use_backend",
]
