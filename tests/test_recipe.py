"""Recipes: files that describe interventions, validated before the model is touched."""

import json
import math
import threading

import pytest
import torch
import yaml
from tiny_models import HIDDEN, LAYERS, left_padded_batch, tiny_model

import splice
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.steering.files import save_intervention
from splice.steering.gates import cast_score, pool
from splice.vectors.gguf_control import export_control_vector
from splice.vectors.io import load_vectors, save_vectors


def logits(model):
    ids, mask = left_padded_batch()
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture
def vector_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    vs = splice.VectorSet({l: torch.randn(HIDDEN, generator=g) for l in range(1, LAYERS)}, site="out", arch="llama")
    save_vectors(vs, tmp_path / "a.safetensors")
    export_control_vector(vs, tmp_path / "a.gguf")
    return vs, tmp_path


def write(path, data):
    path.write_text(yaml.safe_dump(data) if path.suffix != ".json" else json.dumps(data))
    return path


def recipe_data(file="a.safetensors", **overrides):
    cfg = {"file": file, "layers": [1, 2], "op": "add", "scale": 0.5, "positions": "all", **overrides}
    return {"version": 1, "steering": {"vectors": {"a": cfg}, "default": ["a"]}}


@pytest.mark.parametrize("file,suffix", [("a.safetensors", ".yaml"), ("a.gguf", ".json")])
def test_recipe_file_steers_like_the_python_api(vector_files, file, suffix):
    vs, tmp = vector_files
    model = tiny_model("llama")
    with splice.patch(model, splice.Steer(vs, layers=[1, 2], scale=0.5)):
        direct = logits(model)
    with splice.patch(model, recipe=write(tmp / f"r{suffix}", recipe_data(file))):
        assert torch.equal(logits(model), direct)


def test_saved_patch_round_trips_through_a_recipe(vector_files, tmp_path):
    vs, _ = vector_files
    model = tiny_model("qwen3")
    steers = [splice.Steer(vs, layers=[1], scale=-1.0, name="a", positions=(2, 9)),
              splice.Steer(vs, layers=[2], op="clamp", lo=-0.5, hi=0.5, name="c"),
              splice.Steer(torch.ones(16), layers=[0], site="heads", head=1, scale=2.0, name="h")]
    (tmp_path / "out").mkdir()
    with splice.patch(model, *steers) as p:
        before = logits(model)
        path = p.save_recipe(tmp_path / "out" / "saved.yaml")
    assert (tmp_path / "out" / "saved.h.safetensors").exists()  # in-memory vectors saved beside it
    with splice.patch(model, recipe=path):
        assert torch.equal(logits(model), before)


def test_concurrent_saves_leave_one_whole_recipe_and_no_temporary(vector_files):
    _, tmp = vector_files
    recipes = [splice.Recipe.from_dict(recipe_data(scale=s), base=tmp) for s in (0.25, 0.75)]
    errors = []

    def save(recipe):
        try:
            for _ in range(30):
                recipe.save(tmp / "r.yaml")
        except Exception as exc:  # reported below: a save must never fail
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(r,)) for r in recipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.scale for s in splice.load_recipe(tmp / "r.yaml").steers.values()] in ([0.25], [0.75])
    assert sorted(p.name for p in tmp.iterdir()) == ["a.gguf", "a.safetensors", "r.yaml"]


BAD = {
    "unknown top-level key": ({"steering": {}, "steer": {}}, "unknown keys \\['steer'\\]"),
    "unknown vector key": (recipe_data(strength=2), "steering.vectors.a: unknown keys \\['strength'\\]"),
    "missing file key": ({"steering": {"vectors": {"a": {"layers": [1]}}}}, "'file' is required"),
    "file does not exist": (recipe_data("nope.safetensors"),
                            "steering.vectors.a.file: vector file .*nope.safetensors does not exist"),
    "bad op": (recipe_data(op="boost"), "steering.vectors.a: unknown steering op"),
    "unknown default name": ({"steering": {"vectors": {}, "default": ["a"]}}, "unknown vector 'a'"),
    "bad version": ({"version": 7}, "version 7"),
    "layer not in file": (recipe_data(layers=[0]), "no direction for layers \\[0\\]"),
    "bad positions": (recipe_data(positions="middle"), "positions phase"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_name_the_field_and_leave_the_model_alone(vector_files, case):
    _, tmp = vector_files
    data, message = BAD[case]
    model = tiny_model("llama")
    before = logits(model)
    with pytest.raises(splice.RecipeError, match=message):
        splice.patch(model, recipe=write(tmp / "bad.yaml", data))
    assert not hasattr(model, ATTRIBUTE)
    assert torch.equal(logits(model), before)


def test_recipe_that_does_not_fit_the_model_is_refused(vector_files):
    vs, tmp = vector_files
    model = tiny_model("llama")
    data = recipe_data(layers=[1, 2])
    save_vectors(splice.VectorSet({1: torch.ones(HIDDEN * 2), 2: torch.ones(HIDDEN * 2)}), tmp / "a.safetensors")
    with pytest.raises(splice.RecipeError, match="steering.vectors.a: vector size 128 does not match"):
        splice.patch(model, recipe=write(tmp / "r.yaml", data))
    assert not hasattr(model, ATTRIBUTE)


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steering: [unclosed")
    with pytest.raises(splice.RecipeError, match="not valid YAML"):
        splice.load_recipe(path)


# --- gates, maps and head scales -------------------------------------------------------------------

def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def splitting_condition(model, seed=7, **kw):
    """A condition at layer 0 whose threshold lies between the first two prompts' scores (sorted), so
    it steers some rows of ``left_padded_batch`` and not others."""
    ids, mask = left_padded_batch()
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
    c = rand(HIDDEN, seed=seed)
    scores = cast_score(pool(h, mask.float(), "mean"), c).sort().values
    return splice.Condition(c, 0, float(scores[0] + scores[1]) / 2, "above", **kw)


@pytest.fixture
def kind_files(vector_files):
    """Beside a.safetensors (layers 1, 2): a condition, a gate direction, a low-rank and an affine
    map, and files for another hidden size."""
    vs, tmp = vector_files
    model = tiny_model("llama")
    cond = splitting_condition(model)
    save_intervention(cond, tmp / "cond.safetensors")
    save_intervention(splice.Condition(rand(2 * HIDDEN), 0, 0.1), tmp / "cond128.safetensors")
    gate = splice.VectorSet({l: rand(HIDDEN, seed=30 + l) for l in range(LAYERS)})
    save_vectors(gate, tmp / "gate.safetensors")
    save_vectors(splice.VectorSet({1: rand(2 * HIDDEN)}), tmp / "gate128.safetensors")
    lowrank = splice.LowRank(A={l: rand(HIDDEN, 4, seed=l, scale=0.2) for l in (0, 2)},
                             B={l: rand(HIDDEN, 4, seed=10 + l, scale=0.2) for l in (0, 2)},
                             c={l: rand(4, seed=20 + l) for l in (0, 2)}, scale=1.5, positions="generated")
    save_intervention(lowrank, tmp / "lowrank.safetensors")
    affine = splice.Affine(a={1: 1.0 + rand(HIDDEN, seed=1, scale=0.3)}, b={1: rand(HIDDEN, seed=2)}, site="mlp")
    save_intervention(affine, tmp / "affine.safetensors")
    save_intervention(splice.Affine(a={1: rand(2 * HIDDEN)}, b={1: rand(2 * HIDDEN)}), tmp / "affine128.safetensors")
    save_intervention(splice.Affine(a={LAYERS: rand(HIDDEN)}, b={LAYERS: rand(HIDDEN)}), tmp / "affine_far.safetensors")
    (tmp / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return {"vectors": vs, "condition": cond, "gate": gate, "lowrank": lowrank, "affine": affine}, tmp


EVERY_KIND = {
    "happy": {"file": "a.safetensors", "layers": [1, 2], "scale": 0.4, "gate": {"condition": "cond.safetensors"}},
    "also": {"file": "a.safetensors", "layers": [2], "gate": {"condition": "cond.safetensors"}},  # shares happy's
    "tuned": {"file": "a.safetensors", "layers": [1],
              "gate": {"condition": "cond.safetensors", "threshold": -0.25, "compare": "below", "reduce": "last",
                       "layer": 1}},
    "calm": {"file": "a.safetensors", "layers": [1, 2], "scale": 2.0,
             "gate": {"direction": "gate.safetensors", "threshold": 0.1, "temperature": 0.05, "score": "cos"}},
    "self": {"file": "a.safetensors", "layers": [1], "scale": 3.0,
             "gate": {"direction": "a.safetensors", "threshold": 2.5, "score": "dot"}},
    "lineas": {"map": "lowrank.safetensors", "layers": [2], "scale": 0.5, "positions": "prompt",
               "gate": {"direction": "gate.safetensors", "threshold": -0.2, "temperature": 0.1}},
    "plain_map": {"map": "lowrank.safetensors"},
    "affine": {"map": "affine.safetensors", "scale": 0.75, "gate": {"condition": "cond.safetensors"}},
    "prune": {"heads": {2: [3, 1], 1: [0]}},
    "boost": {"heads": {0: [2]}, "scale": 1.5, "positions": [1, 5],
              "gate": {"direction": "gate.safetensors", "threshold": 0.0, "temperature": 0.2}},
}


def every_kind_recipe():
    return {"version": 1, "steering": {"vectors": EVERY_KIND, "default": list(EVERY_KIND)}}


def test_every_kind_and_gate_parses_to_the_right_object(kind_files):
    made, tmp = kind_files
    steers = splice.Recipe.from_dict(every_kind_recipe(), base=tmp).steers
    assert {n: type(s).__name__ for n, s in steers.items()} == {
        "happy": "Steer", "also": "Steer", "tuned": "Steer", "calm": "Steer", "self": "Steer", "lineas": "LowRank",
        "plain_map": "LowRank", "affine": "Affine", "prune": "HeadScale", "boost": "HeadScale"}
    cond = steers["happy"].gate
    assert isinstance(cond, splice.Condition) and cond.source == str(tmp / "cond.safetensors")
    assert torch.equal(cond.vector, made["condition"].vector)
    assert cond.settings() == made["condition"].settings()
    assert steers["also"].gate is cond and steers["affine"].gate is cond  # one decision, one row-gate column
    tuned = steers["tuned"].gate
    assert tuned is not cond and torch.equal(tuned.vector, cond.vector)
    assert tuned.settings() == {"layer": 1, "threshold": -0.25, "compare": "below", "reduce": "last"}
    calm = steers["calm"].gate
    assert isinstance(calm, splice.TokenGate) and calm.to_config() == {"threshold": 0.1, "temperature": 0.05,
                                                                       "score": "cos"}
    assert all(torch.equal(calm.direction[l], made["gate"][l]) for l in range(LAYERS))
    assert calm.source == str(tmp / "gate.safetensors")
    assert steers["self"].gate.direction is steers["self"].vector  # the steer's own file, read once
    assert steers["self"].gate.to_config() == {"threshold": 2.5, "temperature": 0.0, "score": "dot"}
    assert steers["calm"].gate.direction is steers["lineas"].gate.direction
    lineas, plain = steers["lineas"], steers["plain_map"]
    assert (lineas.layers, lineas.scale, lineas.positions, lineas.site) == ([2], 0.5, splice.Positions("prompt"), "out")
    assert (plain.layers, plain.scale, plain.positions, plain.gate) == ([0, 2], 1.5, splice.Positions("generated"), None)
    assert lineas.name == "lineas" and lineas.source == str(tmp / "lowrank.safetensors")
    assert all(torch.equal(lineas.A[l], made["lowrank"].A[l]) and torch.equal(lineas.c[l], made["lowrank"].c[l])
               for l in (0, 2))
    affine = steers["affine"]
    assert (affine.site, affine.scale, affine.layers) == ("mlp", 0.75, [1])
    assert torch.equal(affine.a[1], made["affine"].a[1]) and torch.equal(affine.b[1], made["affine"].b[1])
    prune, boost = steers["prune"], steers["boost"]
    assert (prune.heads, prune.scale, prune.layers, prune.site, prune.gate) == ({1: [0], 2: [1, 3]}, 0.0, [1, 2],
                                                                                 "heads", None)
    assert (boost.heads, boost.scale, boost.positions) == ({0: [2]}, 1.5, splice.Positions(start=1, end=5))
    assert isinstance(boost.gate, splice.TokenGate) and boost.gate.temperature == 0.2


def test_every_kind_steers_like_the_python_api(kind_files):
    """The recipe's objects patched by name give the logits of the same objects made in Python."""
    made, tmp = kind_files
    vs, cond, gate = made["vectors"], made["condition"], made["gate"]
    tuned = splice.Condition(cond.vector, 1, -0.25, "below", "last")
    lowrank, affine = made["lowrank"], made["affine"]
    direct = [
        splice.Steer(vs, layers=[1, 2], scale=0.4, gate=cond),
        splice.Steer(vs, layers=[2], gate=cond),
        splice.Steer(vs, layers=[1], gate=tuned),
        splice.Steer(vs, layers=[1, 2], scale=2.0, gate=splice.TokenGate(gate, 0.1, 0.05, "cos")),
        splice.Steer(vs, layers=[1], scale=3.0, gate=splice.TokenGate(vs, 2.5, 0.0, "dot")),
        splice.LowRank(A=lowrank.A, B=lowrank.B, c=lowrank.c, layers=[2], scale=0.5, positions="prompt",
                       gate=splice.TokenGate(gate, -0.2, 0.1)),
        splice.LowRank(A=lowrank.A, B=lowrank.B, c=lowrank.c, scale=1.5, positions="generated"),
        splice.Affine(a=affine.a, b=affine.b, site="mlp", scale=0.75, gate=cond),
        splice.HeadScale(heads={2: [3, 1], 1: [0]}),
        splice.HeadScale(heads={0: [2]}, scale=1.5, positions=(1, 5), gate=splice.TokenGate(gate, 0.0, 0.2)),
    ]
    model = tiny_model("llama")
    plain = logits(model)
    with splice.patch(model, *direct):
        expected = logits(model)
    assert not torch.allclose(expected, plain, atol=1e-3)
    with splice.patch(model, recipe=write(tmp / "r.yaml", every_kind_recipe())):
        assert torch.equal(logits(model), expected)


def _same(a, b, layers=None) -> bool:
    """Two interventions (or gates, at ``layers``) with equal settings and tensors."""
    if type(a) is not type(b):
        return False
    if isinstance(a, splice.TokenGate):
        return a.to_config() == b.to_config() and all(torch.equal(a.direction_at(l), b.direction_at(l)) for l in layers)
    if isinstance(a, splice.Condition):
        return a.settings() == b.settings() and torch.equal(a.vector, b.vector)
    fields = {"layers", "scale", "positions", "site", "name"} | {
        splice.Steer: {"op", "lo", "hi", "head"}, splice.LowRank: set(), splice.Affine: set(),
        splice.HeadScale: {"heads"}}[type(a)]
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    tensors = {splice.Steer: [], splice.LowRank: ["A", "B", "c"], splice.Affine: ["a", "b"], splice.HeadScale: []}[type(a)]
    if isinstance(a, splice.Steer) and not all(torch.equal(a.vector[l], b.vector[l]) for l in a.layers):
        return False
    if any(getattr(a, t).keys() != getattr(b, t).keys() or
           not all(torch.equal(x, getattr(b, t)[l]) for l, x in getattr(a, t).items()) for t in tensors):
        return False
    return (a.gate is None) == (b.gate is None) and (a.gate is None or _same(a.gate, b.gate, a.layers))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_saved_gates_and_maps_round_trip_through_a_recipe(tmp_path, suffix):
    """In-memory gates and maps are saved beside the recipe; the recipe loads back to equal
    interventions that give the original patch's logits."""
    model = tiny_model("llama")
    vs = splice.VectorSet({l: rand(HIDDEN, seed=40 + l, scale=3.0) for l in range(LAYERS)})
    cond = splitting_condition(model, seed=8)
    items = [
        splice.Steer(vs, layers=[1, 2], scale=0.5, gate=cond, name="cast"),
        splice.Steer(rand(HIDDEN, seed=41, scale=3.0), layers=[0, 1], gate=splice.TokenGate(rand(HIDDEN, seed=42),
                     threshold=0.05, temperature=0.1), name="tensor_gate"),
        splice.Steer(vs, layers=[2], op="clamp", lo=-0.5, hi=0.5, name="dict_gate",
                     gate=splice.TokenGate({2: rand(HIDDEN, seed=43)}, threshold=-0.1, score="cos")),
        splice.Steer(vs, layers=[1], scale=2.0, gate=splice.TokenGate(vs, threshold=0.5, score="dot"), name="own"),
        splice.LowRank(A={1: rand(HIDDEN, 3, seed=1, scale=0.3)}, B={1: rand(HIDDEN, 3, seed=2, scale=0.3)},
                       c={1: rand(3, seed=3)}, scale=1.25, positions=(2, 6), name="lr",
                       gate=splice.TokenGate(rand(HIDDEN, seed=44), threshold=0.0, temperature=0.3)),
        splice.Affine(a={0: 1.0 + rand(HIDDEN, seed=4, scale=0.3), 2: 1.0 + rand(HIDDEN, seed=5, scale=0.3)},
                      b={0: rand(HIDDEN, seed=6), 2: rand(HIDDEN, seed=7)}, layers=[2], site="attn", name="aff",
                      gate=cond),
        splice.HeadScale(heads={1: [0, 2], 2: [3]}, scale=0.25, positions="prompt", name="hs"),
    ]
    (tmp_path / "out").mkdir()
    plain = logits(model)
    with splice.patch(model, *items) as p:
        before = logits(model)
        path = p.save_recipe(tmp_path / "out" / f"saved{suffix}")
    assert not torch.allclose(before, plain, atol=1e-3)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted([
        f"saved{suffix}", "saved.cast.safetensors", "saved.cast.condition.safetensors",  # aff shares cast's condition
        "saved.tensor_gate.safetensors", "saved.tensor_gate.gate.safetensors", "saved.dict_gate.safetensors",
        "saved.dict_gate.gate.safetensors", "saved.own.safetensors",  # own's gate is its vector file
        "saved.lr.lowrank.safetensors", "saved.lr.gate.safetensors", "saved.aff.affine.safetensors"])
    gate_file = load_vectors(tmp_path / "out" / "saved.tensor_gate.gate.safetensors")
    assert gate_file.layers == [0, 1] and torch.equal(gate_file[1], rand(HIDDEN, seed=42))
    loaded = splice.load_recipe(path)
    assert list(loaded.steers) == [i.name for i in items]
    for item in items:
        assert _same(item, loaded.steers[item.name]), item.name
    assert loaded.steers["aff"].gate is loaded.steers["cast"].gate
    with splice.patch(model, recipe=path):
        assert torch.equal(logits(model), before)
    text = path.read_text()
    splice.Recipe(steers=dict(zip([i.name for i in items], items)),
                  default=[(i.name, i.scale) for i in items]).save(path)  # saving again writes nothing new
    assert path.read_text() == text and len(list((tmp_path / "out").iterdir())) == 11


def entry(**cfg):
    return {"version": 1, "steering": {"vectors": {"x": cfg}, "default": ["x"]}}


A = "a.safetensors"
BAD_KINDS = {
    "file and map": (entry(file=A, map="lowrank.safetensors"),
                     r"steering.vectors.x: give exactly one of 'file', 'map' or 'heads', got \['file', 'map'\]"),
    "map and heads": (entry(map="lowrank.safetensors", heads={1: [0]}), r"exactly one of .*\['map', 'heads'\]"),
    "op on a map": (entry(map="lowrank.safetensors", op="add"),
                    r"steering.vectors.x: unknown keys \['op'\] for a map entry; allowed: \['gate', 'layers', 'map'"),
    "site on a map": (entry(map="lowrank.safetensors", site="mlp"), r"steering.vectors.x: unknown keys \['site'\]"),
    "layers on heads": (entry(heads={1: [0]}, layers=[1]), r"steering.vectors.x: unknown keys \['layers'\] for a head"),
    "unknown token gate key": (entry(file=A, gate={"direction": "gate.safetensors", "compare": "above"}),
                               r"steering.vectors.x.gate: unknown keys \['compare'\] for a token gate"),
    "unknown condition key": (entry(file=A, gate={"condition": "cond.safetensors", "temperature": 0.1}),
                              r"steering.vectors.x.gate: unknown keys \['temperature'\] for a condition gate"),
    "condition and direction": (entry(file=A, gate={"condition": "cond.safetensors", "direction": "gate.safetensors"}),
                                r"steering.vectors.x.gate: give exactly one of 'condition' .* or 'direction'"),
    "gate of nothing": (entry(file=A, gate={"threshold": 0.1}), r"steering.vectors.x.gate: give exactly one of"),
    "gate not a mapping": (entry(file=A, gate="cond.safetensors"), r"steering.vectors.x.gate: expected a mapping"),
    "infinite gate threshold": (entry(file=A, gate={"direction": "gate.safetensors", "threshold": math.inf}),
                                r"steering.vectors.x.gate.threshold: must be a finite number, got inf"),
    "nan condition threshold": (entry(file=A, gate={"condition": "cond.safetensors", "threshold": math.nan}),
                                r"steering.vectors.x.gate.threshold: must be a finite number"),
    "text threshold": (entry(file=A, gate={"direction": "gate.safetensors", "threshold": "high"}),
                       r"steering.vectors.x.gate.threshold: expected a number, got 'high'"),
    "negative temperature": (entry(file=A, gate={"direction": "gate.safetensors", "temperature": -1}),
                             r"steering.vectors.x.gate.temperature: must be >= 0"),
    "cosine threshold above 1": (entry(file=A, gate={"direction": "gate.safetensors", "threshold": 2.0}),
                                 r"steering.vectors.x.gate: a cosine gate's threshold must lie in \[-1, 1\]"),
    "bad score": (entry(file=A, gate={"direction": "gate.safetensors", "score": "l2"}),
                  r"steering.vectors.x.gate.score: must be one of \['cos', 'dot'\]"),
    "bad compare": (entry(file=A, gate={"condition": "cond.safetensors", "compare": "equal"}),
                    r"steering.vectors.x.gate.compare: must be one of"),
    "bad condition layer": (entry(file=A, gate={"condition": "cond.safetensors", "layer": -1}),
                            r"steering.vectors.x.gate.layer: expected a non-negative integer"),
    "infinite map scale": (entry(map="lowrank.safetensors", scale=math.inf), r"steering.vectors.x.scale: must be a finite"),
    "map layer not in the file": (entry(map="lowrank.safetensors", layers=[1]),
                                  r"steering.vectors.x: no map for layers \[1\]"),
    "map layers not a list": (entry(map="lowrank.safetensors", layers="2"), r"steering.vectors.x.layers: expected a list"),
    "bad map positions": (entry(map="affine.safetensors", positions="middle"), r"steering.vectors.x: positions phase"),
    "vector file as a map": (entry(map=A), r"steering.vectors.x.map: .*a.safetensors is not a splice intervention "
                                           r"file .*name it with 'file:'"),
    "condition file as a map": (entry(map="cond.safetensors"),
                                r"steering.vectors.x.map: .*cond.safetensors holds a CAST condition, not a low-rank map "
                                r"or an affine map \(it is a CAST condition file"),
    "map file as a vector file": (entry(file="lowrank.safetensors"),
                                  r"steering.vectors.x.file: .*lowrank.safetensors is not a splice vector file.*"
                                  r"name it with 'map:'"),
    "map file as a condition": (entry(file=A, gate={"condition": "affine.safetensors"}),
                                r"steering.vectors.x.gate.condition: .*affine.safetensors holds an affine map, not a CAST "
                                r"condition \(it is an affine map file: name it with 'map:'\)"),
    "vector file as a condition": (entry(file=A, gate={"condition": "gate.safetensors"}),
                                   r"steering.vectors.x.gate.condition: .*gate.safetensors is not a splice intervention"),
    "condition file as a direction": (entry(file=A, gate={"direction": "cond.safetensors"}),
                                      r"steering.vectors.x.gate.direction: .*cond.safetensors is not a splice vector "
                                      r"file.*gate: \{condition"),
    "missing map": (entry(map="nope.safetensors"), r"steering.vectors.x.map: file .*nope.safetensors does not exist"),
    "missing condition": (entry(file=A, gate={"condition": "nope.safetensors"}),
                          r"steering.vectors.x.gate.condition: file .*nope.safetensors does not exist"),
    "missing direction": (entry(file=A, gate={"direction": "nope.safetensors"}),
                          r"steering.vectors.x.gate.direction: vector file .*nope.safetensors does not exist"),
    "damaged map": (entry(map="damaged.safetensors"),
                    r"steering.vectors.x.map: .*damaged.safetensors is not a valid safetensors file"),
    "damaged condition": (entry(file=A, gate={"condition": "damaged.safetensors"}),
                          r"steering.vectors.x.gate.condition: .*damaged.safetensors is not a valid safetensors"),
    "map path not a string": (entry(map=3), r"steering.vectors.x.map: expected a file path, got 3"),
    "heads not a mapping": (entry(heads=[1, 2]), r"steering.vectors.x.heads: expected a non-empty mapping"),
    "heads of a layer empty": (entry(heads={1: []}), r"steering.vectors.x.heads.1: expected a non-empty list"),
    "negative head": (entry(heads={1: [-1]}), r"steering.vectors.x.heads.1: expected a non-negative integer, got -1"),
    # checked against the model (validate_for), named like the file checks
    "condition for another hidden size": (entry(file=A, gate={"condition": "cond128.safetensors"}),
                                          r"steering.vectors.x.gate.condition: condition vector size 128 does not match "
                                          r"the model's hidden size 64 \(file .*cond128.safetensors\)"),
    "condition layer out of range": (entry(file=A, gate={"condition": "cond.safetensors", "layer": LAYERS}),
                                     r"steering.vectors.x.gate.condition: condition layer 3 out of range"),
    "gate direction for another size": (entry(file=A, layers=[1], gate={"direction": "gate128.safetensors"}),
                                        r"steering.vectors.x.gate: gate direction size 128 does not match"),
    "gate direction missing a layer": (entry(file=A, layers=[1, 2], gate={"direction": "gate128.safetensors"}),
                                       r"steering.vectors.x.gate: the gate has no direction for layers \[2\]"),
    "map for another hidden size": (entry(map="affine128.safetensors"),
                                    r"steering.vectors.x: map size 128 does not match .*\(file .*affine128"),
    "map layer out of range": (entry(map="affine_far.safetensors"), r"steering.vectors.x: layers \[3\] out of range"),
    "head out of range": (entry(heads={1: [4]}), r"steering.vectors.x: heads \{1: \[4\]\} out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_KINDS))
def test_bad_gates_maps_and_heads_name_the_field_and_change_nothing(kind_files, case):
    _, tmp = kind_files
    data, message = BAD_KINDS[case]
    path = write(tmp / "bad.yaml", data)
    files = {f.name: f.read_bytes() for f in tmp.iterdir()}
    model = tiny_model("llama")
    before = logits(model)
    with pytest.raises(splice.RecipeError, match=message):
        splice.patch(model, recipe=path)
    assert not hasattr(model, ATTRIBUTE)
    assert torch.equal(logits(model), before)
    assert {f.name: f.read_bytes() for f in tmp.iterdir()} == files


def test_a_recipe_of_every_kind_saves_back_to_itself(kind_files, tmp_path):
    """Saved elsewhere, a loaded recipe names the same files (relative to its new place) with its
    overrides (a condition's threshold, a map's layers), writes nothing else, and loads back equal."""
    _, tmp = kind_files
    recipe = splice.Recipe.from_dict(every_kind_recipe(), base=tmp)
    (tmp_path / "elsewhere").mkdir()
    path = recipe.save(tmp_path / "elsewhere" / "again.yaml")
    assert [f.name for f in (tmp_path / "elsewhere").iterdir()] == ["again.yaml"]
    loaded = splice.load_recipe(path)
    for name, item in recipe.steers.items():
        assert _same(item, loaded.steers[name]), name
    assert loaded.steers["tuned"].gate.settings() == {"layer": 1, "threshold": -0.25, "compare": "below",
                                                      "reduce": "last"}
    model = tiny_model("llama")
    with splice.patch(model, recipe=recipe):
        expected = logits(model)
    with splice.patch(model, recipe=path):
        assert torch.equal(logits(model), expected)
