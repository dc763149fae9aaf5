"""``QuantPlan``: the width and group size of every quantized Linear of a model, and its cost in bits.

An entry maps a module name (``"model.layers.3.mlp.down_proj"``, ``"lm_head"``) to ``bits`` (2, 3,
4, 8, or 16 = kept as it is) and ``group_size``. Storage, in bits, of an ``[N, K]`` weight::

    bits < 16:   N · (K · bits + ceil(K / group_size) · 32)     (a float16 scale and zero per group)
    bits = 16:   N · K · 16

so 4-bit with group 64 costs 4 + 32/64 = 4.5 bits per weight. :meth:`QuantPlan.bits_per_weight`
is that total over the planned weights divided by their count (the packed layout also pads each row
to a multiple of 64 codes; :func:`splice.quant.apply.quantize_model` reports the bytes with padding).

*Units*: Linear layers a server fuses into one matmul must share one width and group size: q/k/v
of a layer (unit ``<attn>.qkv``) and gate/up of a layer (unit ``<mlp>.gate_up``). Every other
Linear is its own unit. Plans are checked for that on construction and against a model by
:meth:`QuantPlan.validate_for`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..ops.quant_format import check_bits_group
from ..utils.atomic import write_atomic
from .linear import QuantLinear

DENSE = 16  # "bits" of a module kept as it is
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def check_width(bits: int, group_size: int) -> None:
    """A supported (bits, group_size); bits 16 means dense (group size still validated)."""
    if bits != DENSE:
        check_bits_group(bits, group_size)
    else:
        check_bits_group(8, group_size)


def unit_of(name: str) -> str:
    """The fused unit a module belongs to (``...self_attn.q_proj`` -> ``...self_attn.qkv``)."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{FUSED[leaf]}" if leaf in FUSED else name


def entry_bits(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Storage in bits of an ``[N, K]`` weight at this width (module docstring)."""
    n, k = shape
    if bits == DENSE:
        return n * k * DENSE
    return n * (k * bits + math.ceil(k / group_size) * 32)


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (or already quantized ``QuantLinear``) of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def module_shape(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)


def units(model: nn.Module) -> dict[str, list[str]]:
    """The model's quantization units: unit name -> member module names (in model order)."""
    out: dict[str, list[str]] = {}
    for name in quantizable(model):
        out.setdefault(unit_of(name), []).append(name)
    return out


def model_signature(model: nn.Module) -> dict:
    """The facts a plan or measurement file must agree with: name, type and sizes."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"name": str(getattr(config, "_name_or_path", "") or config.model_type), "model_type": config.model_type,
            "num_layers": int(config.num_hidden_layers), "hidden_size": int(config.hidden_size),
            "intermediate_size": int(getattr(config, "intermediate_size", 0) or 0),
            "vocab_size": int(config.vocab_size)}


@dataclass
class Entry:
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        check_width(self.bits, self.group_size)
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def storage_bits(self) -> int:
        return entry_bits(self.shape, self.bits, self.group_size)


@dataclass
class QuantPlan:
    """Per-module widths (``entries``), optional per-unit ``scores`` and free-form ``info``."""

    entries: dict[str, Entry]
    scores: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entries = {name: e if isinstance(e, Entry) else Entry(**e) for name, e in self.entries.items()}
        if not self.entries:
            raise ValueError("a quantization plan needs at least one module")
        width: dict[str, tuple[str, int, int]] = {}
        for name, e in self.entries.items():
            unit = unit_of(name)
            first = width.setdefault(unit, (name, e.bits, e.group_size))
            if first[1:] != (e.bits, e.group_size):
                raise ValueError(f"{name} ({e.bits}-bit, group {e.group_size}) and {first[0]} ({first[1]}-bit, "
                                 f"group {first[2]}) run as one fused matmul ({unit}) and must share one width")

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def for_units(cls, model: nn.Module, unit_bits: dict[str, int | tuple[int, int]], group_size: int = 64,
                  **kw) -> QuantPlan:
        """A plan giving every module of each unit in ``unit_bits`` that unit's width: ``bits`` (at
        ``group_size``) or ``(bits, group_size)``."""
        members = units(model)
        unknown = sorted(set(unit_bits) - set(members))
        if unknown:
            raise ValueError(f"unknown quantization units {unknown}; the model has e.g. {sorted(members)[:4]}")
        mods = quantizable(model)
        fmt = {u: (b, group_size) if isinstance(b, int) else tuple(b) for u, b in unit_bits.items()}
        entries = {name: Entry(int(fmt[unit][0]), int(fmt[unit][1]), module_shape(mods[name]))
                   for unit in unit_bits for name in members[unit]}
        return cls(entries, **kw)

    @classmethod
    def uniform(cls, model: nn.Module, bits: int, group_size: int = 64) -> QuantPlan:
        """Every Linear of ``model`` (the tied ``lm_head`` included) at one width."""
        return cls.for_units(model, {u: bits for u in units(model)}, group_size)

    # --- accounting ------------------------------------------------------------------------
    def bits_per_weight(self, model: nn.Module | None = None) -> float:
        """Average storage bits per planned weight, scales and zero points included."""
        if model is not None:
            self.validate_for(model)
        total = sum(e.storage_bits for e in self.entries.values())
        return total / sum(e.shape[0] * e.shape[1] for e in self.entries.values())

    def summary(self) -> str:
        counts: dict[tuple[int, int], int] = {}
        for e in self.entries.values():
            key = (e.bits, 0 if e.bits == DENSE else e.group_size)
            counts[key] = counts.get(key, 0) + e.shape[0] * e.shape[1]
        total = sum(counts.values())
        parts = ", ".join(f"{f'{b}-bit g{g}' if b != DENSE else 'dense'}: {100 * c / total:.1f}%"
                          for (b, g), c in sorted(counts.items()))
        return f"{len(self.entries)} modules, {self.bits_per_weight():.3f} bits/weight; weights by format {parts}"

    # --- checks ----------------------------------------------------------------------------
    def validate_for(self, model: nn.Module) -> None:
        """Raise ValueError unless every entry names a Linear of ``model`` of the planned shape and
        each fused unit is planned whole (all its members, one width)."""
        mods = dict(model.named_modules())
        for name, e in self.entries.items():
            m = mods.get(name)
            if m is None:
                raise ValueError(f"plan module {name!r} is not in the model ({type(model).__name__}); "
                                 "was the plan made for another model?")
            if not isinstance(m, (nn.Linear, QuantLinear)):
                raise ValueError(f"plan module {name!r} is a {type(m).__name__}, not an nn.Linear")
            if module_shape(m) != e.shape:
                raise ValueError(f"plan module {name!r} is planned as [out, in] = {list(e.shape)}, the model's is "
                                 f"{list(module_shape(m))}; was the plan made for another model?")
        for unit, names in units(model).items():
            planned = [n for n in names if n in self.entries]
            if planned and len(planned) != len(names):
                missing = sorted(set(names) - set(planned))
                raise ValueError(f"{unit} runs as one fused matmul: plan {missing} too, at the width of {planned[0]}")

    # --- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"entries": {n: {"bits": e.bits, "group_size": e.group_size, "shape": list(e.shape)}
                            for n, e in self.entries.items()},
                "scores": dict(self.scores), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: dict) -> QuantPlan:
        try:
            return cls(data["entries"], dict(data.get("scores", {})), dict(data.get("info", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a quantization plan: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))
