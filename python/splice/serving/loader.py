"""The ``splice`` load format: vLLM's default loader, then the recipe installed on the model.

The recipe is checked against the loaded model before anything is installed; a recipe that does not
fit (unknown layers, wrong hidden size, an unsupported family or site, routing) raises
:class:`~splice.recipe.RecipeError`, so the server refuses to start and says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader

from ..adapters.architecture import Adapter
from ..adapters.shape import ModelShape
from ..recipe import RecipeError, check_steering_fits
from ..skipping.spec import skipped_parts
from ..steering.slot_entries import row_deciders
from . import steering_state
from .catalog import admin_token
from .registry import Registry
from .model import install
from .options import ServeOptions, load_serving_recipe
from .sliding_windows import check_windows, load_head_map, window_overrides

LOAD_FORMAT = "splice"
_QUANTIZED_PLAN = "plan.json"


def _check_fits(recipe, adapter, parts) -> None:
    recipe.validate_for(adapter)
    if adapter.family.sandwich and (recipe.skips or recipe.steers):
        raise RecipeError(f"serving supports pre-norm families (llama, mistral, qwen2, qwen3, phi3), "
                          f"not {adapter.family.name}")
    try:
        check_steering_fits(recipe.steers, recipe.steers, parts)
    except ValueError as exc:
        raise RecipeError(f"steering.vectors: {exc}") from exc


def _check_prefill_decisions(recipe, vllm_config, adapter) -> None:
    """A CAST condition pools its whole prompt at one layer, in one step (:mod:`.prefill_decisions`)."""
    if not row_deciders(recipe.steers, recipe.steers):
        return
    scheduler = vllm_config.scheduler_config
    if scheduler.enable_chunked_prefill or getattr(scheduler, "long_prefill_token_threshold", 0):
        raise RecipeError("a CAST condition decides from the whole prompt, which chunked prefill splits across steps: "
                          "start the server with --no-enable-chunked-prefill (and no --long-prefill-token-threshold)")
    if adapter.device.type == "cuda" and not vllm_config.model_config.enforce_eager:
        raise RecipeError("a CAST condition's decision runs host code each step, which CUDA graphs cannot replay: "
                          "start the server with --enforce-eager")


def _check_options(options: ServeOptions, vllm_config, adapter) -> None:
    """Refuse options this server cannot honour, before anything is installed."""
    processes = getattr(vllm_config.parallel_config, "_api_process_count", 1)
    bounded = options.max_slots is not None and options.max_slots < vllm_config.scheduler_config.max_num_seqs
    if processes > 1 and (options.registry is not None or bounded):
        raise RecipeError(f"registry and max_slots need one API server process ({processes} asked): each process "
                          "admits requests on its own and could hand the worker more configurations than slots")
    if options.registry is not None:
        admin_token()  # the worker's environment is the server's: fail the start, not the first admin call
        if adapter.family.sandwich:
            raise RecipeError(f"registry: serving supports pre-norm families, not {adapter.family.name}")


def _graph_fingerprint(options: ServeOptions, recipe, adapter, parts) -> str:
    """What changes the compiled graph: which tables exist (and their sizes), what is skipped, and
    where prefill decisions are made."""
    tables = sorted(steering_state.table_capacity(recipe.steers, adapter, options.max_vectors_per_request,
                                                  options.registry_tables).items())
    code = sorted(p.read_text() for p in Path(__file__).parent.glob("*.py"))
    decisions = [(d.layer, d.width) for d in row_deciders(recipe.steers, recipe.steers)]  # serve_decide calls, gates
    data = json.dumps([tables, parts, options.max_vectors_per_request, options.max_slots, len(recipe.steers), decisions,
                       code])
    return hashlib.sha256(data.encode()).hexdigest()


@register_model_loader(LOAD_FORMAT)
class SpliceModelLoader(DefaultModelLoader):
    """``--load-format splice --model-loader-extra-config '{"recipe": "R.yaml"}'``."""

    def __init__(self, load_config: LoadConfig):
        self.options, rest = ServeOptions.split(load_config.model_loader_extra_config)
        super().__init__(dataclasses.replace(load_config, load_format="auto", model_loader_extra_config=rest))

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        if (Path(model_config.model) / _QUANTIZED_PLAN).is_file():
            raise RecipeError(f"{model_config.model} is a splice quantized checkpoint; vLLM cannot load splice's "
                              "packed format (serve the dense model)")
        recipe = load_serving_recipe(self.options.recipe)  # before the weights: fail fast on a bad file
        windows = None
        if self.options.head_map is not None:
            windows = window_overrides(load_head_map(self.options.head_map, ModelShape(model_config.hf_config)))
        model = super().load_model(vllm_config, model_config, prefix)
        adapter = Adapter(model)
        if windows is not None:
            check_windows(adapter.layers, windows)
        try:
            parts = skipped_parts(recipe.skips, adapter.num_layers)
        except ValueError as exc:
            raise RecipeError(f"skip: {exc}") from exc
        _check_fits(recipe, adapter, parts)
        _check_options(self.options, vllm_config, adapter)
        _check_prefill_decisions(recipe, vllm_config, adapter)
        scheduler = vllm_config.scheduler_config
        lookup = Registry(self.options.registry).load if self.options.registry is not None else None
        state = steering_state.ServeSteering(adapter, recipe, scheduler.max_num_seqs,
                                             scheduler.max_num_batched_tokens, self.options, lookup)
        install(model, adapter, state, parts)
        steering_state.set_current(state)
        if isinstance(vllm_config.additional_config, dict):  # keeps vLLM's compile cache apart per recipe
            vllm_config.additional_config["splice_graph"] = _graph_fingerprint(self.options, recipe, adapter, parts)
        return model
