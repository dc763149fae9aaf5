"""Recipes: a YAML or JSON file describing a set of interventions, shared by the Python API, the CLI
and serving. Relative file paths are read relative to the recipe file.

.. code-block:: yaml

    version: 1
    steering:
      vectors:                       # named interventions: each has exactly one of file, map, heads
        happy:                       # a Steer
          file: happy.safetensors    # splice safetensors, or a llama.cpp control vector (.gguf)
          layers: [12, 13, 14, 15, 16, 17, 18]   # default: every layer in the file
          op: add                    # add | ablate | clamp (clamp: lo and/or hi)
          scale: 0.4
          site: out                  # in | out | attn | mlp | heads (heads needs head: N)
          positions: all             # all | prompt | generated | [start, end] | {phase, start, end}
          gate: {condition: cooking.safetensors}   # a CAST condition file (splice condition fit);
                                     # its layer, threshold, compare, reduce may be overridden here
        calm:
          file: calm.safetensors
          gate: {direction: calm-gate.safetensors, threshold: 0.1, temperature: 0.05, score: cos}
                                     # a per-token gate; direction: a vector file (may be `file`)
        lineas:
          map: lineas.safetensors    # a low-rank or affine map file (splice train lineas): its own
          layers: [3, 4]             # site, scale and positions; layers, scale, positions and gate
          scale: 0.5                 # may be overridden
        prune:
          heads: {10: [2, 5], 11: [0]}   # query heads scaled at site heads (scale default 0: pruned)
          scale: 0.0                 # also positions, gate
      default: [happy]               # applied to every row: names or {name, scale}
    skip:                            # static layer skipping (0-based layer indices)
      layers: [20, 21]               # whole layers
      attn: [5]                      # attention only
      mlp: [7]                       # MLP only
    routing:
      router: router.safetensors     # per-request routing decided at prefill (splice route train)

:meth:`Recipe.save` writes gates and maps that have no file beside the recipe, as
``<stem>.<name>.<what>.safetensors``; head scales are written inline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .skipping.spec import Skip, unsteerable_sites
from .steering.gates import COMPARES, REDUCES, SCORES, Condition, RowDecider, TokenGate
from .steering.maps import Affine, HeadScale, LowRank
from .steering.slot_entries import Intervention
from .steering.spec import Steer, check_gate_fits
from .utils.atomic import write_atomic
from .vectors.vector_set import VectorSet

VERSION = 1
TOP_KEYS = {"version", "steering", "skip", "routing"}
SKIP_KEYS = {"layers": "layer", "attn": "attn", "mlp": "mlp"}
STEERING_KEYS = {"vectors", "default"}
# What each entry of steering.vectors is, by the one key that names its source, and its keys.
VECTOR_KEYS = {"file", "layers", "op", "scale", "site", "head", "lo", "hi", "positions", "gate"}
MAP_KEYS = {"map", "layers", "scale", "positions", "gate"}
HEADS_KEYS = {"heads", "scale", "positions", "gate"}
ENTRY_KINDS = {"file": ("a vector entry", VECTOR_KEYS), "map": ("a map entry", MAP_KEYS),
               "heads": ("a head-scale entry", HEADS_KEYS)}
TOKEN_GATE_KEYS = {"direction", "threshold", "temperature", "score"}
CONDITION_KEYS = {"condition", "layer", "threshold", "compare", "reduce"}
FILE_KINDS = {"condition": "a CAST condition", "lowrank": "a low-rank map", "affine": "an affine map"}
MAP_KINDS = {k: FILE_KINDS[k] for k in ("lowrank", "affine")}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the offending field."""


def _check_keys(where: str, value, allowed: set[str], what: str | None = None) -> dict:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        kind = f" for {what}" if what else ""
        raise RecipeError(f"{where}: unknown keys {sorted(unknown, key=str)}{kind}; allowed: {sorted(allowed)}")
    return value


def _number(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RecipeError(f"{where}: must be a finite number, got {value}")
    return value


def _index(where: str, value) -> int:
    """A non-negative int; JSON object keys arrive as decimal strings."""
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _layers(where: str, value) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RecipeError(f"{where}: expected a list of layer indices, got {value!r}")
    return [_index(where, l) for l in value]


def _choice(where: str, value, choices) -> str:
    if value not in choices:
        raise RecipeError(f"{where}: must be one of {list(choices)}, got {value!r}")
    return value


def _path(where: str, value, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a file path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _file_kind(path: Path) -> str | None:
    """What a splice safetensors file holds ("vectors", "condition", "lowrank", "affine"), or None."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not safetensors at all: the loader's own message says so
        return None
    if meta.get("format") == "splice.vectors":
        return "vectors"
    return meta.get("kind") if meta.get("format") == "splice.intervention" else None


HINTS = {"vectors": "it is a vector file: name it with 'file:' (or as a gate's 'direction:')",
         "condition": "it is a CAST condition file: use it as 'gate: {condition: ...}'",
         "lowrank": "it is a low-rank map file: name it with 'map:'",
         "affine": "it is an affine map file: name it with 'map:'"}


def _hint(path: Path, wanted: set[str]) -> str:
    kind = _file_kind(path) if path.suffix == ".safetensors" else None
    return f" ({HINTS[kind]})" if kind in HINTS and kind not in wanted else ""


class _Files:
    """Reads a recipe's files once each: one vector set per path (a steer and its gate may share a
    file), one condition per path and settings (steers gated by it share its decision)."""

    def __init__(self, base: Path):
        self.base = base
        self.vectors: dict[Path, VectorSet] = {}
        self.conditions: dict[tuple, Condition] = {}

    def vector_set(self, where: str, value) -> tuple[VectorSet, Path]:
        from .vectors.gguf_control import import_control_vector
        from .vectors.io import load_vectors

        path = _path(where, value, self.base)
        if path not in self.vectors:
            if not path.exists():
                raise RecipeError(f"{where}: vector file {path} does not exist")
            try:
                self.vectors[path] = import_control_vector(path) if path.suffix == ".gguf" else load_vectors(path)
            except (ValueError, OSError) as exc:
                raise RecipeError(f"{where}: {exc}{_hint(path, {'vectors'})}") from exc
        return self.vectors[path], path

    def intervention(self, where: str, value, kinds: dict[str, str]):
        from .steering.files import KINDS, load_intervention

        path = _path(where, value, self.base)
        if not path.exists():
            raise RecipeError(f"{where}: file {path} does not exist")
        try:
            obj = load_intervention(path)
        except (ValueError, OSError) as exc:
            raise RecipeError(f"{where}: {exc}{_hint(path, set(kinds))}") from exc
        if isinstance(obj, (list, Steer)):
            raise RecipeError(f"{where}: {path} holds a G-ACT probe bank or a controlled vector, which recipes do "
                              "not name yet; load it with splice.steering.files.load_intervention and pass its "
                              "Steers to splice.patch")
        kind = next(k for k, cls in KINDS.items() if isinstance(obj, cls))
        if kind not in kinds:
            raise RecipeError(f"{where}: {path} holds {FILE_KINDS[kind]}, not {' or '.join(kinds.values())}"
                              f"{_hint(path, set(kinds))}")
        return obj, path

    def condition(self, where: str, value, settings: dict) -> Condition:
        path = _path(where, value, self.base)
        key = (path, tuple(sorted(settings.items())))
        if key not in self.conditions:
            cond, _ = self.intervention(where, value, {"condition": FILE_KINDS["condition"]})
            try:
                self.conditions[key] = dataclasses.replace(cond, **settings) if settings else cond
            except ValueError as exc:
                raise RecipeError(f"{where.rsplit('.', 1)[0]}: {exc}") from exc
        return self.conditions[key]


def _gate_from_config(where: str, cfg, files: _Files) -> TokenGate | Condition | None:
    if cfg is None:
        return None
    where = f"{where}.gate"
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: expected a mapping ({{condition: FILE}} or {{direction: FILE, threshold, ...}})")
    named = [k for k in ("condition", "direction") if k in cfg]
    if len(named) != 1:
        raise RecipeError(f"{where}: give exactly one of 'condition' (a CAST condition file) or 'direction' "
                          f"(a token gate's vector file), got {named or sorted(cfg, key=str)}")
    if named == ["condition"]:
        _check_keys(where, cfg, CONDITION_KEYS, "a condition gate")
        settings = {}
        if "layer" in cfg:
            settings["layer"] = _index(f"{where}.layer", cfg["layer"])
        if "threshold" in cfg:
            settings["threshold"] = _number(f"{where}.threshold", cfg["threshold"])
        if "compare" in cfg:
            settings["compare"] = _choice(f"{where}.compare", cfg["compare"], COMPARES)
        if "reduce" in cfg:
            settings["reduce"] = _choice(f"{where}.reduce", cfg["reduce"], REDUCES)
        return files.condition(f"{where}.condition", cfg["condition"], settings)
    _check_keys(where, cfg, TOKEN_GATE_KEYS, "a token gate")
    threshold = _number(f"{where}.threshold", cfg.get("threshold", 0.0))
    temperature = _number(f"{where}.temperature", cfg.get("temperature", 0.0))
    if temperature < 0:
        raise RecipeError(f"{where}.temperature: must be >= 0 (0: a hard threshold), got {temperature}")
    score = _choice(f"{where}.score", cfg.get("score", "cos"), SCORES)
    direction, path = files.vector_set(f"{where}.direction", cfg["direction"])
    try:
        gate = TokenGate(direction, threshold=threshold, temperature=temperature, score=score)
    except ValueError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
    gate.source = str(path)  # TokenGate has no such field: the recipe remembers the file on the gate
    return gate


def _entry_from_config(name: str, cfg, files: _Files) -> Intervention:
    where = f"steering.vectors.{name}"
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    kinds = [k for k in ENTRY_KINDS if k in cfg]
    if not kinds:
        raise RecipeError(f"{where}: 'file' is required (a vector file; or 'map' for a map file, "
                          "'heads' for a head scale)")
    if len(kinds) > 1:
        raise RecipeError(f"{where}: give exactly one of 'file', 'map' or 'heads', got {kinds}")
    kind = kinds[0]
    what, allowed = ENTRY_KINDS[kind]
    _check_keys(where, cfg, allowed, what)
    gate = _gate_from_config(where, cfg.get("gate"), files)
    layers = _layers(f"{where}.layers", cfg.get("layers"))
    try:
        if kind == "file":
            vectors, path = files.vector_set(f"{where}.file", cfg["file"])
            return Steer(vectors, layers=layers, op=cfg.get("op", "add"),
                         scale=float(cfg.get("scale", 1.0)), lo=float(cfg.get("lo", -math.inf)),
                         hi=float(cfg.get("hi", math.inf)), site=cfg.get("site"), head=cfg.get("head"),
                         positions=cfg.get("positions", "all"), name=name, source=str(path), gate=gate)
        overrides = {"layers": layers} if layers is not None else {}
        if "scale" in cfg:
            overrides["scale"] = _number(f"{where}.scale", cfg["scale"])
        if "positions" in cfg:
            overrides["positions"] = cfg["positions"]
        if kind == "map":
            obj, _ = files.intervention(f"{where}.map", cfg["map"], MAP_KINDS)
            return dataclasses.replace(obj, **overrides, gate=gate, name=name)
        heads = cfg["heads"]
        if not isinstance(heads, dict) or not heads:
            raise RecipeError(f"{where}.heads: expected a non-empty mapping {{layer: [head, ...]}}, got {heads!r}")
        parsed = {}
        for layer, hs in heads.items():
            layer = _index(f"{where}.heads", layer)
            if not isinstance(hs, list) or not hs:
                raise RecipeError(f"{where}.heads.{layer}: expected a non-empty list of head indices, got {hs!r}")
            parsed[layer] = [_index(f"{where}.heads.{layer}", h) for h in hs]
        return HeadScale(heads=parsed, **overrides, gate=gate, name=name)
    except RecipeError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


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


def _save_vector_set(vs: VectorSet, path) -> None:
    """save_vectors, with each layer's tensor its own copy (safetensors refuses tensors that share
    memory, as a single tensor given for several layers does)."""
    from .vectors.io import save_vectors

    save_vectors(dataclasses.replace(vs, directions={l: v.clone() for l, v in vs.directions.items()}), path)


def _source(obj) -> str | None:
    return getattr(obj, "source", None)


def _file_note(obj) -> str:
    source = _source(obj)
    return f" (file {source})" if source else ""


class _Writer:
    """Writes a recipe's entries as data, saving what has no file beside the recipe."""

    def __init__(self, base: Path, stem: str):
        self.base, self.stem = base, stem

    def relative(self, source: str) -> str:
        return os.path.relpath(Path(source).absolute(), self.base)

    def target(self, name: str, what: str) -> Path:
        return self.base / f"{self.stem}.{name}.{what}.safetensors"

    def gate(self, name: str, item: Intervention) -> dict | None:
        from .steering.files import save_intervention

        gate = item.gate
        if gate is None:
            return None
        if isinstance(gate, Condition):
            if gate.source is None:
                save_intervention(gate, self.target(name, "condition"))
            return {"condition": self.relative(gate.source), **gate.settings()}
        if isinstance(gate, TokenGate):
            source = _source(gate)
            if source is None and isinstance(item, Steer) and gate.direction is item.vector and item.source:
                source = item.source  # the steer's own vectors, from its file
            if source is None:
                direction = gate.direction
                if not isinstance(direction, VectorSet):
                    direction = VectorSet({l: direction for l in item.layers}, site=item.site)
                source = str(self.target(name, "gate"))
                _save_vector_set(direction, source)
                gate.source = source
            return {"direction": self.relative(source), **gate.to_config()}
        raise RecipeError(f"steering.vectors.{name}.gate: a {type(gate).__name__} cannot be written to a recipe "
                          "(recipes hold CAST conditions and token gates)")

    def entry(self, name: str, item: Intervention) -> dict:
        from .steering.files import KINDS, save_intervention

        if isinstance(item, Steer):
            if item.source is None:
                target = self.base / f"{self.stem}.{name}.safetensors"
                _save_vector_set(item.vector, target)
                item.source = str(target)
            cfg = {"file": self.relative(item.source), "layers": list(item.layers), "op": item.op,
                   "scale": item.scale, "site": item.site, "positions": item.positions.to_config()}
            if item.head is not None:
                cfg["head"] = item.head
            if item.op == "clamp":
                cfg.update(lo=item.lo, hi=item.hi)
        elif isinstance(item, (LowRank, Affine)):
            if item.source is None:
                kind = next(k for k, cls in KINDS.items() if isinstance(item, cls))
                save_intervention(item, self.target(name, kind))
            cfg = {"map": self.relative(item.source), "layers": list(item.layers), "scale": item.scale,
                   "positions": item.positions.to_config()}
        elif isinstance(item, HeadScale):
            cfg = {"heads": {l: list(hs) for l, hs in item.heads.items()}, "scale": item.scale,
                   "positions": item.positions.to_config()}
        else:
            raise RecipeError(f"steering.vectors.{name}: a {type(item).__name__} cannot be written to a recipe")
        gate = self.gate(name, item)  # after the steer's own file, which its gate may share
        if gate is not None:
            cfg["gate"] = gate
        return cfg


@dataclass
class Recipe:
    """Named interventions (``Steer``, ``LowRank``, ``Affine``, ``HeadScale``) and the default list
    (name, scale) applied to every row; static skips; a per-request router."""

    steers: dict[str, Intervention] = field(default_factory=dict)
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
        files = _Files(Path(base))
        steers = {name: _entry_from_config(name, cfg, files) for name, cfg in vectors.items()}
        skips = _skips_from_config(data["skip"]) if data.get("skip") is not None else []
        router = _router_from_config(data["routing"], Path(base)) if data.get("routing") is not None else None
        return cls(steers, _default_from_config(steering.get("default", []) or [], steers), skips, router)

    def validate_for(self, adapter) -> None:
        for name, steer in self.steers.items():
            where = f"steering.vectors.{name}"
            gate = steer.gate
            try:  # the intervention without its gate first, so each error names its own part
                (dataclasses.replace(steer, gate=None) if gate is not None else steer).validate_for(adapter)
            except ValueError as exc:
                raise RecipeError(f"{where}: {exc}{_file_note(steer)}") from exc
            if gate is not None:
                field_name = "gate.condition" if isinstance(gate, RowDecider) else "gate"
                try:
                    check_gate_fits(gate, steer.layers, adapter.site_size(steer.site), adapter)
                    steer.validate_for(adapter)
                except ValueError as exc:
                    raise RecipeError(f"{where}.{field_name}: {exc}{_file_note(gate)}") from exc
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
        """The recipe as data. Vectors, gates and maps without a file are saved beside it, as
        ``<stem>.<name>.safetensors`` (a steer's vectors) or ``<stem>.<name>.<what>.safetensors``
        (``what``: ``condition``, ``gate`` (a token gate's direction), ``lowrank`` or ``affine``)."""
        writer = _Writer(base, stem)
        vectors = {name: writer.entry(name, s) for name, s in self.steers.items()}
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


def check_steering_fits(steers: dict[str, Intervention], names: Iterable[str], parts: list[tuple[bool, bool]],
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
