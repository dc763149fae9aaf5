"""llama.cpp control vectors (GGUF) to and from :class:`VectorSet`.

File layout, as llama.cpp's ``common_control_vector_load_one`` (common/common.cpp) reads it and its
``cvector-generator`` and repeng's ``export_gguf`` write it: ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` (string), ``controlvector.layer_count`` (uint32,
the number of direction tensors) and one 1-D F32 tensor ``direction.N`` per steered layer.
The model hint is the model's architecture as llama.cpp names it (``"llama"`` for SmolLM2),
``VectorSet.arch``. llama.cpp reads only the tensors. splice also writes ``splice.model``,
``splice.method`` and ``splice.user.<key>`` strings, which llama.cpp ignores, so metadata
survives a round trip.

Layer convention: llama.cpp adds ``direction.N`` to the output of decoder layer N (0-based), the
``l_out`` of layer ``il == N`` after the block's last residual add, at every position. That is
splice's site ``"out"`` at layer N (``hidden_states[N + 1]`` in Hugging Face terms), so
``direction.N`` <-> ``VectorSet(site="out").directions[N]``. llama.cpp rejects ``direction.0``
(its control-vector buffer starts at layer 1), so the output of layer 0 cannot be exported. The
input of layer l is the output of layer l - 1: :func:`to_out_site` rewrites a site-``"in"`` set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from ..utils.atomic import atomic_path
from .io import _check_str_metadata
from .vector_set import VectorSet

ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(0|[1-9][0-9]*)")
_USER = "splice.user."


def to_out_site(vs: VectorSet) -> VectorSet:
    """Re-express a site-``"in"`` set as site ``"out"``: ``in[l]`` -> ``out[l - 1]``.

    Site-``"out"`` sets are returned unchanged. Input of layer 0 (the embeddings) is no layer's
    output and has no llama.cpp equivalent, so a site-``"in"`` set with layer 0 raises ValueError.
    """
    if vs.site == "out":
        return vs
    if vs.site != "in":
        raise ValueError(f"site {vs.site!r} is not a point on the residual stream between layers; "
                         "only sites 'out' and 'in' map to llama.cpp control vectors")
    if 0 in vs.directions:
        raise ValueError("site 'in' of layer 0 (the embedding output) is no layer's output and has "
                         "no llama.cpp control-vector equivalent; drop layer 0 first")
    return VectorSet({layer - 1: v for layer, v in vs.directions.items()}, site="out",
                     model=vs.model, method=vs.method, metadata=dict(vs.metadata), arch=vs.arch)


def export_control_vector(vs: VectorSet, path: str | os.PathLike,
                          model_hint: str | None = None) -> None:
    """Write ``vs`` to ``path`` as a llama.cpp control vector, atomically.

    ``vs`` must have site ``"out"`` and no layer 0, else ValueError before anything is written.
    ``model_hint`` (llama.cpp's architecture name, e.g. ``"llama"``; informational, llama.cpp does
    not read it) defaults to ``vs.arch``; ValueError if neither is set.
    """
    if vs.site != "out":
        hint = (" Site 'in' of layer l is site 'out' of layer l - 1: convert with to_out_site(vs)."
                if vs.site == "in" else "")
        raise ValueError("llama.cpp adds control vectors to layer outputs (site 'out'); this "
                         f"VectorSet has site {vs.site!r}.{hint}")
    if 0 in vs.directions:
        raise ValueError("llama.cpp rejects direction.0: the output of layer 0 cannot carry a "
                         "control vector; drop layer 0 before exporting")
    _check_str_metadata(vs.metadata)
    hint = model_hint if model_hint is not None else vs.arch
    if not hint:
        raise ValueError("a control vector names its model's architecture as llama.cpp does (e.g. 'llama'): "
                         "this VectorSet has no arch; set vs.arch or pass model_hint")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", hint)
            writer.add_uint32(f"{ARCH}.layer_count", len(vs.directions))
            for key, value in (("splice.model", vs.model), ("splice.method", vs.method)):
                if value is not None:
                    writer.add_string(key, value)
            for key, value in vs.metadata.items():
                writer.add_string(_USER + key, value)
            for layer, v in vs.directions.items():
                writer.add_tensor(f"direction.{layer}", v.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def import_control_vector(path: str | os.PathLike,
                          expect_hidden_size: int | None = None) -> VectorSet:
    """Read a llama.cpp control vector as a site-``"out"`` VectorSet; ValueError if it is invalid.

    ``arch`` is the file's model hint, whatever it says (None if empty or absent). ``expect_hidden_size``,
    when given, must equal the directions' size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no control vector file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails on bad input with assorted exception types
        raise ValueError(f"{path} is not a valid GGUF file: {e}") from e
    arch = _string(reader, "general.architecture", path)
    if arch != ARCH:
        raise ValueError(f"{path} is not a control vector: general.architecture is {arch!r}, "
                         f"expected {ARCH!r}")
    directions = {}
    for t in reader.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise ValueError(f"{path}: tensor {t.name!r} is not named direction.<layer>")
        layer = int(m.group(1))
        if layer == 0:
            raise ValueError(f"{path}: direction.0 is invalid (llama.cpp rejects it: control "
                             "vectors start at the output of layer 1)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(f"{path}: tensor {t.name!r} is {t.tensor_type.name} with shape "
                             f"{t.shape.tolist()}, expected 1-D F32")
        v = torch.from_numpy(np.array(t.data, dtype=np.float32))
        size = next(iter(directions.values())).shape[0] if directions else expect_hidden_size
        if size is not None and v.shape[0] != size:
            raise ValueError(f"{path}: tensor {t.name!r} has size {v.shape[0]}, expected {size}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {t.name!r} contains NaN or inf")
        directions[layer] = v
    if not directions:
        raise ValueError(f"{path}: no direction tensors")
    user = {key[len(_USER):]: _string(reader, key, path) for key in reader.fields
            if key.startswith(_USER)}
    hint = _string(reader, f"{ARCH}.model_hint", path)
    return VectorSet(directions, site="out", model=_string(reader, "splice.model", path),
                     method=_string(reader, "splice.method", path), metadata=user, arch=hint or None)


def _string(reader: gguf.GGUFReader, key: str, path: Path) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise ValueError(f"{path}: metadata {key!r} is not a string")
    return field.contents()
