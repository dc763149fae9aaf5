"""Per-request routers: at prefill they read each request's prompt hidden states and pick the
layers that request skips while decoding (its KV cache for those layers is then dropped).

* :class:`FixedRouter`       the same layers for every request (a static set, decode only);
* :class:`InfluenceRouter`   training-free: skip layer ``l`` for a request when the prompt's Block
  Influence of ``l`` (mean over its tokens of ``1 - cos(x_in, x_out)``) is below a threshold
  calibrated to a target mean skip fraction;
* :class:`LinearRouter`      trained (FiRST-style): per layer ``l`` a logistic probe on the
  prompt's mean RMS-normalised layer input, ``p_l = sigmoid(w_l · (f - mu_l) / sd_l + b_l)``;
  skip when ``p_l > 0.5``. See :mod:`splice.tools.router_training`.

Observing during the prefill uses device tensors only; :meth:`Router.decide` syncs once.
A router file (safetensors) names the model shape it was made for and is refused by another.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from ..runtime.token_state import prompt_token_mask
from ..utils.atomic import write_atomic


class Router(ABC):
    """A routers contract: :meth:`score` one candidate layer from the prefill evidence."""

    kind = "base"

    def __init__(self, layers, num_layers: int, hidden_size: int, model: str = ""):
        self.layers = tuple(sorted({int(l) for l in layers}))
        if not self.layers:
            raise ValueError("a router needs at least one candidate layer")
        if 0 in self.layers:
            raise ValueError("layer 0 cannot be routed: Hugging Face reads positions and masks from its KV cache")
        bad = [l for l in self.layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"router layers {bad} out of range for a {num_layers}-layer model")
        self.layer_set = frozenset(self.layers)
        self.num_layers, self.hidden_size, self.model = num_layers, hidden_size, model
        self.source: str | None = None
        self.reset()

    def reset(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def observe(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Record layer ``layer``'s evidence from the prefill; ``x_*`` are [batch, seq, hidden]."""
        self.device = x_in.device
        self.scores[layer] = self.score(layer, x_in.float(), x_out.float(), prompt_token_mask(prompt_len, x_in.shape[1]))

    @abstractmethod
    def score(self, layer, x_in, x_out, mask) -> torch.Tensor:
        """[batch] scores; a request skips ``layer`` where the score is positive."""

    def decide(self) -> torch.Tensor:
        """[batch, num_layers] bool: the layers each request skips while decoding."""
        if not self.scores:
            raise RuntimeError("the router has observed no prefill")
        batch = next(iter(self.scores.values())).shape[0]
        skip = torch.zeros(batch, self.num_layers, dtype=torch.bool)
        for layer, score in self.scores.items():
            skip[:, layer] = (score > 0).cpu()
        return skip

    def validate_for(self, adapter) -> None:
        if (self.num_layers, self.hidden_size) != (adapter.num_layers, adapter.hidden_size):
            raise ValueError(f"this router was made for a model with {self.num_layers} layers and hidden size "
                             f"{self.hidden_size} ({self.model or 'unnamed'}); the model has {adapter.num_layers} "
                             f"layers and hidden size {adapter.hidden_size}")

    # --- files ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def settings(self) -> dict:
        return {}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"kind": self.kind, "layers": json.dumps(self.layers), "num_layers": str(self.num_layers),
                "hidden_size": str(self.hidden_size), "model": self.model, "settings": json.dumps(self.settings())}
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()} or {"_": torch.zeros(1)}
        write_atomic(path, save(tensors, metadata=meta))
        self.source = str(path)
        return path


class FixedRouter(Router):
    """Every request skips ``layers`` while decoding."""

    kind = "fixed"

    def score(self, layer, x_in, x_out, mask):
        return torch.ones(x_in.shape[0], device=x_in.device)


class InfluenceRouter(Router):
    """Skip where the prompt's Block Influence of the layer is below ``threshold``."""

    kind = "influence"

    def __init__(self, layers, num_layers, hidden_size, threshold: float, model: str = ""):
        super().__init__(layers, num_layers, hidden_size, model)
        self.threshold = float(threshold)

    @staticmethod
    def influence(x_in, x_out, mask) -> torch.Tensor:
        """[batch] mean over prompt tokens of 1 - cos(x_in, x_out)."""
        bi = 1 - F.cosine_similarity(x_in, x_out, dim=-1)
        return (bi * mask).sum(1) / mask.sum(1).clamp_min(1)

    def score(self, layer, x_in, x_out, mask):
        return self.threshold - self.influence(x_in, x_out, mask)

    def settings(self):
        return {"threshold": self.threshold}


class LinearRouter(Router):
    """FiRST-style logistic probe per layer on the prompt's mean normalised layer input."""

    kind = "linear"

    def __init__(self, layers, num_layers, hidden_size, weight, bias, mean, std, model: str = ""):
        super().__init__(layers, num_layers, hidden_size, model)
        n = len(self.layers)
        for name, t, shape in (("weight", weight, (n, hidden_size)), ("bias", bias, (n,)),
                               ("mean", mean, (n, hidden_size)), ("std", std, (n, hidden_size))):
            if tuple(t.shape) != shape:
                raise ValueError(f"router {name} has shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():
                raise ValueError(f"router {name} holds NaN or inf")
        self.weight, self.bias, self.mean, self.std = (t.float() for t in (weight, bias, mean, std))
        self.row = {layer: i for i, layer in enumerate(self.layers)}

    @staticmethod
    def features(x_in, mask) -> torch.Tensor:
        """[batch, hidden] mean over prompt tokens of x / rms(x)."""
        normed = x_in * torch.rsqrt(x_in.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)

    def logit(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        i = self.row[layer]
        w, b, mu, sd = (t.to(features.device) for t in (self.weight[i], self.bias[i], self.mean[i], self.std[i]))
        return ((features - mu) / sd) @ w + b

    def score(self, layer, x_in, x_out, mask):
        return self.logit(layer, self.features(x_in, mask))

    def tensors(self):
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}


KINDS = {cls.kind: cls for cls in (FixedRouter, InfluenceRouter, LinearRouter)}


def load_router(path: str | Path) -> Router:
    """A router from a file written by :meth:`Router.save`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"router file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors router file: {exc}") from exc
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{path} is not a splice router file (kind {meta.get('kind')!r}; known: {sorted(KINDS)})")
    try:
        args = (json.loads(meta["layers"]), int(meta["num_layers"]), int(meta["hidden_size"]))
        settings = json.loads(meta.get("settings", "{}"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: damaged router metadata ({exc})") from exc
    cls = KINDS[meta["kind"]]
    if cls is LinearRouter:
        missing = {"weight", "bias", "mean", "std"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: router tensors {sorted(missing)} are missing")
        router = cls(*args, tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"], model=meta.get("model", ""))
    else:
        router = cls(*args, **settings, model=meta.get("model", ""))
    router.source = str(path)
    return router
