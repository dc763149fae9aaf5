"""Recipes: files that describe interventions, validated before the model is touched."""

import json
import threading

import pytest
import torch
import yaml
from tiny_models import HIDDEN, LAYERS, left_padded_batch, tiny_model

import splice
from splice.runtime.splice_runtime import ATTRIBUTE
from splice.vectors.gguf_control import export_control_vector
from splice.vectors.io import save_vectors


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
    "file does not exist": (recipe_data("nope.safetensors"), "does not exist"),
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
