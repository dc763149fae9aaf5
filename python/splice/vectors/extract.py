"""Steering vectors from contrastive prompt pairs.

Pair ``i`` is ``(positive[i], negative[i])``. ``a_l(x)`` is prompt ``x``'s residual stream at layer
``l`` and site ``site`` (``"out"``: output of decoder layer ``l``; ``"in"``: its input), read at the
last non-pad token (``position="last"``) or averaged over the non-pad tokens (``"mean"``). With
``d_i = a_l(positive[i]) - a_l(negative[i])``:

* ``"mean_diff"``: ``v_l = m = mean_i d_i``.
* ``"pca"``: ``v_l = s * |m| * u`` where ``u`` is the top right-singular vector of the *uncentred*
  difference matrix ``D = [d_1; ...; d_n]`` (the unit vector maximising ``sum_i (d_i . u)^2``) and
  ``s = sign(u . m)`` (``+1`` when zero), so ``v_l`` points from negative to positive. The
  differences are not centred: centring (as sklearn's PCA does inside repeng's ``pca_diff``) removes
  the shift shared by all pairs, which is the concept itself, and keeps only the direction along
  which the pairs disagree most. Scaling to ``|m|`` makes a given add-scale move the residual by
  the same amount for both methods.

Hugging Face replaces the last entry of ``hidden_states`` by the final-normed state, so the output
of the last decoder layer is read with a forward hook on that layer; every other activation comes
from ``output_hidden_states=True`` (``"out"`` at ``l``: ``hidden_states[l + 1]``; ``"in"``:
``hidden_states[l]``). Batches are padded by the tokenizer on its own ``padding_side``; position ids
count non-pad tokens only, so left- and right-padded rows match unpadded single-prompt runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .vector_set import VectorSet, gguf_arch

METHODS = ("mean_diff", "pca")
POSITIONS = ("last", "mean")
EXTRACT_SITES = ("in", "out")


def extract_vectors(model, tokenizer, positive: Sequence[str], negative: Sequence[str],
                    method: str = "mean_diff", layers: Sequence[int] | None = None,
                    site: str = "out", batch_size: int = 8, position: str = "last",
                    progress: bool = True) -> VectorSet:
    """Per-layer steering directions from paired prompts (math in the module docstring).

    ``layers=None`` means every decoder layer. All arguments are checked before the model runs.
    """
    n_layers = num_layers(model)
    layers = _check_args(positive, negative, method, layers, n_layers, site, batch_size, position,
                         tokenizer)
    acts = _activations(model, tokenizer, [*positive, *negative], layers, n_layers, site,
                        batch_size, position, progress)
    diffs = acts[:len(positive)] - acts[len(positive):]  # [pairs, layers, hidden]
    reduce = _mean_diff if method == "mean_diff" else _pca_diff
    directions = {layer: reduce(diffs[:, j]) for j, layer in enumerate(layers)}
    return VectorSet(directions, site=site, model=_model_name(model), method=method,
                     metadata={"n_pairs": str(len(positive)), "position": position},
                     arch=gguf_arch(_text_config(model).model_type))


def prompt_activations(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], site: str = "in",
                       position: str = "mean", batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """[len(prompts), len(layers), hidden] float32 activations of each prompt at ``site`` of each
    of ``layers`` (sorted), pooled as ``position`` says (module docstring)."""
    n_layers = num_layers(model)
    layers = _check_args(prompts, prompts, "mean_diff", layers, n_layers, site, batch_size, position, tokenizer)
    return _activations(model, tokenizer, list(prompts), layers, n_layers, site, batch_size, position, progress)


def _model_name(model) -> str | None:
    """The model's hub id, or its directory's name when it was loaded from a local path."""
    name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    return Path(name).name if Path(name).expanduser().is_dir() else str(name)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model) -> int:
    """Decoder layer count: ``num_hidden_layers`` of the (text) config."""
    return int(_text_config(model).num_hidden_layers)


def load_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """Read ``[{"positive": str, "negative": str}, ...]`` from a JSON file."""
    path = Path(path)
    return _parse_pairs(path.read_text(encoding="utf-8"), str(path))


def builtin_pairs(name: str) -> tuple[list[str], list[str]]:
    """Pairs shipped in ``splice/vectors/data/<name>.json``."""
    data = resources.files(__package__).joinpath("data")
    available = sorted(f.name[:-5] for f in data.iterdir() if f.name.endswith(".json"))
    if name not in available:
        raise ValueError(f"no built-in pair set {name!r}; available: {available}")
    return _parse_pairs(data.joinpath(f"{name}.json").read_text(encoding="utf-8"), name)


def _parse_pairs(text: str, source: str) -> tuple[list[str], list[str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: expected a non-empty JSON list of "
                         '{"positive": ..., "negative": ...} objects')
    positive, negative = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str)
                                                 for k in ("positive", "negative")):
            raise ValueError(f"{source}: item {i} must be an object with string fields "
                             f'"positive" and "negative", got {item!r}')
        positive.append(item["positive"])
        negative.append(item["negative"])
    return positive, negative


def _check_args(positive, negative, method, layers, n_layers, site, batch_size, position,
                tokenizer) -> list[int]:
    """Validate everything up front; returns the sorted, de-duplicated layer list."""
    for name, prompts in (("positive", positive), ("negative", negative)):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{name} must be a sequence of strings")
    if len(positive) != len(negative) or not positive:
        raise ValueError(f"positive and negative must be non-empty and of equal length, "
                         f"got {len(positive)} and {len(negative)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "pca" and len(positive) < 2:
        raise ValueError("method 'pca' needs at least 2 pairs")
    if site not in EXTRACT_SITES:
        raise ValueError(f"extraction supports sites {EXTRACT_SITES}, got {site!r}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {POSITIONS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size > 1 and tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token) or use batch_size=1")
    if layers is None:
        return list(range(n_layers))
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int)
           or not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list of ints in [0, {n_layers}), "
                         f"got {list(layers)}")
    return sorted(set(layers))


def _activations(model, tokenizer, prompts, layers, n_layers, site, batch_size, position,
                 progress):
    """[len(prompts), len(layers), hidden] float32 CPU activations (see the module docstring)."""
    offset = 1 if site == "out" else 0
    hook_last = site == "out" and layers[-1] == n_layers - 1
    captured = {}
    handle = None
    if hook_last:
        def keep_output(module, args, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output
        handle = _decoder_layers(model, n_layers)[-1].register_forward_hook(keep_output)
    was_training = model.training
    model.eval()
    device = model.device
    chunks = []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(prompts), batch_size), disable=not progress,
                              desc="extracting", unit="batch"):
                batch = prompts[start:start + batch_size]
                enc = tokenizer(batch, padding=len(batch) > 1, return_tensors="pt")
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                empty = [p for p, n in zip(batch, mask.sum(1).tolist()) if n == 0]
                if empty:
                    raise ValueError(f"prompts tokenize to no tokens: {empty}")
                position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                            output_hidden_states=True, use_cache=False)
                hidden = out.hidden_states
                if len(hidden) != n_layers + 1:
                    raise RuntimeError(f"expected {n_layers + 1} hidden states, got {len(hidden)}")
                states = [captured["out"] if hook_last and l == n_layers - 1 else hidden[l + offset]
                          for l in layers]
                chunks.append(torch.stack([_pool(h, mask, position) for h in states], 1).cpu())
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    return torch.cat(chunks)


def _decoder_layers(model, n_layers: int) -> torch.nn.ModuleList:
    """The decoder's ``nn.ModuleList`` of ``n_layers`` layers (searched under ``get_decoder()``)."""
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    for scope in (root, model):
        for module in scope.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
                return module
    raise ValueError(f"cannot find the model's list of {n_layers} decoder layers to read the "
                     f"output of the last layer; leave layer {n_layers - 1} out or use site='in'")


def _pool(h: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    """[B, T, H] -> [B, H] float32: last non-pad token, or mean over non-pad tokens."""
    h = h.float()
    if position == "last":
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    keep = mask.bool()[..., None]
    return torch.where(keep, h, 0.0).sum(1) / mask.sum(1, keepdim=True).float()


def _mean_diff(diffs: torch.Tensor) -> torch.Tensor:
    return diffs.mean(0)


def _pca_diff(diffs: torch.Tensor) -> torch.Tensor:
    mean = diffs.mean(0)
    u = torch.linalg.svd(diffs.double(), full_matrices=False).Vh[0].float()
    sign = -1.0 if torch.dot(u, mean) < 0 else 1.0
    return sign * mean.norm() * u
