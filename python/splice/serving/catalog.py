"""What vLLM's API server knows of the served interventions: the recipe's and those registered at run
time, the steering tables they share, and the slot bound. The middleware checks and canonicalises
every steered request with it; the admin endpoint registers and deletes through it."""

from __future__ import annotations

import os

from ..adapters.shape import ModelShape
from ..recipe import Recipe, RecipeError, check_steering_fits
from ..skipping.spec import skipped_parts
from ..steering.slot_entries import row_deciders
from .admission import Admission
from .options import ServeOptions, load_serving_recipe
from .registry import Registry, RegistryError
from .request_params import SERVER_FIELDS, VECTOR, RequestSteering, SteeringParamError, parse
from .steering_state import entry_counts, overflow, table_capacity

TOKEN_ENV = "SPLICE_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 32


def admin_token() -> str:
    """The admin endpoint's bearer token (:data:`TOKEN_ENV`); RuntimeError when missing or short."""
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < MIN_TOKEN_CHARS:
        raise RuntimeError(f"a server with a registry needs {TOKEN_ENV}, a bearer token of at least "
                           f"{MIN_TOKEN_CHARS} characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


class Catalog:
    def __init__(self, vllm_config):
        load = vllm_config.load_config
        if load.load_format != "splice":
            raise SteeringParamError(VECTOR, "this server applies no splice recipe (start it with --load-format splice)")
        self.options, _ = ServeOptions.split(load.model_loader_extra_config)
        self.recipe = load_serving_recipe(self.options.recipe)
        self.shape = ModelShape(vllm_config.model_config.hf_config)
        self.recipe.validate_for(self.shape)  # as the worker's loader did; head scales learn the head size here
        self.parts = skipped_parts(self.recipe.skips, self.shape.num_layers)
        self.capacity = table_capacity(self.recipe.steers, self.shape, self.options.max_vectors_per_request,
                                       self.options.registry_tables)
        self.known = {name: ("", steer.scale, entry_counts(steer, self.shape)) for name, steer in self.recipe.steers.items()}
        self.decided_at_prefill = {name for name, steer in self.recipe.steers.items()
                                   if row_deciders({name: steer}, [name])}
        max_rows = vllm_config.scheduler_config.max_num_seqs
        self.admission = Admission(min(self.options.max_slots or max_rows, max_rows), self.options.slot_wait_s)
        self.registry, self.token = None, None
        if self.options.registry is not None:
            self.token = admin_token()
            self.registry = Registry(self.options.registry, owns=True)
            for name, version in self.registry.names.items():
                self.known[name] = self._record(version, self.registry.load(name, version))
            self.registry.collect(set())

    def _record(self, version: str, steer) -> tuple:
        return version, steer.scale, entry_counts(steer, self.shape)

    # --- requests ----------------------------------------------------------------------------
    def resolve(self, extra_args: dict) -> RequestSteering:
        """The request's steering with each vector's version; SteeringParamError when it does not fit."""
        extra_args = {k: v for k, v in extra_args.items() if k not in SERVER_FIELDS}  # the server's to set
        steering = parse(extra_args, {name: known[1] for name, known in self.known.items()})
        per_request = self.options.max_vectors_per_request
        if len(steering.items) > per_request:
            raise SteeringParamError(VECTOR, f"{len(steering.items)} vectors; this server allows "
                                             f"{per_request} per request (max_vectors_per_request)")
        known = [self.known[name] for name, _ in steering.items]
        why = overflow([k[2] for k in known], self.capacity)
        if why:
            raise SteeringParamError(VECTOR, f"these vectors do not fit one request's steering tables: {why}")
        return steering.with_versions(k[0] for k in known)

    def whole_prompt(self, steering: RequestSteering) -> bool:
        """Whether a gate of ``steering`` is decided at prefill (the request must not read the prefix cache)."""
        return any(name in self.decided_at_prefill for name, _ in steering.items)

    # --- the admin endpoint ------------------------------------------------------------------
    def _check(self, name: str, steer) -> None:
        try:
            Recipe({name: steer}).validate_for(self.shape)
            check_steering_fits({name: steer}, [name], self.parts)
        except (RecipeError, ValueError) as exc:
            raise RegistryError("entry", str(exc).replace(f"steering.vectors.{name}", "entry")) from None
        why = overflow([entry_counts(steer, self.shape)], self.capacity)
        if why:
            raise RegistryError("entry", f"does not fit the server's steering tables: {why} (registry_tables)")

    def _registry(self) -> Registry:
        if self.registry is None:
            raise RegistryError("registry", "this server has no registry (start it with the 'registry' option)", 404)
        return self.registry

    def register(self, name: str, entry, files: dict[str, bytes]) -> tuple[str, bool]:
        """Register or replace ``name``: (version, whether it is new). Nothing changes on error."""
        registry = self._registry()
        if name in self.recipe.steers:
            raise RegistryError("name", f"{name!r} is the recipe's; recipe interventions are fixed at start", 409)
        version, steer = registry.stage(name, entry, files, lambda s: self._check(name, s))
        created = name not in registry.names
        registry.set_names({**registry.names, name: version})
        self.known[name] = self._record(version, steer)
        self.collect()
        return version, created

    def delete(self, name: str) -> str:
        registry = self._registry()
        if name not in registry.names:
            raise RegistryError("name", f"no registered intervention {name!r}", 404)
        version = registry.names[name]
        registry.set_names({n: v for n, v in registry.names.items() if n != name})
        del self.known[name]
        self.collect()
        return version

    def describe(self) -> dict:
        return {"recipe": sorted(self.recipe.steers),
                "registered": {n: k[0] for n, k in sorted(self.known.items()) if k[0]},
                "slots": {"in_use": len(self.admission.held), "max": self.admission.slots}}

    def collect(self, _freed=None) -> None:
        """Drop version files no name and no request in flight refers to."""
        if self.registry is not None:
            self.registry.collect(set(self.admission.versions))
