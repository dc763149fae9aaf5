"""pytest-benchmark suite: one decode step of the default model, unpatched vs steered vs hooks.

Run with ``make bench`` or ``python -m pytest benchmarks -q``; pytest-benchmark reports the
statistics (compare the medians within one run). ``splice bench steer`` gives the same comparison
as JSON with ratios.
"""

import pytest

from splice.bench.steer import settings
from splice.bench.timing import decode_step
from splice.models.loader import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()[0]


CASES = [(name, b) for name in ("unpatched", "steered", "hooks") for b in (1, 16)] + [("distinct16", 16)]


@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_decode_step(benchmark, model, name, batch):
    setting = next(s for s in settings(model, (1, 16)) if s.name == name)
    undo = setting.apply()
    try:
        step = decode_step(model, batch)
        benchmark.group = f"decode b{batch}"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    finally:
        undo()
