"""pytest-benchmark suite: one decode step of the default model, unpatched vs steered vs hooks.

Run with ``make bench`` or ``python -m pytest benchmarks -q``; pytest-benchmark reports the
statistics (compare the medians within one run). ``splice bench steer`` gives the same comparison
as JSON with ratios.
"""

import pytest
import torch

from splice.bench.steer import settings
from splice.bench.timing import make_batch
from splice.models.loader import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()[0]


def _decode_step(model, batch):
    ids = make_batch(batch, 64, model.config.vocab_size)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    position = torch.full((batch, 1), 64, dtype=torch.long)

    def step():
        cache = out.past_key_values
        cache.crop(64)  # every timed step decodes position 64 over the same 64-token prefix
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)

    return step


CASES = [(name, b) for name in ("unpatched", "steered", "hooks") for b in (1, 16)] + [("distinct16", 16)]


@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_decode_step(benchmark, model, name, batch):
    setting = next(s for s in settings(model, (1, 16)) if s.name == name)
    undo = setting.apply()
    try:
        step = _decode_step(model, batch)
        benchmark.group = f"decode b{batch}"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    finally:
        undo()
