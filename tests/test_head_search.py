"""PH3 head search on the default model: knowledge-conflict prompts, gradient screening that agrees
with measured pruning, and ``splice search heads`` writing a recipe that does what its report says."""

import json

import pytest
import torch

import splice
from splice.cli import main
from splice.recipe import load_recipe
from splice.tools.head_search import (conflict_rates, objective_with, pruning_attribution, search_heads,
                                      split_conflicts)
from splice.tools.knowledge_conflict import (answer_token, builtin_facts, closed_book, context_margins, last_logits,
                                             make_conflicts, parse_facts)


@pytest.fixture(scope="module")
def conflicts(real_model):
    _, tok = real_model
    return make_conflicts(tok, builtin_facts())


def test_conflicts_pair_each_fact_with_another_answer_of_its_relation(real_model, conflicts):
    _, tok = real_model
    facts = {f["cloze"]: f for f in builtin_facts()}
    answers = {}
    for f in facts.values():
        answers.setdefault(f["relation"], set()).add(f["memory"])
    assert len(conflicts) >= 40
    for c in conflicts:
        relation = facts[c.cloze]["relation"]
        assert c.memory == facts[c.cloze]["memory"] and c.context in answers[relation]
        assert c.context_id != c.memory_id == answer_token(tok, c.memory)
        assert f"Passage: {c.cloze} {c.context}." in c.prompt and c.prompt.endswith(c.cloze)
        assert c.closed_prompt.endswith(c.cloze) and c.context not in c.closed_prompt


def test_last_logits_are_each_prompts_own_whichever_side_pads(real_model, conflicts):
    model, tok = real_model
    prompts = [conflicts[0].prompt, conflicts[1].closed_prompt]  # different lengths
    assert len(tok(prompts[0])["input_ids"]) != len(tok(prompts[1])["input_ids"])
    with torch.no_grad():
        alone = torch.cat([last_logits(model, tok, [p]) for p in prompts])
        side = tok.padding_side
        try:
            for tok.padding_side in ("left", "right"):
                torch.testing.assert_close(last_logits(model, tok, prompts), alone, atol=2e-3, rtol=1e-4)
        finally:
            tok.padding_side = side


@pytest.mark.slow
def test_the_model_follows_a_contradicting_passage_and_pruning_a_screened_head_reduces_that(real_model, conflicts):
    model, tok = real_model
    with torch.no_grad():
        margins = context_margins(model, tok, conflicts[:16])
    assert float((margins > 0).float().mean()) > 0.8  # a 135M model copies the passage
    gain = pruning_attribution(model, tok, conflicts[:16], "memory", retain=0.0)
    assert gain.shape == (30, 9) and torch.isfinite(gain).all()
    top = divmod(int(gain.flatten().argmax()), 9)
    bottom = divmod(int(gain.flatten().argmin()), 9)
    base = objective_with(model, tok, conflicts[:16], "memory", 0.0, [])
    assert objective_with(model, tok, conflicts[:16], "memory", 0.0, [top]) > base
    assert objective_with(model, tok, conflicts[:16], "memory", 0.0, [bottom]) < base
    # toward context is the same objective with the other sign
    assert objective_with(model, tok, conflicts[:16], "context", 0.0, []) == pytest.approx(-base)


@pytest.mark.slow
def test_search_heads_cli_writes_a_recipe_that_reproduces_its_held_out_report(real_model, conflicts, tmp_path):
    model, tok = real_model
    out, report_path = tmp_path / "ph3.yaml", tmp_path / "ph3.json"
    assert main(["search", "heads", "--k", "2", "--candidates", "4", "--out", str(out),
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    held = report["held_out"]
    assert 1 <= len(report["pruned_heads"]) <= 2 and len(report["screened"]) == 4
    assert report["objective_pruned"] > report["objective_base"]
    assert held["pruned"]["follows_memory"] > held["unpatched"]["follows_memory"]
    recipe = load_recipe(out)
    (name, scale), = recipe.default
    pruned = recipe.steers[name]
    assert isinstance(pruned, splice.HeadScale) and scale == 0.0
    assert sorted([l, h] for l, hs in pruned.heads.items() for h in hs) == sorted(report["pruned_heads"])
    # the recipe, applied through splice.patch, gives the numbers the report gives on the same split
    with torch.no_grad():
        ok = closed_book(model, tok, conflicts)[1].tolist()
    _, test = split_conflicts([c for c, k in zip(conflicts, ok) if k], 0.34, 0)
    with splice.patch(model, recipe=str(out)):
        rates = conflict_rates(model, tok, test)
    assert rates["follows_memory"] == pytest.approx(held["pruned"]["follows_memory"])
    assert rates["mean_margin"] == pytest.approx(held["pruned"]["mean_margin"], abs=1e-3)


def test_bad_search_input_is_refused_before_the_model_changes(real_model, conflicts, tmp_path):
    model, tok = real_model
    with torch.no_grad():
        before = context_margins(model, tok, conflicts[:4])
    for kwargs, match in (({"toward": "both"}, "toward must be one of"), ({"k": 5, "candidates": 4}, "k <= candidates"),
                          ({"candidates": 271}, "270"), ({"retain": float("nan")}, "retain"),
                          ({"k": 0}, "k must be a positive int"), ({"held_out": 1.0}, "held_out")):
        with pytest.raises(ValueError, match=match):
            search_heads(model, tok, conflicts, progress=False, **kwargs)
    with pytest.raises(ValueError, match="at least 8 conflicts in each split"):
        search_heads(model, tok, conflicts[:10], progress=False)
    with torch.no_grad():
        assert torch.equal(context_margins(model, tok, conflicts[:4]), before)
    for text, match in (("[]", "expected"), ('{"facts": [{"cloze": "x"}]}', r"facts\[0\]"), ("{", "invalid JSON")):
        with pytest.raises(ValueError, match=match):
            parse_facts(text, "user.json")
    bad = tmp_path / "few.json"
    bad.write_text(json.dumps({"facts": [{"relation": "r", "cloze": "a", "memory": "b"}]}))
    with pytest.raises(SystemExit, match="recipe"):
        main(["search", "heads", "--facts", str(bad), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
