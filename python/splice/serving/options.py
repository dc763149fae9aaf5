"""The ``splice`` load format's options (``--model-loader-extra-config``) and the recipe checks
that do not need the model.

``recipe`` (required) is a recipe file (:mod:`splice.recipe`); ``max_vectors_per_request``
(default 4) bounds how many vectors one request may combine, which sizes the steering tables.
Every other key goes to vLLM's default loader. Served: steering vectors (every op, every site),
token gates, low-rank and affine maps and head scales. Refused with the reason: interventions gated
by a decision made at prefill (CAST conditions, G-ACT probes, controllers), routing and a default list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..recipe import Recipe, RecipeError, load_recipe
from ..steering.gates import TokenGate

NOT_SERVED = ("a gate decided at prefill (a CAST condition, a G-ACT probe or a controller) is not served behind "
              "vLLM yet: the decision pools the whole prompt, which chunked prefill and the prefix cache split; "
              "it runs with splice.patch")


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
        if steer.gate is not None and not isinstance(steer.gate, TokenGate):
            raise RecipeError(f"steering.vectors.{name}.gate: {NOT_SERVED}")
    return recipe
