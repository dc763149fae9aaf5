"""Quantized checkpoints: ``save_quantized(model, plan, dir)`` and ``load_quantized(dir)``.

A checkpoint directory holds::

    model.safetensors   every tensor of the model: each QuantLinear's packed qweight / scales /
                        zeros (/ bias), every other parameter and buffer (non-persistent buffers
                        such as rotary frequencies included), each shared tensor once
    plan.json           {"format", "plan", "files": {name: sha256}, "aliases": {name: stored name}}
    config.json, ...    the Hugging Face config (and generation config, tokenizer when given)

It is written to a temporary directory beside the target and renamed into place, so a failure
leaves no partial directory. Loading verifies every file's sha256 and every tensor's shape,
builds the model's skeleton on the meta device, puts QuantLinear modules holding the packed
buffers in place of the planned Linear layers and assigns every other tensor: no dense copy of a
quantized weight is ever materialised.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..ops.quant_packing import PackedWeight
from ..runtime.splice_runtime import ATTRIBUTE
from ..utils.atomic import atomic_directory
from .apply import set_module
from .linear import QuantLinear
from .plan import DENSE, QuantPlan, quantizable

FORMAT = "splice-quantized/1"
TENSORS = "model.safetensors"
PLAN = "plan.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_quantized(model: nn.Module, plan: QuantPlan) -> None:
    plan.validate_for(model)
    mods = quantizable(model)
    for name, e in plan.entries.items():
        m = mods[name]
        if e.bits == DENSE:
            if not isinstance(m, nn.Linear):
                raise ValueError(f"{name} is planned dense but is a {type(m).__name__}")
        elif not (isinstance(m, QuantLinear) and (m.bits, m.group_size) == (e.bits, e.group_size)):
            raise ValueError(f"{name} is planned at {e.bits} bits, group {e.group_size}, but the model holds "
                             f"{m}; quantize it with splice.quant.apply.quantize_model(model, plan) first")


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer by name (shared ones once), and ``{alias: stored name}``."""
    tensors, aliases, seen = {}, {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, plan: QuantPlan, directory: str | os.PathLike, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Write the quantized ``model`` (quantized with ``plan``) to ``directory``, atomically."""
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is patched by splice; save it unpatched (remove the patch first)")
    _check_quantized(model, plan)
    with atomic_directory(directory, overwrite) as tmp:
        tensors, aliases = _tensors(model)
        (tmp / TENSORS).write_bytes(save({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"}))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {"format": FORMAT, "plan": plan.to_dict(), "files": {TENSORS: _sha256(tmp / TENSORS)},
                    "aliases": aliases}
        (tmp / PLAN).write_text(json.dumps(manifest, indent=1))
    return Path(directory)


def read_manifest(directory: str | os.PathLike) -> tuple[dict, QuantPlan]:
    """``plan.json`` of a checkpoint, its files verified against their recorded sha256."""
    directory = Path(directory)
    if not (directory / PLAN).is_file():
        raise FileNotFoundError(f"{directory} is not a splice quantized checkpoint (no {PLAN})")
    try:
        manifest = json.loads((directory / PLAN).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / PLAN} is corrupt: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory / PLAN} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing")
        if _sha256(path) != digest:
            raise ValueError(f"checkpoint file {path} is truncated or modified (sha256 differs from {PLAN})")
    return manifest, QuantPlan.from_dict(manifest["plan"])


def _place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` where the meta skeleton has parameter or buffer ``name`` (same shape; its own dtype)."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
    if current is None and leaf not in owner._buffers:
        raise ValueError(f"checkpoint tensor {name!r} is not a parameter or buffer of the model")
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {name!r} is {list(tensor.shape)}; the model expects {list(current.shape)}")
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved by :func:`save_quantized`, in eval mode on ``device`` (tokenizer: load it
    from the same directory with ``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    manifest, plan = read_manifest(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan.validate_for(model)
    state = load_file(directory / TENSORS, device=str(device))
    for name, e in plan.entries.items():
        if e.bits == DENSE:
            continue
        try:
            packed = PackedWeight(state.pop(f"{name}.qweight"), state.pop(f"{name}.scales"),
                                  state.pop(f"{name}.zeros"), e.bits, e.group_size, e.shape)
        except KeyError as exc:
            raise ValueError(f"checkpoint lacks tensor {exc.args[0]!r} of quantized module {name}") from exc
        set_module(model, name, QuantLinear(packed, state.pop(f"{name}.bias", None)))
    for name, tensor in state.items():
        _place(model, name, tensor)
    for alias, stored in manifest.get("aliases", {}).items():
        parent, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        src_parent, _, src_leaf = stored.rpartition(".")
        src_owner = model.get_submodule(src_parent) if src_parent else model
        source = src_owner._parameters.get(src_leaf, src_owner._buffers.get(src_leaf))
        (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = source
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"checkpoint lacks tensors {left[:4]}{'...' if len(left) > 4 else ''}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    return model.eval()
