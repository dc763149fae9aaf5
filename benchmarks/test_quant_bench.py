"""pytest-benchmark suite: the C++ ``splice::quant_matmul`` against ``F.linear`` on dense weights.

SmolLM2-135M's linear shapes (N × K: attention/MLP projections and the tied lm_head) at decode
(T = 1), batched decode (T = 8, 16: the multi-token kernel) and prefill (T = 64), every width at
group size 64, against ``F.linear`` with fp32 and bf16 weights. Each (shape, T) is one benchmark group, so compare the medians within a group.
Run with ``python -m pytest benchmarks/test_quant_bench.py -q``.
"""

import pytest
import torch
import torch.nn.functional as F

from splice.ops import backend_for, quant_matmul
from splice.ops.quant_packing import PackedWeight
from splice.quant.quantizers import quantize

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
TOKENS = [1, 8, 16, 64]
GROUP = 64
KINDS = ["f32", "bf16", "q2", "q3", "q4", "q8"]


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return {shape: torch.randn(*shape, generator=g) * 0.02 for shape in SHAPES}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear(benchmark, weights, shape, t, kind):
    n, k = shape
    w = weights[shape]
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(1))
    benchmark.group = f"{n}x{k} T={t}"
    if kind == "f32":
        fn = lambda: F.linear(x, w)  # noqa: E731
    elif kind == "bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        fn = lambda: F.linear(xb, wb)  # noqa: E731
    else:
        bits = int(kind[1:])
        pw = PackedWeight.from_quantized(quantize(w, bits, GROUP))
        benchmark.extra_info["backend"] = backend_for("quant_matmul", "cpu")
        fn = lambda: quant_matmul(x, pw.qweight, pw.scales, pw.zeros, None, bits, GROUP, n, k)  # noqa: E731
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=30 if n * t < 2**20 else 10, iterations=1, warmup_rounds=3)
