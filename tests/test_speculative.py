"""Self-speculative decoding is lossless: its greedy output equals the full model's."""

import pytest
import torch
from tiny_models import HIDDEN, LAYERS, VOCAB, tiny_model

import splice
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.tools.speculative import lookup_draft, search_draft, speculative_generate


def prompt(seed=0, n=6):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_output_equals_greedy_generation(family, draft_len):
    model = tiny_model(family)
    ids = prompt()
    expected = greedy(model, ids, 12)
    out, stats = speculative_generate(model, ids, 12, draft_layers=[2], draft_len=draft_len)
    assert torch.equal(out, expected)
    assert stats.new_tokens == 12 and 0 <= stats.accepted <= stats.drafted
    assert not hasattr(model, ATTRIBUTE)  # patched only for the call


def test_draft_equal_to_the_model_accepts_everything():
    """With a draft that skips a layer made inert, every drafted token is accepted."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    out, stats = speculative_generate(model, prompt(1), 10, draft_layers=[1], draft_len=4)
    assert torch.equal(out, greedy(model, prompt(1), 10))
    assert stats.acceptance == 1.0


def test_composes_with_steering_and_static_skips():
    model = tiny_model("llama")
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0)) * 4
    with splice.patch(model, splice.Steer(v, layers=[0], scale=1.0), splice.Skip([2], "mlp")):
        expected = greedy(model, prompt(2), 10)
        out, _ = speculative_generate(model, prompt(2), 10, draft_layers=[1], draft_len=3)
    assert torch.equal(out, expected)


def test_eos_stops_generation():
    model = tiny_model("llama")
    full = greedy(model, prompt(3), 8)
    eos = int(full[0, 6 + 2])
    out, _ = speculative_generate(model, prompt(3), 8, draft_layers=[2], draft_len=3, eos_token_id=eos)
    first = int((full[0, 6:] == eos).nonzero()[0])
    assert torch.equal(out, full[:, :6 + first + 1])


def test_no_draft_decodes_plainly():
    model = tiny_model("llama")
    out, stats = speculative_generate(model, prompt(5), 9, draft_layers=None, draft_len=0)
    assert torch.equal(out, greedy(model, prompt(5), 9))
    assert (stats.new_tokens, stats.cycles, stats.drafted) == (9, 0, 0)


def test_search_runs_every_trial_and_plain_decoding_on_the_real_loop():
    model = tiny_model("llama")
    best, trials = search_draft(model, [prompt(4)], order=[2, 1, 0], counts=[1, 2], lengths=[2, 3], new_tokens=6,
                                progress=False)
    plain, drafts = trials[0], trials[1:]
    assert (plain.layers, plain.draft_len) == ([], 0) and len(drafts) == 4
    assert all(t.layers and 0 not in t.layers for t in drafts)
    fastest = max(drafts, key=lambda t: t.tokens_per_second)
    assert best == (fastest if fastest.tokens_per_second > plain.tokens_per_second else None)


def _timed_search(monkeypatch, seconds_by_draft, lookups=(0,)):
    """search_draft with speculative_generate replaced: each run takes ``seconds_by_draft[layers]``."""
    import splice.tools.speculative as speculative

    def fake(model, ids, new_tokens, layers, length, lookup_ngram=0):
        drafted = 0 if layers is None and not lookup_ngram else length
        key = (layers and tuple(layers), lookup_ngram) if lookup_ngram else layers and tuple(layers)
        return ids, speculative.SpeculativeStats(new_tokens, 1, drafted, drafted, seconds_by_draft[key])

    monkeypatch.setattr(speculative, "speculative_generate", fake)
    return speculative.search_draft(None, [prompt()], order=[2, 1], counts=[0, 1, 2], lengths=[2], lookups=lookups,
                                    new_tokens=10, progress=False)


def test_search_says_no_draft_when_plain_decoding_is_fastest(monkeypatch):
    best, trials = _timed_search(monkeypatch, {None: 1.0, (2,): 1.2, (1, 2): 1.5})
    assert best is None and trials[0].tokens_per_second == 10.0


def test_search_picks_the_draft_that_beats_plain_decoding(monkeypatch):
    best, _ = _timed_search(monkeypatch, {None: 1.0, (2,): 0.8, (1, 2): 0.9})
    assert (best.layers, best.draft_len, best.tokens_per_second) == ([2], 2, 12.5)


def test_search_tries_lookup_alone_and_with_each_skip_draft(monkeypatch):
    best, trials = _timed_search(monkeypatch, {None: 1.0, (2,): 1.1, (1, 2): 1.2, (None, 3): 0.5, ((2,), 3): 0.7,
                                               ((1, 2), 3): 0.9}, lookups=(0, 3))
    tried = [(t.layers, t.lookup_ngram) for t in trials[1:]]
    assert tried == [([2], 0), ([1, 2], 0), ([], 3), ([2], 3), ([1, 2], 3)]  # count 0 without lookup is no draft
    assert (best.layers, best.lookup_ngram, best.tokens_per_second) == ([], 3, 20.0)


def test_search_needs_a_draft():
    with pytest.raises(ValueError, match="needs a draft"):
        search_draft(tiny_model("llama"), [prompt()], order=[2, 1], counts=[0], lengths=[2], progress=False)


@pytest.mark.parametrize("context, ngram, length, expected", [
    ([5, 6, 7, 8, 9, 5, 6], 3, 4, [7, 8, 9, 5]),        # the last 2-gram (5, 6) occurred at 0
    ([5, 6, 7, 1, 6, 2, 5, 6], 2, 2, [7, 1]),           # the longest n-gram wins over a later 1-gram match
    ([1, 6, 2, 5, 6, 3, 4, 6], 2, 3, [3, 4, 6]),        # no 2-gram match: the most recent 1-gram match
    ([1, 2, 3, 4], 3, 2, []),                           # no match at all
    ([4, 4, 4], 3, 5, [4]),                             # overlapping occurrence, cut at the context's end
    ([7], 3, 2, []),                                    # nothing before the last token
])
def test_lookup_draft(context, ngram, length, expected):
    assert lookup_draft(torch.tensor(context), ngram, length).tolist() == expected


@pytest.mark.parametrize("draft_layers", [None, [2]])
@pytest.mark.parametrize("draft_len", [1, 4])
def test_prompt_lookup_output_equals_greedy_generation(draft_layers, draft_len):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 11, 5, 9, 11, 5, 9, 11, 5, 9]])  # a repetitive prompt: every n-gram matches
    expected = greedy(model, ids, 14)
    out, stats = speculative_generate(model, ids, 14, draft_layers, draft_len, lookup_ngram=3)
    assert torch.equal(out, expected)
    assert stats.looked_up >= 1 and stats.drafted >= stats.looked_up and stats.new_tokens == 14


def test_lookup_that_the_model_follows_saves_passes(real_model):
    """On a summary, which copies spans of its passage, prompt lookup proposals are accepted: fewer full passes
    than tokens, and the output is still the model's greedy output."""
    model, tok = real_model
    passage = ("The Lady of Shalott is a Victorian ballad by the English poet Alfred Tennyson. Like his other early "
               "poems, it is loosely based on an Arthurian legend, the story of a woman who lives in a tower on an "
               "island near Camelot and is under a curse.")
    ids = tok.apply_chat_template([{"role": "user", "content": f"Summarize the following passage.\n\n{passage}"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
    expected = greedy(model, ids, 32)
    out, stats = speculative_generate(model, ids, 32, None, 4, lookup_ngram=3)
    assert torch.equal(out, expected)
    assert stats.looked_up >= 4 and stats.accepted >= stats.new_tokens // 4  # a quarter of the tokens took no pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(draft_layers=None, draft_len=2, lookup_ngram=-1), "lookup_ngram"),
    (dict(draft_layers=None, draft_len=2, lookup_ngram=True), "lookup_ngram"),
    (dict(draft_layers=None, draft_len=0, lookup_ngram=2), "draft_len"),
    (dict(draft_layers=[0], draft_len=2), "layer 0"),
    (dict(draft_layers=[1, 2, 3], draft_len=2), "out of range"),
    (dict(draft_layers=[], draft_len=2), "at least one"),
    (dict(draft_layers=[1], draft_len=0), "draft_len"),
])
def test_bad_drafts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        speculative_generate(tiny_model("llama"), prompt(), 4, **kwargs)
