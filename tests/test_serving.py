"""Serving pieces that need no vLLM server: request parsing, slot reuse, recipe refusals."""

import math

import pytest
import torch
import yaml

from splice.bench.serve_recipe import write_recipe
from splice.recipe import RecipeError
from splice.serving.options import ServeOptions, load_serving_recipe
from splice.serving.request_params import SteeringParamError, parse

SCALES = {"a": 2.0, "b": -1.0}


def test_parse_fills_default_scales_and_keeps_order():
    steering = parse({"splice_vector": ["b", "a"]}, SCALES)
    assert steering.items == (("b", -1.0), ("a", 2.0))
    assert parse({"splice_vector": "a", "splice_scale": 4}, SCALES).items == (("a", 4.0),)
    assert parse({"other": 1}, SCALES) is None and parse(None, SCALES) is None


@pytest.mark.parametrize("xargs, field", [
    ({"splice_vector": "nope"}, "splice_vector"),
    ({"splice_vector": {"a": 1}}, "splice_vector"),
    ({"splice_vector": ["a", "a"]}, "splice_vector"),
    ({"splice_scale": 1.0}, "splice_vector"),
    ({"splice_vector": "a", "splice_scale": "4"}, "splice_scale"),
    ({"splice_vector": "a", "splice_scale": math.nan}, "splice_scale"),
    ({"splice_vector": "a", "splice_scale": math.inf}, "splice_scale"),
    ({"splice_vector": "a", "splice_scale": True}, "splice_scale"),
    ({"splice_vector": ["a", "b"], "splice_scale": [1.0]}, "splice_scale"),
    ({"splice_vector": "a", "splice_vectors": "b"}, "splice_vectors"),
])
def test_bad_steering_names_the_field(xargs, field):
    with pytest.raises(SteeringParamError) as info:
        parse(xargs, SCALES)
    assert info.value.field == field and f"vllm_xargs.{field}" in str(info.value)


def test_slot_pool_reuses_released_slots_least_recent_first():
    from splice.serving.steering_state import SlotPool

    pool = SlotPool(3)
    s1, fresh1 = pool.acquire(("x",))
    s2, _ = pool.acquire(("y",))
    assert fresh1 and pool.acquire(("x",)) == (s1, False)
    pool.release(s1), pool.release(s1), pool.release(s2)
    assert pool.acquire(("x",)) == (s1, False)  # contents kept while idle
    s3, fresh3 = pool.acquire(("z",))
    assert fresh3 and s3 == s2
    with pytest.raises(RuntimeError, match="no free steering slot"):
        pool.acquire(("w",))


def _recipe(tmp_path, **extra):
    path = write_recipe(tmp_path, 576, 30, 1)
    data = yaml.safe_load(path.read_text())
    for key, value in extra.items():
        if key == "vector":
            data["steering"]["vectors"]["v0"].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_recipe_without_steering_serves_nothing(tmp_path):
    assert load_serving_recipe(_recipe(tmp_path, steering=None)).steers == {}


def _entry_recipe(tmp_path, cfg):
    """The serving recipe with one more entry, ``extra: cfg``, and its files (hidden 576, 30 layers)."""
    from splice.steering.files import save_intervention
    from splice.steering.gates import Condition
    from splice.steering.maps import Affine, LowRank

    path = _recipe(tmp_path)
    gen = torch.Generator().manual_seed(0)
    save_intervention(Condition(torch.randn(576, generator=gen), 3, 0.1), tmp_path / "cond.safetensors")
    save_intervention(LowRank(A={2: torch.randn(576, 2, generator=gen)}, B={2: torch.randn(576, 2, generator=gen)}),
                      tmp_path / "lowrank.safetensors")
    save_intervention(Affine(a={2: torch.ones(576)}, b={2: torch.zeros(576)}), tmp_path / "affine.safetensors")
    data = yaml.safe_load(open(path))
    data["steering"]["vectors"]["extra"] = cfg
    open(path, "w").write(yaml.safe_dump(data))
    return path


SERVED = [
    {"file": "v0.safetensors", "gate": {"direction": "v0.safetensors", "threshold": 0.1}},
    {"map": "lowrank.safetensors"},
    {"map": "affine.safetensors", "scale": 0.5},
    {"heads": {4: [0, 1]}},
    {"file": "v0.safetensors", "site": "in", "op": "ablate"},
    {"file": "v0.safetensors", "site": "out", "op": "clamp", "hi": 1.0},
    {"file": "v0.safetensors", "site": "heads", "head": 0},
]


@pytest.mark.parametrize("cfg", SERVED, ids=["token-gate", "lowrank", "affine", "head-scale", "in-ablate",
                                             "out-clamp", "head-vector"])
def test_serving_accepts_what_splice_patch_runs(tmp_path, cfg):
    assert sorted(load_serving_recipe(_entry_recipe(tmp_path, cfg)).steers) == ["extra", "v0"]


def test_a_cast_condition_serves_without_chunked_prefill_and_is_never_registered(tmp_path):
    """A recipe's CAST condition loads; ``splice serve`` turns chunked prefill off for it; the loader
    refuses a server that splits prompts (or runs CUDA graphs); the registry refuses a condition."""
    from types import SimpleNamespace

    pytest.importorskip("vllm", reason="vLLM is not installed (pip install '.[vllm]')")
    from splice.serving import launch
    from splice.serving.loader import _check_prefill_decisions
    from splice.serving.registry import RegistryError, _parse

    path = _entry_recipe(tmp_path, {"file": "v0.safetensors", "gate": {"condition": "cond.safetensors"}})
    recipe = load_serving_recipe(path)
    assert "--no-enable-chunked-prefill" in launch.command(path, ["--model", "m"])
    assert "--no-enable-chunked-prefill" not in launch.command(_recipe(tmp_path / "plain"), ["--model", "m"])

    def config(chunked=False, threshold=0, eager=False):
        return SimpleNamespace(scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked,
                                                                long_prefill_token_threshold=threshold),
                               model_config=SimpleNamespace(enforce_eager=eager))

    cpu, cuda = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    _check_prefill_decisions(recipe, config(), cpu)
    _check_prefill_decisions(recipe, config(eager=True), cuda)
    for bad, adapter, why in [(config(chunked=True), cpu, "--no-enable-chunked-prefill"),
                              (config(threshold=64), cpu, "long-prefill-token-threshold"),
                              (config(), cuda, "--enforce-eager")]:
        with pytest.raises(RecipeError, match=why):
            _check_prefill_decisions(recipe, bad, adapter)
    with pytest.raises(RegistryError, match="cannot be registered at run time") as refused:
        _parse("extra", {"file": "v0.safetensors", "gate": {"condition": "cond.safetensors"}}, tmp_path)
    assert refused.value.field == "entry"


def test_serving_refuses_a_default_list(tmp_path):
    path = _recipe(tmp_path)
    data = yaml.safe_load(open(path))
    data["steering"]["default"] = ["v0"]
    open(path, "w").write(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="steering.default"):
        load_serving_recipe(path)


def test_loader_options_split_off_splice_keys():
    options, rest = ServeOptions.split({"recipe": "r.yaml", "max_vectors_per_request": 2, "num_threads": 4})
    assert options.max_vectors_per_request == 2 and rest == {"num_threads": 4}
    with pytest.raises(RecipeError, match="needs --model-loader-extra-config"):
        ServeOptions.split({})
    with pytest.raises(RecipeError, match="max_vectors_per_request"):
        ServeOptions.split({"recipe": "r.yaml", "max_vectors_per_request": 0})


def test_steered_requests_without_the_middleware_mark_are_refused():
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install '.[vllm]')")
    from vllm import SamplingParams

    from splice.serving import salts
    from splice.serving.request_rows import SteeringRows

    xargs = {"splice_vector": ["a"], "splice_scale": [2.0]}
    key, other = parse(xargs).key, parse({"splice_vector": ["b"], "splice_scale": [2.0]}).key
    salt = salts.steered_salt(key, None)
    SteeringRows.validate_params(SamplingParams(max_tokens=1))
    for mark in ({}, {"splice_token": "0" * 32, "splice_salt": salt},
                 {"splice_token": salts.mark(other, salt), "splice_salt": salt},  # another configuration's mark
                 {"splice_token": salts.mark(key, salt)},  # no salt to bind it to
                 {"splice_token": salts.mark(key, salt), "splice_salt": salts.steered_salt(key, "t")}):  # other salt
        with pytest.raises(ValueError, match="vllm_xargs.splice_vector: steering is served through"):
            SteeringRows.validate_params(SamplingParams(max_tokens=1, extra_args={**xargs, **mark}))
    marked = {**xargs, "splice_token": salts.mark(key, salt), "splice_salt": salt}
    params = SamplingParams(max_tokens=1, extra_args=marked)
    SteeringRows.validate_params(params)
    assert params.skip_reading_prefix_cache is False
    whole = SamplingParams(max_tokens=1, extra_args={**marked, "splice_whole_prompt": True})  # a CAST condition's
    SteeringRows.validate_params(whole)
    assert whole.skip_reading_prefix_cache is True
