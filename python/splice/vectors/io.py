"""Save and load a :class:`VectorSet` as a safetensors file.

Layout: one float32 tensor ``layer.{l}`` per direction, and string metadata ``format``
(``"splice.vectors"``), ``version``, ``site``, ``hidden_size``, ``layers`` (the layer convention in
words), ``model``, ``arch`` and ``method`` when set, and each ``vs.metadata`` entry as ``user.{key}``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..utils.atomic import write_atomic
from .vector_set import VectorSet

FORMAT = "splice.vectors"
VERSION = "1"
LAYER_CONVENTION = ("layer.{l} is the direction for decoder layer l (0-based) at `site`: "
                    "'out' = output of layer l = HF hidden_states[l + 1], "
                    "'in' = input of layer l = HF hidden_states[l]")
_LAYER_NAME = re.compile(r"layer\.(0|[1-9][0-9]*)")


def save_vectors(vs: VectorSet, path: str | os.PathLike) -> None:
    """Write ``vs`` to ``path`` (safetensors), atomically."""
    _check_str_metadata(vs.metadata)
    meta = {"format": FORMAT, "version": VERSION, "site": vs.site,
            "hidden_size": str(vs.hidden_size), "layers": LAYER_CONVENTION}
    meta.update({k: v for k, v in (("model", vs.model), ("arch", vs.arch), ("method", vs.method))
                 if v is not None})
    meta.update({f"user.{k}": v for k, v in vs.metadata.items()})
    tensors = {f"layer.{layer}": v for layer, v in vs.directions.items()}
    data = save(tensors, metadata=meta)
    write_atomic(path, data)


def load_vectors(path: str | os.PathLike, expect_hidden_size: int | None = None) -> VectorSet:
    """Read a file written by :func:`save_vectors`; ValueError naming the file if it is invalid.

    ``expect_hidden_size``, when given, must equal the file's hidden size.
    """
    path = Path(path)
    meta, tensors = read_safetensors(path, "vector")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a splice vector file (metadata format="
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported splice.vectors version {meta.get('version')!r}")
    hidden = meta.get("hidden_size", "")
    if not hidden.isdecimal():
        raise ValueError(f"{path}: bad hidden_size metadata {hidden!r}")
    hidden = int(hidden)
    if expect_hidden_size is not None and hidden != expect_hidden_size:
        raise ValueError(f"{path}: vectors have hidden size {hidden}, "
                         f"expected {expect_hidden_size}")
    directions = {}
    for name, t in tensors.items():
        m = _LAYER_NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"{path}: tensor name {name!r} is not of the form layer.<index>")
        if not t.is_floating_point() or t.shape != (hidden,):
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected a "
                             f"1-D float tensor of size {hidden}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name!r} contains NaN or inf")
        directions[int(m.group(1))] = t
    user = {k[len("user."):]: v for k, v in meta.items() if k.startswith("user.")}
    try:
        return VectorSet(directions, site=meta.get("site", ""), model=meta.get("model"),
                         method=meta.get("method"), metadata=user, arch=meta.get("arch"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_safetensors(path: Path, what: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file; FileNotFoundError or ValueError naming ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {name: f.get_tensor(name).clone() for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e


def _check_str_metadata(metadata: dict) -> None:
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"VectorSet.metadata must map str to str, got {bad!r}")
