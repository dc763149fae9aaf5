"""Fitting per-request routers on calibration text (CPU, minutes on the default model).

Each calibration window is split into a prompt (``prompt_len`` tokens) and a continuation. For
every window and candidate layer ``l`` we measure what routing would cost: the prompt is
prefilled by the full model, then the continuation is scored teacher-forced with ``l`` skipped,
and the cost is the mean KL of its next-token distributions to the full model's. The prefill
also yields the routers' evidence: each layer's prompt Block Influence and mean normalised input.

* :func:`fit_influence_router`: the Block Influence threshold that skips the target fraction of
  (request, layer) pairs on the calibration set.
* :func:`fit_linear_router`: label a pair "skip" when its cost is among the target fraction of
  lowest, fit a logistic probe per layer (L2-regularised), then shift the biases so the mean
  skip fraction on the calibration set is the target: the fraction is the compute side of the
  trade-off, the measured cost decides which requests pay it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..patch import patch
from ..skipping.routers import InfluenceRouter, LinearRouter, Router
from ..skipping.spec import Skip


class _Recorder(Router):
    """Observes the prefill without skipping anything: keeps the evidence the routers use."""

    kind = "recorder"

    def score(self, layer, x_in, x_out, mask):
        self.evidence[layer] = (InfluenceRouter.influence(x_in, x_out, mask), LinearRouter.features(x_in, mask))
        return torch.full((x_in.shape[0],), -1.0, device=x_in.device)

    def reset(self):
        super().reset()
        self.evidence = {}


@dataclass
class RoutingData:
    layers: list[int]
    influence: torch.Tensor  # [windows, candidates]
    features: torch.Tensor  # [windows, candidates, hidden]
    cost: torch.Tensor  # [windows, candidates]: KL of the continuation with that layer skipped


def _continuation_logp(model, ids, cache):
    start = cache.get_seq_length()
    positions = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits
    return F.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def measure_routing_data(model, windows: torch.Tensor, prompt_len: int, layers=None, batch_size: int = 8,
                         progress: bool = True) -> RoutingData:
    """Evidence and skip costs for every window [count, length] and candidate layer."""
    adapter = Adapter(model)
    layers = sorted(layers) if layers is not None else list(range(1, adapter.num_layers))
    if not 0 < prompt_len < windows.shape[1]:
        raise ValueError(f"prompt_len must be inside the window (1..{windows.shape[1] - 1})")
    recorder = _Recorder(layers, adapter.num_layers, adapter.hidden_size)
    influence, features, cost = [], [], []
    with patch(model, router=recorder) as p:
        chunks = windows.split(batch_size)
        with tqdm(total=len(chunks) * len(layers), desc="routing costs", disable=not progress) as bar:
            for chunk in chunks:
                prompt, rest = chunk[:, :prompt_len], chunk[:, prompt_len:]
                cache = model(input_ids=prompt, use_cache=True).past_key_values
                influence.append(torch.stack([recorder.evidence[l][0] for l in layers], 1))
                features.append(torch.stack([recorder.evidence[l][1] for l in layers], 1))
                p.set_router(None)
                full = _continuation_logp(model, rest, copy.deepcopy(cache))
                per_layer = []
                for layer in layers:
                    p.set_skip(Skip([layer]))
                    logp = _continuation_logp(model, rest, copy.deepcopy(cache))
                    per_layer.append(F.kl_div(logp, full, log_target=True, reduction="none").sum(-1).mean(-1))
                    bar.update()
                p.set_skip()
                p.set_router(recorder)
                cost.append(torch.stack(per_layer, 1))
    return RoutingData(layers, torch.cat(influence).cpu(), torch.cat(features).cpu(), torch.cat(cost).cpu())


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the skip fraction must be in (0, 1), got {fraction}")


def fit_influence_router(data: RoutingData, fraction: float, adapter: Adapter) -> InfluenceRouter:
    """Skip a (request, layer) pair when its prompt Block Influence is below the ``fraction`` quantile."""
    _check_fraction(fraction)
    threshold = float(torch.quantile(data.influence.flatten().double(), fraction))
    return InfluenceRouter(data.layers, adapter.num_layers, adapter.hidden_size, threshold, model=adapter.name)


def fit_linear_router(data: RoutingData, fraction: float, adapter: Adapter, steps: int = 300,
                      weight_decay: float = 1e-2, seed: int = 0) -> LinearRouter:
    """Logistic probe per layer predicting "skipping costs little", biased to the target fraction."""
    _check_fraction(fraction)
    torch.manual_seed(seed)
    labels = (data.cost <= torch.quantile(data.cost.flatten().double(), fraction).float()).float()
    mean, std = data.features.mean(0), data.features.std(0) + 1e-3  # [candidates, hidden]
    x = (data.features - mean) / std
    n_layers, hidden = mean.shape
    weight = torch.zeros(n_layers, hidden, requires_grad=True)
    bias = torch.zeros(n_layers, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        logits = (x * weight).sum(-1) + bias
        loss = F.binary_cross_entropy_with_logits(logits, labels) + weight_decay * weight.pow(2).sum() / n_layers
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = (x * weight).sum(-1) + bias
        shift = -float(torch.quantile(logits.flatten().double(), 1 - fraction))
    return LinearRouter(data.layers, adapter.num_layers, adapter.hidden_size, weight.detach(),
                        bias.detach() + shift, mean, std, model=adapter.name)
