"""The steering one request asks for, read from ``vllm_xargs`` (vLLM's ``SamplingParams.extra_args``).

``splice_vector`` is a name or a list of names (applied in that order); ``splice_scale`` a number
or a list of numbers of the same length (absent: each vector's scale from the recipe);
``splice_version``, ``splice_salt``, ``splice_token`` and ``splice_whole_prompt`` are written by the
middleware (see :mod:`.middleware`; a client's values are replaced): the content version of each
vector (``""`` for the recipe's own, a hash of the files for one registered at run time,
:mod:`.registry`), and whether a vector's gate is decided at prefill, so the request must not read
the prefix cache (:mod:`.prefill_decisions`). Any other ``splice_*`` key is refused. Errors are
:class:`SteeringParamError`, whose message names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

VECTOR, SCALE, VERSION = "splice_vector", "splice_scale", "splice_version"
SALT, TOKEN, WHOLE_PROMPT = "splice_salt", "splice_token", "splice_whole_prompt"
FIELDS = (VECTOR, SCALE, VERSION, SALT, TOKEN, WHOLE_PROMPT)
SERVER_FIELDS = (VERSION, WHOLE_PROMPT)  # set from the server's own records, never from the client
PREFIX = "splice_"


class SteeringParamError(ValueError):
    """A malformed steering request; ``field`` is the offending ``vllm_xargs`` key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"vllm_xargs.{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RequestSteering:
    """Ordered ``(name, scale)`` pairs one request is steered with, and each vector's content version."""

    items: tuple[tuple[str, float], ...]
    versions: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A digest of the configuration (names, scales, contents): equal for equal steering."""
        return hashlib.sha256(json.dumps([self.items, self.versions]).encode()).hexdigest()[:32]

    def with_versions(self, versions) -> "RequestSteering":
        return RequestSteering(self.items, tuple(versions))

    def to_xargs(self) -> dict:
        """The canonical ``vllm_xargs`` form (explicit lists)."""
        return {VECTOR: [n for n, _ in self.items], SCALE: [s for _, s in self.items], VERSION: list(self.versions)}


def wants_steering(extra_args) -> bool:
    return isinstance(extra_args, dict) and any(str(k).startswith(PREFIX) for k in extra_args)


def _as_list(value, field: str) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SteeringParamError(field, "must not be an empty list")
    return items


def _scale(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteeringParamError(field, f"must be a finite number, got {value!r}")
    return float(value)


def parse(extra_args, scales: dict[str, float] | None = None) -> RequestSteering | None:
    """The steering in ``extra_args`` (None when it has no ``splice_*`` key). With ``scales``
    (the registered vectors' default scales) names are checked and missing scales filled in."""
    if not wants_steering(extra_args):
        return None
    unknown = sorted(k for k in extra_args if str(k).startswith(PREFIX) and k not in FIELDS)
    if unknown:
        raise SteeringParamError(unknown[0], f"unknown splice field; use {VECTOR} and {SCALE}")
    if extra_args.get(VECTOR) is None:
        raise SteeringParamError(VECTOR, "is required (a vector name or a list of names)")
    names = _as_list(extra_args[VECTOR], VECTOR)
    if not all(isinstance(n, str) and n for n in names):
        raise SteeringParamError(VECTOR, f"must be a name or a list of names, got {extra_args[VECTOR]!r}")
    if len(set(names)) != len(names):
        raise SteeringParamError(VECTOR, f"lists a vector twice: {names}")
    if scales is not None:
        missing = [n for n in names if n not in scales]
        if missing:
            raise SteeringParamError(VECTOR, f"unknown vector {missing[0]!r}; registered: {sorted(scales)}")
    raw = extra_args.get(SCALE)
    if raw is None:
        if scales is None:
            raise SteeringParamError(SCALE, "is required here (no recipe to take default scales from)")
        values = [scales[n] for n in names]
    else:
        values = [_scale(v, SCALE) for v in _as_list(raw, SCALE)]
        if len(values) != len(names):
            raise SteeringParamError(SCALE, f"has {len(values)} values for {len(names)} vectors")
    return RequestSteering(tuple(zip(names, values)), _versions(extra_args.get(VERSION), len(names)))


def _versions(value, count: int) -> tuple[str, ...]:
    if value is None:
        return ("",) * count
    if not (isinstance(value, list) and len(value) == count and all(isinstance(v, str) for v in value)):
        raise SteeringParamError(VERSION, f"must be a list of {count} strings, got {value!r}")
    return tuple(value)
