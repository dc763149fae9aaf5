"""A head map to vLLM's per-layer sliding windows (no vLLM server): what maps, what is refused and
why, the ``--hf-overrides`` that ``splice serve`` adds, and the loader's check of the built windows."""

import json
from types import SimpleNamespace

import pytest

from splice.bench.serve_recipe import write_recipe
from splice.hybrid.head_map import HeadMap
from splice.recipe import RecipeError
from splice.serving import launch
from splice.serving.sliding_windows import check_windows, load_head_map, window_overrides


def _map(full, kind="window", sinks=0, window=8, layers=4, kv=3):
    return HeadMap(layers, kv, {l: set(h) for l, h in full.items()}, sinks=sinks, window=window, kind=kind)


def test_all_windowed_layers_become_sliding_attention():
    heads = _map({0: [], 1: [0, 1, 2], 2: [], 3: [0, 1, 2]}, window=16)
    assert window_overrides(heads) == {"sliding_window": 16, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]}


@pytest.mark.parametrize("heads, why", [
    (_map({0: [], 1: [0, 1, 2]}, kind="stream", sinks=4), "sinks"),
    (_map({0: [0], 1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}), r"layers \[0\] mix full and windowed"),
    (_map({l: [0, 1, 2] for l in range(4)}), "no window to serve"),
])
def test_maps_vllm_cannot_serve_are_refused_with_the_reason(heads, why):
    with pytest.raises(RecipeError, match=why):
        window_overrides(heads)


def test_a_map_for_another_model_is_refused(tmp_path):
    _map({0: []}).save(tmp_path / "h.json")
    shape = SimpleNamespace(num_layers=30, num_kv_heads=3, config=SimpleNamespace(max_position_embeddings=8192))
    with pytest.raises(RecipeError, match="4 layers of 3 KV heads.*30 layers"):
        load_head_map(str(tmp_path / "h.json"), shape)
    with pytest.raises(RecipeError, match="not a splice head map"):
        load_head_map(str(tmp_path / "missing.json"))


def test_the_command_carries_the_windows_and_refuses_a_second_override(tmp_path):
    recipe = write_recipe(tmp_path, 8, 4, 1)
    _map({0: [], 1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}, window=5).save(tmp_path / "h.json")
    cmd = launch.command(recipe, ["--model", "m"], head_map=str(tmp_path / "h.json"))
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides["sliding_window"] == 5 and overrides["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert json.loads(cmd[cmd.index("--model-loader-extra-config") + 1])["head_map"] == str(tmp_path / "h.json")
    with pytest.raises(RecipeError, match="--hf-overrides"):
        launch.command(recipe, ["--model", "m", "--hf-overrides", "{}"], head_map=str(tmp_path / "h.json"))
    _map({0: []}, kind="stream", sinks=4).save(tmp_path / "s.json")
    with pytest.raises(RecipeError, match="sinks"):
        launch.command(recipe, ["--model", "m"], head_map=str(tmp_path / "s.json"))


def test_the_loader_refuses_a_model_that_ignored_the_windows():
    layer = lambda w: SimpleNamespace(self_attn=SimpleNamespace(attn=SimpleNamespace(sliding_window=w)))  # noqa: E731
    overrides = {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}
    check_windows([layer(5), layer(None)], overrides)
    with pytest.raises(RecipeError, match=r"built attention windows \[None, None\]"):
        check_windows([layer(None), layer(None)], overrides)
