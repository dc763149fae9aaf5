"""Save and load conditions and maps as safetensors files that say what they are and what they fit.

Metadata: ``format`` (``"splice.intervention"``), ``version``, ``kind`` (``condition``, ``lowrank``,
``affine`` or ``probe_bank``), ``hidden_size``, ``model`` (when known) and ``settings`` (JSON: a
condition's or probe's layer, threshold, comparison and pooling; a map's site, scale and positions;
a bank's layers), plus ``user.*`` entries. Tensors: a condition's ``vector``; a low-rank map's
``A.{l}``, ``B.{l}``, ``c.{l}``; an affine map's ``a.{l}``, ``b.{l}``; a probe bank's
``probe.weight``, ``probe.bias``, ``probe.mean``, ``probe.std`` and ``vector.{k}.{l}`` (G-ACT:
bank vector ``k`` at layer ``l``, gated by the probe's choice ``k``); a controlled vector's
``controller.{w1,c1,w2,c2,mean,std}`` and ``vector.{l}`` (kind ``controller``: the Steer it gates). Loading checks the format, the shapes and finiteness; the object's own
checks then refuse another model's file when it is patched in.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save

from ..utils.atomic import write_atomic
from ..vectors.io import read_safetensors
from ..vectors.vector_set import VectorSet
from .gates import Condition
from .maps import Affine, LowRank
from .controller import PARAMETERS as CONTROLLER_TENSORS
from .controller import Controller
from .probe_select import ProbeSelect
from .spec import Steer

FORMAT = "splice.intervention"
VERSION = "1"
KINDS = {"condition": Condition, "lowrank": LowRank, "affine": Affine}
_NAME = re.compile(r"([A-Za-z]+)\.(0|[1-9][0-9]*)")


def _kind(obj) -> str:
    for kind, cls in KINDS.items():
        if isinstance(obj, cls):
            return kind
    raise TypeError(f"cannot save a {type(obj).__name__}; savable: {sorted(c.__name__ for c in KINDS.values())}")


def save_intervention(obj, path: str | os.PathLike, model: str | None = None) -> Path:
    """Write ``obj`` (a Condition, LowRank or Affine) to ``path``, atomically."""
    kind = _kind(obj)
    if kind == "condition":
        tensors, hidden = {"vector": obj.vector}, obj.vector.numel()
        settings = obj.settings()
        user = obj.metadata
    else:
        fields = ("A", "B", "c") if kind == "lowrank" else ("a", "b")
        tensors = {f"{f}.{l}": t for f in fields for l, t in getattr(obj, f).items()}
        hidden = next(iter(getattr(obj, fields[0]).values())).shape[0]
        settings = {"site": obj.site, "scale": obj.scale, "positions": obj.positions.to_config()}
        user = {}
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "hidden_size": str(hidden),
            "settings": json.dumps(settings), **({"model": model} if model else {}),
            **{f"user.{k}": str(v) for k, v in user.items()}}
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    obj.source = str(path)
    return Path(path)


PROBE_TENSORS = ("weight", "bias", "mean", "std")
_BANK_VECTOR = re.compile(r"vector\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


def save_bank(bank: list[Steer], probe: ProbeSelect, path: str | os.PathLike, model: str | None = None) -> Path:
    """Write a G-ACT bank (each Steer gated by ``probe.choice(k)``, in order) and its probe."""
    for k, steer in enumerate(bank):
        if getattr(steer.gate, "decider", None) is not probe or steer.gate.offset != k:
            raise ValueError(f"bank vector {k} is not gated by the probe's choice {k}")
    tensors = {f"probe.{n}": getattr(probe, n) for n in PROBE_TENSORS}
    tensors.update({f"vector.{k}.{l}": s.vector[l] for k, s in enumerate(bank) for l in s.layers})
    settings = {"layer": probe.layer, "reduce": probe.reduce, "layers": bank[0].layers}
    meta = {"format": FORMAT, "version": VERSION, "kind": "probe_bank", "hidden_size": str(probe.mean.numel()),
            "settings": json.dumps(settings), **({"model": model} if model else {})}
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return Path(path)


def _bank(tensors: dict, settings: dict, hidden: int, path: Path) -> list[Steer]:
    probe = ProbeSelect(*(tensors.pop(f"probe.{n}") for n in PROBE_TENSORS), layer=settings["layer"],
                        reduce=settings["reduce"], source=str(path))
    vectors: dict[int, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _BANK_VECTOR.fullmatch(name)
        if m is None or t.shape != (hidden,):
            raise ValueError(f"unexpected tensor {name!r} {tuple(t.shape)} in a probe bank")
        vectors.setdefault(int(m.group(1)), {})[int(m.group(2))] = t
    if sorted(vectors) != list(range(probe.width)):
        raise ValueError(f"a bank of {probe.width} vectors holds vectors {sorted(vectors)}")
    return [Steer(VectorSet(vectors[k], method="gact"), layers=settings["layers"], gate=probe.choice(k),
                  name=f"gact{k}", source=str(path)) for k in range(probe.width)]


def save_controlled(steer: Steer, path: str | os.PathLike, model: str | None = None) -> Path:
    """Write a Steer gated by a :class:`Controller` (vector, scale, layers and the controller)."""
    ctl = steer.gate
    if not isinstance(ctl, Controller):
        raise ValueError("save_controlled takes a Steer whose gate is a Controller")
    tensors = {f"controller.{n}": getattr(ctl, n) for n in CONTROLLER_TENSORS}
    tensors.update({f"vector.{l}": steer.vector[l] for l in steer.layers})
    settings = {"layer": ctl.layer, "layers": ctl.layers, "reduce": ctl.reduce, "scale": steer.scale,
                "steered": steer.layers}
    meta = {"format": FORMAT, "version": VERSION, "kind": "controller", "hidden_size": str(ctl.mean.numel()),
            "settings": json.dumps(settings), **({"model": model} if model else {})}
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return Path(path)


def _controlled(tensors: dict, settings: dict, hidden: int, path: Path) -> Steer:
    ctl = Controller(*(tensors.pop(f"controller.{n}") for n in CONTROLLER_TENSORS), layer=settings["layer"],
                     layers=settings["layers"], reduce=settings["reduce"], source=str(path))
    vectors = {}
    for name, t in tensors.items():
        m = _NAME.fullmatch(name)
        if m is None or m.group(1) != "vector" or t.shape != (hidden,):
            raise ValueError(f"unexpected tensor {name!r} {tuple(t.shape)} in a controlled vector")
        vectors[int(m.group(2))] = t
    return Steer(VectorSet(vectors), layers=settings["steered"], scale=settings["scale"], gate=ctl,
                 name="controlled", source=str(path))


def load_intervention(path: str | os.PathLike):
    """The Condition, LowRank or Affine in ``path`` (a probe bank: its list of gated Steers; a
    controlled vector: its Steer); ValueError naming the file if it is invalid."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "intervention")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a splice intervention file (format={meta.get('format')!r}, "
                         f"version={meta.get('version')!r}; expected {FORMAT!r} version {VERSION})")
    kind = meta.get("kind")
    if kind not in (*KINDS, "probe_bank", "controller"):
        raise ValueError(f"{path}: unknown kind {kind!r}; known: {sorted([*KINDS, 'probe_bank', 'controller'])}")
    try:
        settings = json.loads(meta.get("settings", "{}"))
        hidden = int(meta["hidden_size"])
        user = {k[5:]: v for k, v in meta.items() if k.startswith("user.")}
        if kind == "probe_bank":
            return _bank(tensors, settings, hidden, path)
        if kind == "controller":
            return _controlled(tensors, settings, hidden, path)
        if kind == "condition":
            if set(tensors) != {"vector"} or tensors["vector"].shape != (hidden,):
                raise ValueError(f"a condition holds one [{hidden}] tensor 'vector'")
            obj = Condition(tensors["vector"], **settings, metadata=user)
        else:
            fields = ("A", "B", "c") if kind == "lowrank" else ("a", "b")
            by_field: dict[str, dict[int, torch.Tensor]] = {f: {} for f in fields}
            for name, t in tensors.items():
                m = _NAME.fullmatch(name)
                if m is None or m.group(1) not in fields:
                    raise ValueError(f"unexpected tensor {name!r} for a {kind} map")
                by_field[m.group(1)][int(m.group(2))] = t
            if any(t.shape[0] != hidden for f in fields[:2] for t in by_field[f].values()):
                raise ValueError(f"tensors do not have the file's hidden size {hidden}")
            cls = LowRank if kind == "lowrank" else Affine
            obj = cls(**by_field, site=settings["site"], scale=settings["scale"], positions=settings["positions"])
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    obj.source = str(path)
    return obj
