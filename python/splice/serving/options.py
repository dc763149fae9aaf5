"""The ``splice`` load format's options (``--model-loader-extra-config``) and the recipe checks
that do not need the model.

``recipe`` (required) is a recipe file (:mod:`splice.recipe`); ``max_vectors_per_request``
(default 4) bounds how many vectors one request may combine, which sizes the steering tables.
Every other key goes to vLLM's default loader. Only plain steering vectors are served: a recipe
with gates, maps or head scales is refused (they run with ``splice.patch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..recipe import Recipe, RecipeError, load_recipe
from ..steering.maps import Affine, HeadScale, LowRank
from ..steering.spec import Steer

SERVED_SITES = ("out", "mlp", "attn")
NOT_SERVED = ("gated steering (token gates, CAST conditions), maps and head scales are not served behind vLLM yet; "
              "they run with splice.patch")
KIND_NAMES = {LowRank: "a low-rank map", Affine: "an affine map", HeadScale: "a head scale"}


@dataclass(frozen=True)
class ServeOptions:
    recipe: str
    max_vectors_per_request: int = 4

    @classmethod
    def split(cls, extra) -> tuple["ServeOptions", dict]:
        """(splice's options, the remaining keys for vLLM's default loader)."""
        extra = dict(extra or {})
        if "recipe" not in extra:
            raise RecipeError('--load-format splice needs --model-loader-extra-config \'{"recipe": "R.yaml"}\'')
        recipe = str(Path(extra.pop("recipe")).expanduser().absolute())
        per_request = extra.pop("max_vectors_per_request", 4)
        if isinstance(per_request, bool) or not isinstance(per_request, int) or per_request < 1:
            raise RecipeError(f"max_vectors_per_request must be a positive integer, got {per_request!r}")
        return cls(recipe, per_request), extra


def load_serving_recipe(path: str) -> Recipe:
    """The recipe at ``path``, refused with a reason where vLLM serving cannot apply it."""
    recipe = load_recipe(path)
    if recipe.router is not None:
        raise RecipeError("routing: per-request layer routing is not supported behind vLLM "
                          "(it gathers rows of Hugging Face's KV cache); remove 'routing' or serve with static 'skip'")
    if recipe.default:
        raise RecipeError("steering.default: behind vLLM each request chooses its vectors (vllm_xargs splice_vector) "
                          "and requests without steering stay unsteered; remove 'default'")
    for name, steer in recipe.steers.items():
        if not isinstance(steer, Steer):
            what = KIND_NAMES.get(type(steer), f"a {type(steer).__name__}")
            raise RecipeError(f"steering.vectors.{name}: {what} ({NOT_SERVED})")
        if steer.gate is not None:
            raise RecipeError(f"steering.vectors.{name}.gate: a gated vector ({NOT_SERVED}); remove 'gate'")
        if steer.site not in SERVED_SITES:
            raise RecipeError(f"steering.vectors.{name}: site {steer.site!r} is not supported behind vLLM; "
                              f"use one of {list(SERVED_SITES)} ('out' of layer l-1 is the input of layer l)")
        if steer.site == "out" and steer.op != "add":
            raise RecipeError(f"steering.vectors.{name}: {steer.op} at site 'out' is not supported behind vLLM "
                              "(it needs the whole residual stream, which vLLM keeps split in two); "
                              "use site 'mlp' or 'attn', or op 'add'")
    return recipe
