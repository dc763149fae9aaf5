"""Gated steering, prefill decisions (CAST conditions), low-rank/affine maps and head scaling through
splice.patch on tiny models, each checked against an independent implementation with forward hooks."""

import math

import pytest
import torch
from tiny_models import HEAD_DIM, HEADS, HIDDEN, LAYERS, greedy, left_padded_batch, logits, tiny_model

import splice
from splice.steering.gates import cast_score, pool
from splice.runtime.token_state import prompt_token_mask

ATOL = 2e-5


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def hook_out(model, layer, fn):
    """A forward hook replacing decoder layer ``layer``'s output ``u`` by ``fn(u)``."""
    def hook(module, args, out):
        return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
    return model.model.layers[layer].register_forward_hook(hook)


def hooked_logits(model, hooks, ids, mask):
    handles = [hook_out(model, layer, fn) for layer, fn in hooks.items()]
    try:
        return logits(model, ids, mask)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_low_rank_map_equals_the_matrix_formula(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    A = {l: rand(HIDDEN, 8, seed=l, scale=0.1) for l in (0, 2)}
    B = {l: rand(HIDDEN, 8, seed=10 + l, scale=0.1) for l in (0, 2)}
    c = {l: rand(8, seed=20 + l) for l in (0, 2)}
    expected = hooked_logits(model, {l: (lambda u, l=l: u + 1.5 * (u @ A[l] - c[l]) @ B[l].T) for l in A}, ids, mask)
    with splice.patch(model, splice.LowRank(A=A, B=B, c=c, scale=1.5)):
        got = logits(model, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, logits(model, ids, mask), atol=1e-2)  # the map did something


def test_affine_map_equals_a_times_u_plus_b():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    a = {1: 1.0 + rand(HIDDEN, seed=1, scale=0.3)}
    b = {1: rand(HIDDEN, seed=2)}
    expected = hooked_logits(model, {1: lambda u: a[1] * u + b[1]}, ids, mask)
    with splice.patch(model, splice.Affine(a=a, b=b)):
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("factor", [0.0, 2.5])
def test_head_scale_equals_scaling_the_heads_before_o_proj(factor):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    heads = [1, 3]
    keep = torch.ones(HEADS * HEAD_DIM)
    for h in heads:
        keep[h * HEAD_DIM:(h + 1) * HEAD_DIM] = factor
    handle = model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] * keep,))
    expected = logits(model, ids, mask)
    handle.remove()
    with splice.patch(model, splice.HeadScale(heads={2: heads}, scale=factor)):
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=ATOL, rtol=1e-5)


def test_soft_token_gate_equals_a_per_token_sigmoid():
    """g = sigmoid((cos(u, p) − b) / τ) per token, times the added vector, at the layer's output."""
    model = tiny_model("mistral")
    ids, mask = left_padded_batch()
    v, p, b, tau = rand(HIDDEN, seed=3, scale=3.0), rand(HIDDEN, seed=4), 0.05, 0.1

    def gated(u):
        g = torch.sigmoid((torch.nn.functional.cosine_similarity(u, p.expand_as(u), dim=-1) - b) / tau)
        return u + g[..., None] * v
    expected = hooked_logits(model, {1: gated}, ids, mask)
    steer = splice.Steer(v, layers=[1], gate=splice.TokenGate(p, threshold=b, temperature=tau))
    with splice.patch(model, steer):
        got = logits(model, ids, mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_hard_token_gate_passes_or_blocks_every_token_at_its_extremes():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    v, p = rand(HIDDEN, seed=3, scale=3.0), rand(HIDDEN, seed=4)
    plain = logits(model, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=[0, 1])):
        always = logits(model, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=[0, 1], gate=splice.TokenGate(p, threshold=-1.0))):
        torch.testing.assert_close(logits(model, ids, mask), always, atol=ATOL, rtol=0)
    with splice.patch(model, splice.Steer(v, layers=[0, 1], gate=splice.TokenGate(p, threshold=1.0))):
        torch.testing.assert_close(logits(model, ids, mask), plain, atol=ATOL, rtol=0)
    assert not torch.allclose(always, plain, atol=1e-2)


def _condition_between(model, ids, mask, layer, rows_met):
    """A Condition at ``layer`` whose threshold lies between the prompts of ``rows_met`` and the others."""
    c = rand(HIDDEN, seed=7)
    scores = cast_score(pool(_layer_input(model, ids, mask, layer), mask.float(), "mean"), c)
    met, other = scores[rows_met], scores[[i for i in range(len(scores)) if i not in rows_met]]
    if met.min() > other.max():
        return splice.Condition(c, layer, float(met.min() + other.max()) / 2, "above")
    assert met.max() < other.min(), "pick another seed: the scores of the two groups overlap"
    return splice.Condition(c, layer, float(met.max() + other.min()) / 2, "below")


def test_condition_steers_exactly_the_requests_that_meet_it():
    """CAST: a request that meets the condition (decided at prefill at layer 0's input) generates as
    if steered unconditionally; the others exactly as unsteered, prompt and decode alike."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    cond = _condition_between(model, ids, mask, 0, rows_met=[1])
    v = rand(HIDDEN, seed=5, scale=4.0)
    plain = greedy(model, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=[1, 2])):
        steered = greedy(model, ids, mask)
        steered_logits = logits(model, ids, mask)
    assert not torch.equal(steered[1], plain[1])
    with splice.patch(model, splice.Steer(v, layers=[1, 2], gate=cond)):
        got = greedy(model, ids, mask)
        got_logits = logits(model, ids, mask)
    assert torch.equal(got[1], steered[1])
    assert torch.equal(got[[0, 2]], plain[[0, 2]])
    torch.testing.assert_close(got_logits[1], steered_logits[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_logits[[0, 2]], logits(model, ids, mask)[[0, 2]], atol=ATOL, rtol=0)


def test_condition_decision_is_not_applied_before_its_layer_on_the_prompt():
    """A condition read at layer 1 cannot steer layer 0 of the prompt (nothing was decided yet);
    on generated tokens it steers every listed layer."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    cond = _condition_between(model, ids, mask, 1, rows_met=[0, 1, 2][:1])
    v = rand(HIDDEN, seed=5, scale=4.0)
    with splice.patch(model, splice.Steer(v, layers=[2])):
        late = logits(model, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=[0, 2], gate=cond)):
        got = logits(model, ids, mask)
    torch.testing.assert_close(got[0], late[0], atol=ATOL, rtol=0)


def test_condition_and_per_request_slots_compose():
    """Slot 1 is conditional, slot 2 unconditional; rows choose slots; each row equals itself alone."""
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    cond = _condition_between(model, ids, mask, 0, rows_met=[0])
    v, w = rand(HIDDEN, seed=5, scale=4.0), rand(HIDDEN, seed=6, scale=4.0)
    with splice.patch(model, max_slots=3) as p:
        p.set_slot(1, [splice.Steer(v, layers=[1, 2], gate=cond, name="cv")])
        p.set_slot(2, [splice.Steer(w, layers=[1], name="w")])
        p.assign([1, 1, 2])
        mixed = logits(model, ids, mask)
        p.assign([2, 2, 2])
        all_w = logits(model, ids, mask)
        p.assign(None)
        all_cond = logits(model, ids, mask)
    torch.testing.assert_close(mixed[:2], all_cond[:2], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], all_w[2], atol=ATOL, rtol=0)


def test_bad_maps_and_gates_are_refused_before_the_model_changes():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    before = logits(model, ids, mask)
    A = {1: rand(HIDDEN, 4)}
    cases = [
        (lambda: splice.LowRank(A={1: rand(HIDDEN, 17)}, B={1: rand(HIDDEN, 17)}), "rank 17"),
        (lambda: splice.LowRank(A=A, B={1: rand(HIDDEN, 3)}), "must both be"),
        (lambda: splice.LowRank(A=A, B={2: rand(HIDDEN, 4)}), "same layers"),
        (lambda: splice.LowRank(A={1: torch.full((HIDDEN, 4), math.nan)}, B=A), "NaN or inf"),
        (lambda: splice.Affine(a={1: rand(HIDDEN)}, b={1: rand(HIDDEN + 1)}), "one size"),
        (lambda: splice.TokenGate(rand(HIDDEN), threshold=2.0), r"\[-1, 1\]"),
        (lambda: splice.TokenGate(rand(HIDDEN), temperature=-1.0), ">= 0"),
        (lambda: splice.Condition(rand(HIDDEN), 0, math.inf), "finite"),
        (lambda: splice.HeadScale(heads={1: []}), "at least one head"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    fits_not = [
        (splice.LowRank(A={1: rand(HIDDEN + 2, 4)}, B={1: rand(HIDDEN + 2, 4)}), "does not match"),
        (splice.LowRank(A={LAYERS: rand(HIDDEN, 4)}, B={LAYERS: rand(HIDDEN, 4)}), "out of range"),
        (splice.Steer(rand(HIDDEN), layers=[1], gate=splice.Condition(rand(HIDDEN + 1), 0, 0.0)), "hidden size"),
        (splice.Steer(rand(HIDDEN), layers=[1], gate=splice.Condition(rand(HIDDEN), LAYERS, 0.0)), "out of range"),
        (splice.Steer(rand(HIDDEN), layers=[1], gate=splice.TokenGate(torch.zeros(HIDDEN))), "is zero"),
        (splice.Steer(rand(HIDDEN), layers=[1], gate=splice.TokenGate(rand(HIDDEN - 1))), "does not match"),
        (splice.HeadScale(heads={1: [HEADS]}), "out of range"),
    ]
    for item, message in fits_not:
        with pytest.raises(ValueError, match=message):
            splice.patch(model, item)
        assert not hasattr(model, "splice_runtime")
        assert torch.equal(logits(model, ids, mask), before)


def test_prompt_token_mask_marks_the_left_padded_prompt():
    mask = prompt_token_mask(torch.tensor([3, 1]), 4)
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def _layer_input(model, ids, mask, layer):
    captured = {}
    handle = model.model.layers[layer].register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(h=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    logits(model, ids, mask)
    handle.remove()
    return captured["h"]


def test_probe_selected_bank_gives_each_request_the_vector_its_probe_chose():
    """G-ACT: a probe at layer 0 picks one of three vectors per request; each row then equals that
    row steered by its chosen vector alone (layers 1-2, after the probe)."""
    from splice.steering.probe_select import ProbeSelect

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    probe = ProbeSelect(rand(3, HIDDEN, seed=8), torch.zeros(3), torch.zeros(HIDDEN), torch.ones(HIDDEN), 0)
    h = _layer_input(model, ids, mask, 0)
    choice = probe.logits(h, prompt_token_mask(mask.sum(1), ids.shape[1])).argmax(-1).tolist()
    assert len(set(choice)) >= 2, "pick another seed: the probe sends every row to one vector"
    bank = [rand(HIDDEN, seed=30 + k, scale=4.0) for k in range(3)]
    with splice.patch(model, *[splice.Steer(v, layers=[1, 2], gate=probe.choice(k), name=f"b{k}")
                               for k, v in enumerate(bank)]):
        got = logits(model, ids, mask)
    for row, k in enumerate(choice):
        with splice.patch(model, splice.Steer(bank[k], layers=[1, 2])):
            alone = logits(model, ids, mask)
        torch.testing.assert_close(got[row], alone[row], atol=ATOL, rtol=0)


def test_kmeans_recovers_separated_clusters():
    from splice.tools.gact import kmeans

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    truth = torch.arange(30) % 3
    x = centers[truth] + 0.3 * torch.randn(30, 2, generator=g)
    labels = kmeans(x, 3)
    for k in range(3):  # every true cluster maps to one found cluster, and vice versa
        assert labels[truth == k].unique().numel() == 1
    assert labels.unique().numel() == 3


def test_bad_probes_are_refused():
    from splice.steering.probe_select import ProbeSelect

    ok = dict(weight=rand(3, HIDDEN), bias=torch.zeros(3), mean=torch.zeros(HIDDEN), std=torch.ones(HIDDEN), layer=0)
    with pytest.raises(ValueError, match="K >= 2"):
        ProbeSelect(**{**ok, "weight": rand(1, HIDDEN), "bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="std must be positive"):
        ProbeSelect(**{**ok, "std": torch.zeros(HIDDEN)})
    with pytest.raises(ValueError, match="out of range"):
        ProbeSelect(**ok).choice(3)
    model = tiny_model("llama")
    wrong = ProbeSelect(**{**ok, "weight": rand(3, HIDDEN + 1), "mean": torch.zeros(HIDDEN + 1),
                           "std": torch.ones(HIDDEN + 1)})
    with pytest.raises(ValueError, match="hidden size"):
        splice.patch(model, splice.Steer(rand(HIDDEN), layers=[1], gate=wrong.choice(0)))
    assert not hasattr(model, "splice_runtime")


def test_controller_gates_each_layer_by_its_global_scale_times_layer_weight():
    """Guiding Giants: per request, vector v at layer l_j is added with gate s · w_j (decided at
    prefill from layer 0's input); checked against hooks that add exactly that per row."""
    from splice.steering.controller import Controller

    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    units, layers = 5, [1, 2]
    ctl = Controller(rand(units, HIDDEN, seed=40) * 0.3, rand(units, seed=41), rand(3, units, seed=42),
                     rand(3, seed=43), rand(HIDDEN, seed=44) * 0.1, torch.ones(HIDDEN), 0, layers)
    gates = ctl.decide(_layer_input(model, ids, mask, 0), prompt_token_mask(mask.sum(1), ids.shape[1]))
    assert gates.shape == (3, 2) and gates.std() > 0.01  # rows and layers get different gates
    v = rand(HIDDEN, seed=45, scale=4.0)
    expected = hooked_logits(model, {l: (lambda u, j=j: u + gates[:, j, None, None] * 1.5 * v)
                                     for j, l in enumerate(layers)}, ids, mask)
    with splice.patch(model, splice.Steer(v, layers=layers, scale=1.5, gate=ctl)):
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no weight for layer 0"):
        splice.patch(model, splice.Steer(v, layers=[0, 1], gate=ctl))
    assert not hasattr(model, "splice_runtime")
    with pytest.raises(ValueError, match="shapes do not fit"):
        Controller(rand(units, HIDDEN), rand(units), rand(2, units), rand(3), torch.zeros(HIDDEN),
                   torch.ones(HIDDEN), 0, layers)
