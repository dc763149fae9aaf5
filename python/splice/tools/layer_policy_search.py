"""LayerBoost-style search: per layer, full attention, a sliding window (sinks + window) or none,
chosen by measured sensitivity under a cost budget.

1. *Sensitivity* (:func:`sensitivities`): for every layer ``l`` and choice ``c`` in {window,
   none}, the mean ``KL(p_full || p_{l→c})`` of the next-token distributions on calibration
   windows, with layer ``l`` alone changed. Calibration windows must be longer than ``sinks +
   window``, or a window drops no token and measures nothing. Layers before ``l`` are unchanged,
   so each pass starts at layer ``l`` from the hidden states the unpatched model fed it
   (:func:`running_from`): half the layer passes of running the whole model each time.
2. *Cost* (:func:`~splice.hybrid.layer_policy.choice_costs`): attention FLOPs per decoded token at a
   target context (analytical).
3. *Solver* (:func:`solve`): the choices minimising the summed sensitivity subject to
   ``Σ cost ≤ budget · Σ cost(full)``, by an exact dynamic programme over layers that keeps the
   Pareto frontier of (cost, loss) partial policies.
4. *Verification*: the chosen policy's joint perplexity and KL on held-out windows.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..adapters.architecture import Adapter
from ..hybrid.layer_policy import CHOICES, LayerPolicy, choice_costs
from ..patch import patch
from .calibration_text import evaluate, log_probs

CHANGED = ("window", "none")


def solve(costs: list[dict[str, float]], losses: list[dict[str, float]], budget: float) -> tuple[list[str], float, float]:
    """``(choices, loss, cost)``: one choice per layer minimising ``Σ losses[l][c]`` subject to
    ``Σ costs[l][c] ≤ budget`` (absolute). Exact: a partial policy costing no less and losing no
    less than another is dropped, since every completion of it is at least as good from the other.
    Among equal losses the cheaper policy wins."""
    if len(costs) != len(losses) or not costs:
        raise ValueError(f"costs and losses need one entry per layer, got {len(costs)} and {len(losses)}")
    for name, table in (("costs", costs), ("losses", losses)):
        for layer, row in enumerate(table):
            if set(row) != set(CHOICES):
                raise ValueError(f"{name}[{layer}] must give {CHOICES}, got {sorted(row)}")
            bad = {c: v for c, v in row.items() if not (math.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(f"{name}[{layer}] must be finite and >= 0, got {bad}")
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    frontier: list[tuple[float, float, tuple[str, ...]]] = [(0.0, 0.0, ())]
    for cost_row, loss_row in zip(costs, losses):
        grown = sorted(((c + cost_row[ch], s + loss_row[ch], picks + (ch,)) for c, s, picks in frontier
                        for ch in CHOICES if c + cost_row[ch] <= budget), key=lambda e: (e[0], e[1]))
        frontier = []
        for entry in grown:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
        if not frontier:
            cheapest = sum(min(row.values()) for row in costs)
            raise ValueError(f"budget {budget} is below the cheapest policy's cost {cheapest}")
    cost, loss, picks = min(frontier, key=lambda e: (e[1], e[0]))
    return list(picks), loss, cost


def check_calibration(windows: torch.Tensor, sinks: int, window: int) -> None:
    if windows.dim() != 2 or windows.shape[1] <= sinks + window:
        raise ValueError(f"calibration windows [count, length] must be longer than sinks + window = "
                         f"{sinks + window} tokens (a shorter window drops nothing), got {list(windows.shape)}")


@torch.inference_mode()
def policy_quality(model, policy: LayerPolicy | None, windows: torch.Tensor, reference: torch.Tensor | None = None,
                   batch_size: int = 4) -> tuple[float, float | None]:
    """``(perplexity, KL to reference)`` of ``model`` under ``policy`` (None: unpatched)."""
    if policy is None:
        return evaluate(model, windows, reference, batch_size)
    with patch(model, policy=policy):
        return evaluate(model, windows, reference, batch_size)


@torch.inference_mode()
def layer_inputs(model, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The hidden states entering every decoder layer, [count, length, hidden] each."""
    adapter = Adapter(model)
    seen: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_layers)]

    def record(idx):
        def hook(module, args, kwargs):
            seen[idx].append((args[0] if args else kwargs["hidden_states"]).detach())
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    try:
        for chunk in windows.split(batch_size):
            model(input_ids=chunk, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


@contextmanager
def running_from(model, start: int):
    """While inside, ``model`` runs only its decoder layers ``start..`` (give it ``inputs_embeds``: the
    hidden states entering layer ``start``); the layer list is put back on leaving."""
    base = getattr(model, "model", model)
    every = base.layers
    base.layers = nn.ModuleList(list(every)[start:])
    try:
        yield
    finally:
        base.layers = every


@torch.inference_mode()
def kl_from(model, start: int, inputs: torch.Tensor, reference: torch.Tensor, batch_size: int = 4) -> float:
    """Mean ``KL(reference || model)`` over the next-token positions, running layers ``start..`` on
    ``inputs`` (the hidden states entering layer ``start``, from :func:`layer_inputs`)."""
    total, count = 0.0, 0
    with running_from(model, start):
        for chunk, ref in zip(inputs.split(batch_size), reference.split(batch_size)):
            logp = F.log_softmax(model(inputs_embeds=chunk, use_cache=False).logits[:, :-1].float(), dim=-1)
            total += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
            count += ref.shape[0] * ref.shape[1]
    return total / count


def sensitivities(model, windows: torch.Tensor, sinks: int = 4, window: int = 256, batch_size: int = 4,
                  progress: bool = True) -> dict[str, list[float]]:
    """``{"window": [KL per layer], "none": [...], "full": [0, ...]}`` (module docstring, step 1)."""
    adapter = Adapter(model)
    check_calibration(windows, sinks, window)
    reference = log_probs(model, windows, batch_size)
    inputs = layer_inputs(model, windows, batch_size)
    out = {"full": [0.0] * adapter.num_layers, "window": [], "none": []}
    steps = [(layer, choice) for layer in range(adapter.num_layers) for choice in CHANGED]
    for layer, choice in tqdm(steps, desc="layer sensitivity", disable=not progress):
        choices = ["full"] * adapter.num_layers
        choices[layer] = choice
        with patch(model, policy=LayerPolicy.from_choices(choices, sinks, window, adapter.name)):
            out[choice].append(max(0.0, kl_from(model, layer, inputs[layer], reference, batch_size)))
    return out


def search_policy(model, calibration: torch.Tensor, budget: float, context: int = 8192, sinks: int = 4,
                  window: int = 256, held_out: torch.Tensor | None = None, batch_size: int = 4,
                  progress: bool = True, measured: dict[str, list[float]] | None = None) -> LayerPolicy:
    """The policy (module docstring) for ``budget``: the fraction of the full model's attention FLOPs
    per token at ``context`` that the policy may spend. Its ``report`` holds the measurements and,
    with ``held_out`` windows, the verification. ``measured``: sensitivities already measured on
    ``calibration`` with these ``sinks`` and ``window`` (e.g. an earlier policy's
    ``report["sensitivity_kl"]``), reused instead of measured again."""
    if not (isinstance(budget, (int, float)) and 0 <= budget <= 1):
        raise ValueError(f"budget must be a fraction of the full attention cost in [0, 1], got {budget!r}")
    adapter = Adapter(model)
    costs = choice_costs(adapter, context, sinks, window)
    LayerPolicy(adapter.num_layers, sinks=sinks, window=window).validate_for(adapter)
    check_calibration(calibration, sinks, window)
    if held_out is not None:
        check_calibration(held_out, sinks, window)
    if measured is None:
        measured = sensitivities(model, calibration, sinks, window, batch_size, progress)
    elif any(len(measured.get(c, ())) != adapter.num_layers for c in CHOICES):
        raise ValueError(f"measured sensitivities need {CHOICES}, one value per layer ({adapter.num_layers})")
    full_cost = sum(costs["full"] for _ in range(adapter.num_layers))  # summed as the solver sums
    choices, loss, cost = solve([costs] * adapter.num_layers,
                                [{c: measured[c][l] for c in CHOICES} for l in range(adapter.num_layers)],
                                budget * full_cost)
    report = {"budget": budget, "context": context, "cost_model": "analytical attention FLOPs per decoded token",
              "choice_costs": costs, "cost_fraction": cost / full_cost, "predicted_kl": loss,
              "sensitivity_kl": measured, "calibration": {"windows": calibration.shape[0],
                                                          "length": calibration.shape[1]}}
    policy = LayerPolicy.from_choices(choices, sinks, window, adapter.name, report)
    if held_out is not None:
        report["held_out"] = verify(model, policy, held_out, batch_size)
    return policy


def verify(model, policy: LayerPolicy, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Perplexity of the unpatched model and of ``policy`` on ``windows``, and the policy's KL."""
    reference = log_probs(model, windows, batch_size)
    full_ppl = policy_quality(model, None, windows, None, batch_size)[0]
    ppl, kl = policy_quality(model, policy, windows, reference, batch_size)
    return {"windows": windows.shape[0], "length": windows.shape[1], "full_ppl": full_ppl, "ppl": ppl,
            "ppl_ratio": ppl / full_ppl, "kl": kl}


def tiered_like(policy: LayerPolicy) -> LayerPolicy:
    """LayerBoost's own rule at ``policy``'s cost: rank layers by the KL of removing their attention
    (the paper's sensitivity); the least sensitive run none, the next window, the rest full, in the
    counts ``policy`` has. Needs the sensitivities in ``policy.report``."""
    try:
        removal = policy.report["sensitivity_kl"]["none"]
    except (TypeError, KeyError) as exc:
        raise ValueError("the policy holds no measured sensitivities (make it with search_policy)") from exc
    order = sorted(range(policy.num_layers), key=lambda l: removal[l])
    none, window = len(policy.none_layers), len(policy.window_layers)
    return LayerPolicy(policy.num_layers, tuple(order[none:none + window]), tuple(order[:none]), policy.sinks,
                       policy.window, policy.model)
