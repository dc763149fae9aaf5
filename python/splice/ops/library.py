"""The ``splice`` torch op library: schemas, backends, and which backend runs.

Every kernel is one op ``torch.ops.splice.<name>`` defined here. Its backends, best first:

* ``cuda``      C++/CUDA kernel from ``splice._C`` (CUDA tensors; built with nvcc),
* ``triton``    Triton kernel from ``splice.kernels`` (CUDA tensors; CPU only under
                ``TRITON_INTERPRET=1``, for tests),
* ``cpp``       C++ CPU kernel from ``splice._C`` (CPU tensors),
* ``reference`` the plain-PyTorch fp32 reference (any device).

The dispatcher picks the compiled kernel for the tensor's device; the reference is registered as
the CompositeExplicitAutograd kernel, so it runs only where nothing better exists, and
:func:`backend_for` says so. ``SPLICE_BACKEND=<name>`` or :func:`use_backend` forces a backend.

Where ``splice._C`` does not import, :func:`extension_error` says why; an extension that is present
but fails to load (a broken build) also warns, while one never built (``SPLICE_NO_EXT=1``) does not.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "cpp", "reference")

_LIB = torch.library.Library("splice", "DEF")


def _load_extension():
    """splice._C, or None with the reason kept in ``_EXT_ERROR`` (and a warning if it exists but fails)."""
    global _EXT_ERROR
    try:
        return importlib.import_module("splice._C")
    except ImportError as e:
        _EXT_ERROR = f"{type(e).__name__}: {e}"
        if not (isinstance(e, ModuleNotFoundError) and e.name == "splice._C"):
            warnings.warn(f"splice._C failed to load; its kernels are off ({_EXT_ERROR})", RuntimeWarning,
                          stacklevel=2)
        return None


@dataclass
class OpSpec:
    """One registered op and the Python-callable forms of its backends."""

    name: str
    reference: Callable
    # the op's one overload, resolved when it is defined: calling it skips the packet's overload
    # resolution (~5 µs a call), and a compiled graph's guards see a value that never changes
    op: object = field(repr=False)
    triton: str | None = None  # "module:function" in splice.kernels, imported on first use
    _triton_fn: Callable | None = field(default=None, repr=False)

    def triton_fn(self) -> Callable:
        if self._triton_fn is None:
            module, fn = self.triton.split(":")
            self._triton_fn = getattr(importlib.import_module(f"splice.kernels.{module}"), fn)
        return self._triton_fn


_OPS: dict[str, OpSpec] = {}
_forced: str | None = None
_ENV_FORCED = os.environ.get("SPLICE_BACKEND") or None


def define(schema: str, reference: Callable, fake: Callable, triton: str | None = None) -> OpSpec:
    """Define ``splice::<schema>`` with its fake kernel and its reference (CompositeExplicitAutograd)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"splice::{name}", fake, lib=_LIB)
    spec = OpSpec(name, reference, getattr(torch.ops.splice, name).default, triton)
    _OPS[name] = spec
    return spec


def load_kernels() -> None:
    """Load splice._C once the schemas exist, so its kernels register with the dispatcher; where it
    has no CUDA kernels, register the Triton kernels for CUDA tensors instead."""
    global _EXT
    _EXT = _load_extension()
    if with_cuda_kernels() or not _triton_importable():
        return
    for spec in _OPS.values():
        if spec.triton is not None:
            _LIB.impl(spec.name, lambda *args, spec=spec: spec.triton_fn()(*args), "CUDA")


_EXT = None
_EXT_ERROR: str | None = None


def extension_loaded() -> bool:
    return _EXT is not None


def extension_error() -> str | None:
    """Why splice._C did not import (the ImportError as text), or None if it did or was not tried yet."""
    return _EXT_ERROR


def with_cuda_kernels() -> bool:
    return _EXT is not None and bool(getattr(_EXT, "with_cuda", False))


def int8_dot_products() -> bool:
    """Whether splice._C's quant_matmul_a8 multiplies int8 codes with int8 dot products (AVX-512 VNNI)."""
    return _EXT is not None and bool(getattr(_EXT, "int8_dot_products", False))


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, best first."""
    kind = torch.device(device).type
    out = []
    if kind == "cuda" and with_cuda_kernels():
        out.append("cuda")
    if _triton_importable() and (kind == "cuda" or _interpreting_triton()):
        out.append("triton")
    if kind == "cpu" and extension_loaded():
        out.append("cpp")
    out.append("reference")
    return out


def backend_for(name: str, device: torch.device | str) -> str:
    """The backend that ``splice.ops.<name>`` runs on ``device``, forced or chosen."""
    if name not in _OPS:
        raise KeyError(f"unknown splice op {name!r}; known: {sorted(_OPS)}")
    available = available_backends(device)
    forced = _forced or _ENV_FORCED
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SPLICE_BACKEND={forced!r}: choose one of {BACKENDS}")
        if forced not in available:
            raise RuntimeError(
                f"backend {forced!r} cannot run on {device}; available: {available}{_missing(forced)}"
            )
        return forced
    if torch.device(device).type == "cpu":  # the interpreter is for tests, never chosen unasked
        available = [b for b in available if b != "triton"]
    return available[0]


def _missing(backend: str) -> str:
    """Why the extension cannot supply ``backend``, if that is the reason, for an error message."""
    if backend in ("cpp", "cuda") and _EXT is None:
        return f" (splice._C did not load: {_EXT_ERROR})"
    if backend == "cuda" and not with_cuda_kernels():
        return " (splice._C was built without CUDA kernels)"
    return ""


def call(spec: OpSpec, *args):
    """Run ``spec`` through the dispatcher, or through the forced backend's callable."""
    forced = _forced or _ENV_FORCED
    if not forced:
        return spec.op(*args)
    backend = backend_for(spec.name, args[0].device)
    if backend == "reference":
        return spec.reference(*args)
    if backend == "triton":
        return spec.triton_fn()(*args)
    return spec.op(*args)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` (one of BACKENDS) for every splice op inside the block; None restores choice."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def op_names() -> list[str]:
    return sorted(_OPS)
