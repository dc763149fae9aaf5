"""Plain-PyTorch fp32 reference for ``splice::quant_matmul``; every backend is tested against it.

Contract (``T`` tokens, ``N = out_features``, ``K = in_features``, ``G = ceil(K / group_size)``)::

    x        [T, K]  float32 or bfloat16
    qweight  uint8 [N, ceil(K / 64) · 64 · bits / 8]   codes q, layout in splice.ops.quant_packing
    scales, zeros   float16 [N, G]
    bias     optional float [N]

    W[n, k] = (q[n, k] − zeros[n, k // group_size]) · scales[n, k // group_size]     (fp32)
    y       = x @ W^T (+ bias), computed in fp32 and rounded once to x.dtype

``bits`` is 2, 3, 4 or 8, ``group_size`` 32, 64 or 128, and every tensor lies on x's device.
:func:`check_quant_matmul` checks the arguments (shapes, dtypes, devices; RuntimeError), so it also
runs on fake tensors; its messages are those of the C++ kernels (csrc/cpu/quant_matmul_args.h).
"""

from __future__ import annotations

import torch

from splice.ops.quant_format import dequantize_codes
from splice.ops.quant_packing import row_bytes, unpack_codes


def check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features) -> None:
    """Raise RuntimeError unless the arguments fit the contract."""
    op = "quant_matmul"
    torch._check(bits in (2, 3, 4, 8), lambda: f"{op}: bits must be 2, 3, 4 or 8, got {bits}")
    torch._check(group_size in (32, 64, 128), lambda: f"{op}: group_size must be 32, 64 or 128, got {group_size}")
    torch._check(out_features > 0 and in_features > 0,
                 lambda: f"{op}: out_features and in_features must be positive")
    torch._check(x.dim() == 2 and x.shape[1] == in_features,
                 lambda: f"{op}: x must be [tokens, {in_features}], got {list(x.shape)}")
    torch._check(x.dtype in (torch.float32, torch.bfloat16),
                 lambda: f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    groups, width = -(-in_features // group_size), row_bytes(in_features, bits)
    torch._check(
        qweight.dtype == torch.uint8 and qweight.dim() == 2 and list(qweight.shape) == [out_features, width],
        lambda: f"{op}: qweight must be uint8 [{out_features}, {width}], got {qweight.dtype} {list(qweight.shape)}",
    )
    for name, t in (("scales", scales), ("zeros", zeros)):
        torch._check(
            t.dtype == torch.float16 and t.dim() == 2 and list(t.shape) == [out_features, groups],
            lambda: f"{op}: {name} must be float16 [{out_features}, {groups}], got {t.dtype} {list(t.shape)}",
        )
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features and bias.is_floating_point(),
                     lambda: f"{op}: bias must be a float [{out_features}] tensor")
    for t in (qweight, scales, zeros):
        torch._check(t.device == x.device, lambda: f"{op}: all tensors must be on {x.device}")
    if bias is not None:
        torch._check(bias.device == x.device, lambda: f"{op}: bias must be on {x.device}")


def quant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ dequantize(W)^T (+ bias)`` in fp32, returned in ``x.dtype``; see the module docstring."""
    check_quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, out_features, in_features)
    w = dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros, group_size)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
