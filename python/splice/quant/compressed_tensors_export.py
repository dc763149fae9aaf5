"""Export a splice-quantized model to compressed-tensors ``pack-quantized`` (the format vLLM loads).

``export_compressed_tensors(model_or_checkpoint_dir, out_dir)`` writes a Hugging Face directory:
``config.json`` with a ``quantization_config`` (quant_method ``compressed-tensors``, format
``pack-quantized``, one config group per (bits, group size, symmetric) whose targets name the
modules, every dense Linear in ``ignore``), ``model.safetensors``, the generation config and tokenizer.

The conversion is exact: splice's ``w = (q − z)·s`` with codes ``q`` in ``[0, 2**b − 1]`` becomes
compressed-tensors' ``(q_s − z_s)·s`` with ``q_s = q − 2**(b−1)``, ``z_s = z − 2**(b−1)`` (int8,
packed into int32 by compressed-tensors' ``pack_to_int32``) and the same float16 scales. A fused
unit (q/k/v, gate/up) whose zero points all equal ``2**(b−1)`` (``rtn_sym``) is written symmetric
(no zero points); integer zero points (``rtn_int``) are written asymmetric. Refused, before anything
is written: fractional zero points (``rtn``, ``hqq``), an input size that is not a whole number of
groups (compressed-tensors has no partial groups), a model patched by splice.

``config.json`` says ``dtype: float16``, vLLM's default compute dtype for the export: the scales'
own dtype, and vLLM's CPU kernel has no float32 path. Dense tensors are written as they are.

Tied ``lm_head``: a quantized ``lm_head`` is written as its own quantized module with
``tie_word_embeddings: false`` (the embedding stays dense), which is the model splice runs; a dense
tied ``lm_head`` stays tied (not written, listed in ``ignore``).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn

from ..runtime.splice_runtime import ATTRIBUTE
from .checkpoint import PLAN, TENSORS, atomic_directory, load_quantized
from .linear import QuantLinear
from .plan import unit_of

Scheme = tuple[int, int, bool]  # (bits, group_size, symmetric)


def _scheme_of(name: str, m: QuantLinear) -> Scheme:
    """The compressed-tensors scheme ``m`` converts to exactly; ValueError when there is none."""
    if m.in_features % m.group_size:
        raise ValueError(f"{name}: in_features {m.in_features} is not a multiple of group size {m.group_size}; "
                         "compressed-tensors stores whole groups only (choose a group size that divides it)")
    z = m.zeros.to(torch.float32)
    if not bool((z == torch.round(z)).all()):
        raise ValueError(f"{name} has fractional zero points (quantizer rtn or hqq, or gptq with --grid rtn); "
                         "compressed-tensors stores integer zero points: quantize with --quantizer rtn_int "
                         "(asymmetric) or rtn_sym, or gptq with --grid rtn_int or rtn_sym")
    if not bool(((z >= 0) & (z < 2**m.bits)).all()):
        raise ValueError(f"{name} has zero points outside [0, {2**m.bits - 1}], not representable in {m.bits} bits")
    return m.bits, m.group_size, bool((z == 2 ** (m.bits - 1)).all())


def _schemes(model: nn.Module) -> dict[str, Scheme]:
    """Module name -> scheme of every QuantLinear; a fused unit is symmetric only if all its members are."""
    schemes = {name: _scheme_of(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not schemes:
        raise ValueError("the model has no QuantLinear modules; quantize it with splice first")
    asymmetric = {unit_of(n) for n, s in schemes.items() if not s[2]}
    return {n: (b, g, sym and unit_of(n) not in asymmetric) for n, (b, g, sym) in schemes.items()}


def _packed(m: QuantLinear, symmetric: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (local names) of ``m``."""
    offset = 2 ** (m.bits - 1)
    signed = (m.packed().codes().to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(signed, m.bits), "weight_scale": m.scales.clone(),
           "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if not symmetric:
        zero = (m.zeros.to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zero, m.bits, packed_dim=0)
    if m.bias is not None:
        out["bias"] = m.bias.clone()
    return out


def _quantization_config(schemes: dict[str, Scheme], dense: list[str]) -> QuantizationConfig:
    groups: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=gs))
        for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items()))}
    return QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                              ignore=dense)


def convert(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``config.json`` dict of the export (validated; nothing written)."""
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is patched by splice; export it unpatched (remove the patch first)")
    schemes = _schemes(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, (_, _, sym) in schemes.items():
        tensors.update({f"{name}.{k}": v.cpu().contiguous() for k, v in _packed(model.get_submodule(name), sym).items()})
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in schemes or (t.numel() and t.data_ptr() in seen):  # packed above / a tied alias
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = copy.deepcopy(model.config)
    config.dtype = torch.float16  # vLLM's compute dtype: the scales' own (its CPU kernel has no float32 path)
    if "lm_head" in schemes:
        config.tie_word_embeddings = False
    config.quantization_config = _quantization_config(schemes, dense).to_dict()
    return tensors, config


def export_compressed_tensors(source: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None,
                              overwrite: bool = False) -> Path:
    """Write ``source`` (a splice-quantized model, or a :func:`~splice.quant.checkpoint.save_quantized`
    directory, whose tokenizer files are copied) to ``out_dir`` in pack-quantized format, atomically."""
    src_dir = None if isinstance(source, nn.Module) else Path(source)
    model = source if src_dir is None else load_quantized(src_dir)
    tensors, config = convert(model)
    with atomic_directory(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / TENSORS, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for path in [] if src_dir is None else sorted(src_dir.iterdir()):
            if path.is_file() and not (tmp / path.name).exists() and path.name not in (TENSORS, PLAN):
                shutil.copy2(path, tmp / path.name)
    return Path(out_dir)
