"""The ``splice`` load format's options (``--model-loader-extra-config``) and the recipe checks
that do not need the model.

* ``recipe`` (required): a recipe file (:mod:`splice.recipe`);
* ``max_vectors_per_request`` (default 4): how many vectors one request may combine, which sizes the
  steering tables;
* ``max_slots`` (default: vLLM's ``max_num_seqs``): how many distinct steering configurations may be
  in flight at once (each holds one slot of the tables); a request that needs one more waits up to
  ``slot_wait_s`` (default 10) seconds for one to free, then gets HTTP 503;
* ``registry`` (default none): a directory for interventions registered at run time through the admin
  endpoint (:mod:`.admin`), which is off without it; ``registry_tables`` (default
  ``{"out": max_vectors_per_request}``) the steering tables registered interventions may use,
  ``{site: entries per slot}`` at every layer (a vector takes one entry, a gated one two, a rank-r
  map 2r); ``max_upload_mb`` (default 64) bounds one registration's body;
* ``head_map`` (default none): a head map file (:mod:`splice.hybrid.head_map`) whose windowed layers
  run vLLM's per-layer sliding windows (:mod:`.sliding_windows`).

Every other key goes to vLLM's default loader. Served: steering vectors (every op, every site),
token gates, CAST conditions (:mod:`.prefill_decisions`), low-rank and affine maps and head scales.
Refused with the reason: routing, a default list, and a CAST condition registered at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..recipe import Recipe, RecipeError, load_recipe
from ..vectors.vector_set import SITES
from ..steering.gates import Condition, TokenGate

NOT_REGISTERED = ("a CAST condition cannot be registered at run time: its decision columns are allocated when the "
                  "server loads; put it in the recipe")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ServeOptions:
    recipe: str
    max_vectors_per_request: int = 4
    max_slots: int | None = None
    slot_wait_s: float = 10.0
    registry: str | None = None
    registry_tables: dict[str, int] = field(default_factory=dict)
    max_upload_mb: int = 64
    head_map: str | None = None

    @classmethod
    def split(cls, extra) -> tuple["ServeOptions", dict]:
        """(splice's options, the remaining keys for vLLM's default loader)."""
        extra = dict(extra or {})
        if "recipe" not in extra:
            raise RecipeError('--load-format splice needs --model-loader-extra-config \'{"recipe": "R.yaml"}\'')
        recipe = str(Path(extra.pop("recipe")).expanduser().absolute())
        per_request = _positive_int("max_vectors_per_request", extra.pop("max_vectors_per_request", 4))
        slots = extra.pop("max_slots", None)
        slots = None if slots is None else _positive_int("max_slots", slots)
        wait = extra.pop("slot_wait_s", 10.0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not (math.isfinite(wait) and wait >= 0):
            raise RecipeError(f"slot_wait_s must be a number of seconds >= 0, got {wait!r}")
        registry = extra.pop("registry", None)
        tables = extra.pop("registry_tables", None)
        upload = _positive_int("max_upload_mb", extra.pop("max_upload_mb", 64))
        head_map = extra.pop("head_map", None)
        if head_map is not None:
            if not isinstance(head_map, str) or not head_map:
                raise RecipeError(f"head_map must be a head map file's path, got {head_map!r}")
            head_map = str(Path(head_map).expanduser().absolute())
        if registry is None:
            if tables is not None:
                raise RecipeError("registry_tables needs a registry directory (option 'registry')")
            return cls(recipe, per_request, slots, float(wait), None, {}, upload, head_map), extra
        if not isinstance(registry, str) or not registry:
            raise RecipeError(f"registry must be a directory path, got {registry!r}")
        tables = {"out": per_request} if tables is None else tables
        if not isinstance(tables, dict) or not tables or not set(tables) <= set(SITES):
            raise RecipeError(f"registry_tables must map sites of {SITES} to entries per slot, got {tables!r}")
        tables = {site: _positive_int(f"registry_tables.{site}", n) for site, n in sorted(tables.items())}
        registry = str(Path(registry).expanduser().absolute())
        return cls(recipe, per_request, slots, float(wait), registry, tables, upload, head_map), extra

    def to_extra(self) -> dict:
        """The ``--model-loader-extra-config`` entries that give these options back."""
        out = {"recipe": self.recipe, "max_vectors_per_request": self.max_vectors_per_request,
               "slot_wait_s": self.slot_wait_s, "max_upload_mb": self.max_upload_mb}
        if self.max_slots is not None:
            out["max_slots"] = self.max_slots
        if self.registry is not None:
            out.update(registry=self.registry, registry_tables=self.registry_tables)
        if self.head_map is not None:
            out["head_map"] = self.head_map
        return out


def check_served(recipe: Recipe, where: str = "steering.vectors", conditions: bool = True) -> Recipe:
    """``recipe``, refused with a reason where vLLM serving cannot apply it (a CAST condition also
    when not ``conditions``: an intervention registered at run time)."""
    if recipe.router is not None:
        raise RecipeError("routing: per-request layer routing is not supported behind vLLM "
                          "(it gathers rows of Hugging Face's KV cache); remove 'routing' or serve with static 'skip'")
    if recipe.default:
        raise RecipeError("steering.default: behind vLLM each request chooses its vectors (vllm_xargs splice_vector) "
                          "and requests without steering stay unsteered; remove 'default'")
    for name, steer in recipe.steers.items():
        if isinstance(steer.gate, Condition) and not conditions:
            raise RecipeError(f"{where}.{name}.gate: {NOT_REGISTERED}")
        if steer.gate is not None and not isinstance(steer.gate, (TokenGate, Condition)):
            raise RecipeError(f"{where}.{name}.gate: {type(steer.gate).__name__} gates are not served behind vLLM")
    return recipe


def load_serving_recipe(path: str) -> Recipe:
    """The recipe at ``path``, refused with a reason where vLLM serving cannot apply it."""
    return check_served(load_recipe(path))
