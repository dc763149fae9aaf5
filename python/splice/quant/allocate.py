"""Choose a width per quantization unit under an average bits-per-weight budget.

Given a cost ``c[u][b]`` for unit ``u`` at ``b`` bits and its storage ``S[u][b]`` (bits, scales and
zero points included; see :mod:`splice.quant.plan`), :func:`allocate` solves the multiple-choice
knapsack::

    minimise Σ_u c[u][b_u]   subject to   Σ_u S[u][b_u] ≤ target · Σ_u params[u]

*Solver*: greedy by marginal gain on each unit's lower convex hull of ``(S, c)`` — start every
unit at its smallest width, repeatedly take the hull step with the largest ``Δc / ΔS`` that still
fits (this is the LP relaxation's solution minus at most one fractional step) — then a fill pass
that spends any leftover bits on the single change that lowers the cost most. Summed costs assume
the units' errors add, which the measured single-unit KLs approximate.

Costs come from measurement (:func:`splice.quant.sensitivity.measure`: the KL when the unit alone
is quantized) or, for score-based allocations, from the surrogate ``c[u][b] = score_u · params_u · 4^−b``
(quantization noise power falls 4× per bit; weighting by ``params`` makes the marginal gain per
bit proportional to the score, so higher-scored units get more bits). ``random`` uses seeded
uniform scores: a control at the same budget. ``uniform`` gives every unit the widest single
width within the budget.
"""

from __future__ import annotations

import heapq
import random

from torch import nn

from .plan import DENSE, QuantPlan, check_width, entry_bits, module_shape, quantizable, units

WIDTHS = (2, 3, 4, 8)
METHODS = ("measured", "lim", "zd", "random", "uniform")


def unit_shapes(model: nn.Module) -> dict[str, list[tuple[int, int]]]:
    """``[out, in]`` of every member of every unit of ``model``."""
    mods = quantizable(model)
    return {u: [module_shape(mods[n]) for n in names] for u, names in units(model).items()}


def _storage(shapes, bits: int, group_size: int) -> int:
    return sum(entry_bits(s, bits, group_size) for s in shapes)


def _below_floor(target: float, floor_bpw: float, bits: int, group_size: int) -> ValueError:
    return ValueError(f"budget {target} bits/weight is below the smallest width's {floor_bpw:.4f} "
                      f"({bits}-bit, group {group_size}, scales and zero points included)")


def _hull(options: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """Lower convex hull of ``(storage, cost, bits)`` points, storage ascending, cost descending."""
    pts: list[tuple[int, float, int]] = []
    for p in sorted(options):
        if pts and p[0] == pts[-1][0]:
            if p[1] >= pts[-1][1]:
                continue
            pts.pop()
        if pts and p[1] >= pts[-1][1]:
            continue  # more storage for no gain
        while len(pts) >= 2:
            (s0, c0, _), (s1, c1, _) = pts[-2], pts[-1]
            if (c1 - c0) * (p[0] - s0) >= (p[1] - c0) * (s1 - s0):  # pts[-1] on or above the chord
                pts.pop()
            else:
                break
        pts.append(p)
    return pts


def allocate(costs: dict[str, dict[int, float]], shapes: dict[str, list[tuple[int, int]]], target: float,
             group_size: int = 64, widths=WIDTHS) -> dict[str, int]:
    """The width of every unit in ``shapes`` minimising the summed ``costs`` at ≤ ``target`` bits/weight.

    ``costs[u][b]`` is needed for every unit and width (16, dense, defaults to cost 0).
    """
    widths = sorted({int(b) for b in widths})
    if not widths:
        raise ValueError("no widths to choose from")
    for b in widths:
        check_width(b, group_size)
    missing = sorted(set(shapes) - set(costs))
    if missing:
        raise ValueError(f"no costs for units {missing[:4]}{'...' if len(missing) > 4 else ''}")
    params = sum(n * k for s in shapes.values() for n, k in s)
    budget = target * params
    options = {}
    for u, s in shapes.items():
        lacking = [b for b in widths if b != DENSE and b not in costs[u]]
        if lacking:
            raise ValueError(f"no cost for unit {u} at {lacking} bits")
        options[u] = [(_storage(s, b, group_size), float(costs[u].get(b, 0.0)), b) for b in widths]
    floor = sum(min(o)[0] for o in options.values())
    if floor > budget:
        raise _below_floor(target, floor / params, widths[0], group_size)
    hulls = {u: _hull(o) for u, o in options.items()}
    at = {u: 0 for u in hulls}
    used = sum(h[0][0] for h in hulls.values())

    def push(heap, u):
        h, i = hulls[u], at[u]
        if i + 1 < len(h):
            heapq.heappush(heap, (-(h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0]), u))

    heap: list = []
    for u in hulls:
        push(heap, u)
    while heap:
        _, u = heapq.heappop(heap)
        h, i = hulls[u], at[u]
        step = h[i + 1][0] - h[i][0]
        if used + step <= budget:
            used += step
            at[u] = i + 1
            push(heap, u)
    choice = {u: hulls[u][at[u]] for u in hulls}
    while True:  # fill pass: the single change that lowers the cost most and still fits
        best = None
        for u, opts in options.items():
            cur = choice[u]
            for o in opts:
                gain = cur[1] - o[1]
                if gain > 0 and used - cur[0] + o[0] <= budget and (best is None or gain > best[0]):
                    best = (gain, u, o)
        if best is None:
            break
        _, u, o = best
        used += o[0] - choice[u][0]
        choice[u] = o
    return {u: c[2] for u, c in choice.items()}


def score_costs(scores: dict[str, float], shapes: dict[str, list[tuple[int, int]]],
                widths=WIDTHS) -> dict[str, dict[int, float]]:
    """The surrogate ``score_u · params_u · 4^−b`` (module docstring)."""
    return {u: {b: float(scores[u]) * sum(n * k for n, k in s) * 4.0 ** -b for b in widths}
            for u, s in shapes.items()}


def uniform_width(shapes: dict[str, list[tuple[int, int]]], target: float, group_size: int = 64,
                  widths=WIDTHS) -> int:
    """The widest single width whose bits per weight fit ``target``."""
    params = sum(n * k for s in shapes.values() for n, k in s)
    fits = [b for b in sorted(widths) if sum(_storage(s, b, group_size) for s in shapes.values()) <= target * params]
    if not fits:
        low = min(widths)
        raise _below_floor(target, sum(_storage(s, low, group_size) for s in shapes.values()) / params, low, group_size)
    return fits[-1]


def plan_for(model: nn.Module, method: str, target: float, measurements=None, group_size: int = 64,
             widths=WIDTHS, seed: int = 0) -> QuantPlan:
    """A :class:`QuantPlan` for ``model`` at ≤ ``target`` bits/weight by ``method`` (one of :data:`METHODS`).

    ``measured``, ``lim`` and ``zd`` need ``measurements`` (a :class:`~splice.quant.sensitivity.Measurements`
    for this model; ``measured`` needs its KL costs).
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; choose one of {METHODS}")
    shapes = unit_shapes(model)
    info = {"method": method, "target_bpw": target, "group_size": group_size}
    if method == "uniform":
        bits = uniform_width(shapes, target, group_size, widths)
        return QuantPlan.for_units(model, {u: bits for u in shapes}, group_size, info=info)
    scores: dict[str, float] = {}
    if method == "random":
        rng = random.Random(seed)
        scores = {u: rng.random() for u in shapes}
        info["seed"] = seed
    elif measurements is None:
        raise ValueError(f"allocation method {method!r} needs measurements (splice.quant.sensitivity.measure)")
    else:
        measurements.check_model(model)
        if method in ("lim", "zd"):
            scores = dict(getattr(measurements, method))
    if method == "measured":
        costs = measurements.costs()
        if measurements.group_size != group_size:
            raise ValueError(f"the costs were measured at group {measurements.group_size}, not {group_size}")
        widths = [b for b in widths if b == DENSE or all(b in c for c in costs.values())]
    else:
        costs = score_costs(scores, shapes, widths)
    unit_bits = allocate(costs, shapes, target, group_size, widths)
    return QuantPlan.for_units(model, unit_bits, group_size, scores=scores, info=info)
