"""Recipes: a YAML or JSON file describing a set of interventions, shared by the Python API, the CLI
and serving. Relative file paths are read relative to the recipe file.

.. code-block:: yaml

    version: 1
    steering:
      vectors:                       # named interventions
        happy:
          file: happy.safetensors    # splice safetensors, or a llama.cpp control vector (.gguf)
          layers: [12, 13, 14, 15, 16, 17, 18]   # default: every layer in the file
          op: add                    # add | ablate | clamp
          scale: 0.4
          site: out                  # in | out | attn | mlp | heads (heads needs head: N)
          positions: all             # all | prompt | generated | [start, end] | {phase, start, end}
      default: [happy]               # applied to every row: names or {name, scale}
    skip:                            # static layer skipping (0-based layer indices)
      layers: [20, 21]               # whole layers
      attn: [5]                      # attention only
      mlp: [7]                       # MLP only
    routing:
      router: router.safetensors     # per-request routing decided at prefill (splice route train)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .skipping.spec import Skip, unsteerable_sites
from .steering.spec import Steer
from .utils.atomic import write_atomic

VERSION = 1
TOP_KEYS = {"version", "steering", "skip", "routing"}
SKIP_KEYS = {"layers": "layer", "attn": "attn", "mlp": "mlp"}
STEERING_KEYS = {"vectors", "default"}
VECTOR_KEYS = {"file", "layers", "op", "scale", "site", "head", "lo", "hi", "positions"}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the offending field."""


def _check_keys(where: str, value, allowed: set[str]) -> dict:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def _read_vectors(path: Path):
    from .vectors.gguf_control import import_control_vector
    from .vectors.io import load_vectors

    if not path.exists():
        raise RecipeError(f"vector file {path} does not exist")
    return import_control_vector(path) if path.suffix == ".gguf" else load_vectors(path)


def _steer_from_config(name: str, cfg, base: Path) -> Steer:
    cfg = _check_keys(f"steering.vectors.{name}", cfg, VECTOR_KEYS)
    if "file" not in cfg:
        raise RecipeError(f"steering.vectors.{name}: 'file' is required")
    path = Path(cfg["file"])
    path = path if path.is_absolute() else base / path
    try:
        vectors = _read_vectors(path)
        return Steer(vectors, layers=cfg.get("layers"), op=cfg.get("op", "add"),
                     scale=float(cfg.get("scale", 1.0)), lo=float(cfg.get("lo", -math.inf)),
                     hi=float(cfg.get("hi", math.inf)), site=cfg.get("site"), head=cfg.get("head"),
                     positions=cfg.get("positions", "all"), name=name, source=str(path))
    except RecipeError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise RecipeError(f"steering.vectors.{name}: {exc}") from exc


def _default_from_config(items, names) -> list[tuple[str, float]]:
    if not isinstance(items, list):
        raise RecipeError("steering.default: expected a list of names or {name, scale}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        item = _check_keys(f"steering.default[{i}]", item, {"name", "scale"})
        if item.get("name") not in names:
            raise RecipeError(f"steering.default[{i}]: unknown vector {item.get('name')!r}; defined: {sorted(names)}")
        scale = float(item.get("scale", names[item["name"]].scale))
        if not math.isfinite(scale):
            raise RecipeError(f"steering.default[{i}].scale must be a finite number")
        out.append((item["name"], scale))
    return out


def _skips_from_config(cfg) -> list[Skip]:
    cfg = _check_keys("skip", cfg, set(SKIP_KEYS))
    skips = []
    for key, part in SKIP_KEYS.items():
        layers = cfg.get(key)
        if layers is None:
            continue
        if not isinstance(layers, list) or not all(isinstance(l, int) for l in layers):
            raise RecipeError(f"skip.{key}: expected a list of layer indices")
        if layers:
            skips.append(Skip(layers, part))
    return skips


def _router_from_config(cfg, base: Path):
    from .skipping.routers import load_router

    cfg = _check_keys("routing", cfg, {"router"})
    if "router" not in cfg:
        raise RecipeError("routing: 'router' (a router file) is required")
    path = Path(cfg["router"])
    path = path if path.is_absolute() else base / path
    try:
        return load_router(path)
    except (ValueError, OSError) as exc:
        raise RecipeError(f"routing.router: {exc}") from exc


@dataclass
class Recipe:
    """Named interventions and the default list (name, scale) applied to every row; static
    skips; a per-request router."""

    steers: dict[str, Steer] = field(default_factory=dict)
    default: list[tuple[str, float]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    router: object = None

    @classmethod
    def from_dict(cls, data, base: str | Path = ".") -> "Recipe":
        data = _check_keys("recipe", data or {}, TOP_KEYS)
        if data.get("version", VERSION) != VERSION:
            raise RecipeError(f"recipe version {data['version']!r} is not supported (this splice reads {VERSION})")
        steering = _check_keys("steering", data.get("steering", {}) or {}, STEERING_KEYS)
        vectors = steering.get("vectors", {}) or {}
        if not isinstance(vectors, dict):
            raise RecipeError("steering.vectors: expected a mapping of name -> settings")
        steers = {name: _steer_from_config(name, cfg, Path(base)) for name, cfg in vectors.items()}
        skips = _skips_from_config(data["skip"]) if data.get("skip") is not None else []
        router = _router_from_config(data["routing"], Path(base)) if data.get("routing") is not None else None
        return cls(steers, _default_from_config(steering.get("default", []) or [], steers), skips, router)

    def validate_for(self, adapter) -> None:
        for name, steer in self.steers.items():
            try:
                steer.validate_for(adapter)
            except ValueError as exc:
                raise RecipeError(f"steering.vectors.{name}: {exc}") from exc
        for skip in self.skips:
            try:
                skip.validate_for(adapter)
            except ValueError as exc:
                raise RecipeError(f"skip: {exc}") from exc
        if self.router is not None:
            try:
                self.router.validate_for(adapter)
            except ValueError as exc:
                raise RecipeError(f"routing.router: {exc}") from exc

    def to_dict(self, base: Path, stem: str) -> dict:
        """The recipe as data; vectors without a file are saved as ``<stem>.<name>.safetensors``."""
        from .vectors.io import save_vectors

        vectors = {}
        for name, s in self.steers.items():
            if s.source is None:
                target = base / f"{stem}.{name}.safetensors"
                save_vectors(s.vector, target)
                s.source = str(target)
            cfg = {"file": os.path.relpath(Path(s.source).absolute(), base), "layers": list(s.layers), "op": s.op, "scale": s.scale, "site": s.site,
                   "positions": s.positions.to_config()}
            if s.head is not None:
                cfg["head"] = s.head
            if s.op == "clamp":
                cfg.update(lo=s.lo, hi=s.hi)
            vectors[name] = cfg
        default = [{"name": n, "scale": sc} for n, sc in self.default]
        data = {"version": VERSION, "steering": {"vectors": vectors, "default": default}}
        if self.skips:
            keys = {part: key for key, part in SKIP_KEYS.items()}
            data["skip"] = {}
            for skip in self.skips:
                data["skip"].setdefault(keys[skip.part], []).extend(skip.layers)
        if self.router is not None:
            if self.router.source is None:
                raise RecipeError("the router has no file: save it (router.save(path)) before saving the recipe")
            data["routing"] = {"router": os.path.relpath(Path(self.router.source).absolute(), base)}
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path).absolute()
        data = self.to_dict(path.parent, path.stem)
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        return write_atomic(path, text)


def load_recipe(source) -> Recipe:
    """A Recipe from a Recipe, a dict, or a ``.yaml``/``.yml``/``.json`` file path."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.from_dict(source)
    path = Path(source)
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return Recipe.from_dict(data, base=path.parent)


def check_steering_fits(steers: dict[str, Steer], names: Iterable[str], parts: list[tuple[bool, bool]],
                        routed: Iterable[int] = ()) -> None:
    """Refuse steering any of ``names`` at a site that the skips (``parts``: ``(run_attn, run_mlp)`` per
    layer) or per-request routing (``routed`` layers) take away; shared by ``splice.patch`` and serving."""
    forbidden = unsteerable_sites(parts, routed)
    for name in names:
        steer = steers[name]
        bad = [l for l in steer.layers if steer.site in forbidden.get(l, ())]
        if bad:
            raise ValueError(f"steering {name!r} at site {steer.site!r} of layers {bad}: those layers skip "
                             "that part (or are routed per request); splice does not steer skipped layers")
