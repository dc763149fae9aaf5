"""CAST decisions on vLLM's flat steps (no vLLM server): a prompt's decision from its tokens of one
step equals the condition on the Hugging Face batch; it reaches the prompt's own later layers and
every later step of that row only; a split prompt is an error; rows follow vLLM's moves; under
torch.compile the gates written by ``splice::serve_decide`` are what later ops read."""

import pytest
import torch

from splice.serving.prefill_decisions import PrefillDecisions, serve_decide
from splice.steering.gates import Condition

H, LAYER = 8, 2


def _condition(compare="above"):
    vector = torch.zeros(H)
    vector[0] = 1.0
    return Condition(vector, LAYER, threshold=0.5, compare=compare)


def _step():
    """Three rows in one flat step: row 0 a 4-token prompt along the condition's vector (met), row 2
    a 3-token prompt orthogonal to it (not met), row 1 one decode token; tokens grouped by row."""
    gen = torch.Generator().manual_seed(0)
    stream = 0.1 * torch.randn(8, H, generator=gen)
    stream[0:4, 0] += 5.0
    stream[5:8, 0] = 0.0
    stream[5:8, 1] += 5.0
    rows = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
    positions = torch.tensor([0, 1, 2, 3, 9, 0, 1, 2])
    prompt = torch.tensor([4, 6, 3])
    return stream, rows, positions, prompt


def _decisions(*conditions):
    d = PrefillDecisions(list(conditions), max_rows=3, max_tokens=16, device=torch.device("cpu"))
    for slot in (1, 2):
        d.use(slot, list(conditions))
    return d


def test_each_prompt_decides_as_the_hugging_face_batch_would():
    met, unmet = _condition(), _condition("below")
    d = _decisions(met, unmet)
    stream, rows, positions, prompt = _step()
    d.row_gate[1] = torch.tensor([1.0, 0.0])  # row 1 decided at its own prefill, steps ago
    d.plan(rows, positions, prompt, [1, 1, 2])
    d.decide(LAYER, stream, d.gates)
    hf = torch.zeros(2, 4, H)  # the two prompts as a left-padded Hugging Face batch
    hf[0], hf[1, 1:] = stream[0:4], stream[5:8]
    mask = torch.tensor([[1.0, 1, 1, 1], [0, 1, 1, 1]])
    want = torch.cat([met.decide(hf, mask), unmet.decide(hf, mask)], 1)
    assert want.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # the step really decides both ways
    assert d.row_gate[[0, 2]].tolist() == want.tolist()
    assert d.gates[:4].tolist() == [want[0].tolist()] * 4 and d.gates[5:8].tolist() == [want[1].tolist()] * 3
    assert d.gates[4].tolist() == [1.0, 0.0]  # the decode token keeps its row's earlier decision


def test_only_configurations_gated_by_a_condition_decide():
    d = _decisions(_condition())
    stream, rows, positions, prompt = _step()
    d.plan(rows, positions, prompt, [0, 0, 0])  # every row unsteered (slot 0)
    d.decide(LAYER, stream, d.gates)
    assert not d.row_gate.any() and not d.gates.any()


def test_a_prompt_split_across_steps_is_an_error():
    d = _decisions(_condition())
    stream, rows, positions, prompt = _step()
    with pytest.raises(RuntimeError, match="reached the model in parts"):
        d.plan(rows[1:4], positions[1:4], prompt, [1, 1, 1])  # the prompt's tail only (a prefix-cache hit)


def test_rows_follow_vllm_moves():
    d = _decisions(_condition())
    d.row_gate[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    d.swap(0, 2)
    assert d.row_gate[:, 0].tolist() == [3.0, 2.0, 1.0]
    d.move(1, 0)
    assert d.row_gate[:, 0].tolist() == [2.0, 0.0, 1.0]
    d.reset(2)
    assert d.row_gate[:, 0].tolist() == [2.0, 0.0, 0.0]


def test_compiled_reads_see_the_decision():
    d = _decisions(_condition())
    stream, rows, positions, prompt = _step()

    def layer(stream, gates):
        serve_decide(stream, gates, LAYER)
        return stream * gates[:stream.shape[0], :1]

    d.plan(rows, positions, prompt, [1, 0, 1])
    eager = layer(stream, d.gates).clone()
    d.reset(0)
    d.reset(2)
    d.plan(rows, positions, prompt, [1, 0, 1])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(stream, d.gates)
    assert torch.equal(compiled, eager)
    assert eager[:4].abs().sum() > 0 and not eager[4:].any()  # row 0 met, row 2 not, row 1 unsteered
