"""pytest-benchmark suite: ``splice::index_attention`` over K = 512 chosen slots of an 8K-slot cache
against ``splice::decode_attention`` over all of it: HyLRA's reuse path against full attention, one
decode step of SmolLM2-135M's attention (4 rows, 9 query / 3 KV heads, head size 64), the C++ CPU
kernels (the dispatcher's choice, asserted), float32 and bfloat16. The chosen slots are distinct and in
no order (as a top-k gives them). Each dtype is one benchmark group: compare the medians within it.
Run with ``python -m pytest benchmarks/test_index_attention_bench.py -q``.
"""

import functools

import pytest
import torch

from splice.ops import backend_for, decode_attention, index_attention
from splice.ops.library import extension_error

B, HQ, HKV, L, D, K = 4, 9, 3, 8192, 64, 512


@functools.cache
def inputs(dtype: torch.dtype):
    """q [B, HQ, D], k and v [B, HKV, L, D], idx [B, HKV, K] (random distinct slots), valid [B, L] all True."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, D, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, L, D, generator=g).to(dtype) for _ in range(2))
    idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B * HKV)]).view(B, HKV, K)
    return q, k, v, idx, torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["decode_attention", "index_attention"])
def test_attention_decode(benchmark, op, dtype):
    q, k, v, idx, valid = inputs(dtype)
    if op == "decode_attention":
        fn = lambda: decode_attention(q, k, v, valid, D**-0.5)  # noqa: E731
    else:
        fn = lambda: index_attention(q, k, v, idx, D**-0.5)  # noqa: E731
    benchmark.group = f"decode attention L={L} {dtype}"
    benchmark.extra_info["backend"] = backend = backend_for(op, "cpu")
    assert backend == "cpp", f"{op} would run on {backend!r}: {extension_error()}"
    with torch.inference_mode():  # the dispatcher's choice, as on the hot path (no per-call backend lookup)
        benchmark.pedantic(fn, rounds=50, iterations=1, warmup_rounds=5)
