"""pytest-benchmark suite: one decode step of the default model with layers skipped.

Groups compare, within one run: the unpatched model vs the model patched with no items (the
patch's idle cost) vs 25% of the layers skipped statically (batch 1), and at batch 8 the
unpatched model vs a router that sends half the rows through ``gather_rows``/``scatter_rows``
around the same layers. ``splice bench skip`` gives the full
quality/speed report as JSON with ratios.
"""

from contextlib import nullcontext

import pytest
import torch

import splice
from splice.bench.timing import decode_step
from splice.models.loader import load_model
from splice.skipping.routers import Router

SKIPPED = [3, 4, 5, 7, 12, 14, 15, 17]  # 8 of 30 layers, cheap to remove on WikiText-2


class HalfRows(Router):
    """Even rows skip the candidate layers while decoding, odd rows run them."""

    kind = "half"

    def score(self, layer, x_in, x_out, mask):
        return torch.tensor([1.0 if r % 2 == 0 else -1.0 for r in range(x_in.shape[0])])


@pytest.fixture(scope="module")
def model():
    return load_model()[0]


CASES = [("unpatched", 1), ("patch_idle", 1), ("skip25", 1), ("unpatched", 8), ("routed_half", 8), ("skip25", 8)]


@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_decode_step(benchmark, model, name, batch):
    items, router = [], None
    if name == "skip25":
        items = [splice.Skip(SKIPPED)]
    elif name == "routed_half":
        router = HalfRows(SKIPPED, model.config.num_hidden_layers, model.config.hidden_size)
    with nullcontext() if name == "unpatched" else splice.patch(model, *items, router=router):
        step = decode_step(model, batch)
        benchmark.group = f"skip: decode b{batch}"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
