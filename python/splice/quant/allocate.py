"""Choose a format per quantization unit under an average bits-per-weight budget.

A *format* is ``(bits, group_size)``: group size trades scale/zero storage for accuracy, so a unit
may be better off at 4 bits in groups of 32 than at 4 bits in groups of 128, at 0.75 more bits per
weight. Given a cost ``c[u][f]`` for unit ``u`` in format ``f`` and its storage ``S[u][f]`` (bits,
scales and zero points included; see :mod:`splice.quant.plan`), :func:`allocate` solves the
multiple-choice knapsack::

    minimise Σ_u c[u][f_u]   subject to   Σ_u S[u][f_u] ≤ target · Σ_u params[u]

*Solver*: greedy by marginal gain on each unit's lower convex hull of ``(S, c)`` — start every
unit at its smallest width, repeatedly take the hull step with the largest ``Δc / ΔS`` that still
fits (this is the LP relaxation's solution minus at most one fractional step) — then a fill pass
that spends any leftover bits on the single change that lowers the cost most. Summed costs assume
the units' errors add, which the measured single-unit KLs approximate.

Costs come from measurement (:func:`splice.tools.quant_sensitivity.measure`: the KL when the unit alone
is quantized) or, for score-based allocations, from the surrogate ``c[u][b] = score_u · params_u · 4^−b``
(quantization noise power falls 4× per bit; weighting by ``params`` makes the marginal gain per
bit proportional to the score, so higher-scored units get more bits). ``random`` uses seeded
uniform scores: a control at the same budget. ``uniform`` gives every unit the widest single
width within the budget. Only ``measured`` can choose among group sizes (the surrogate does not
model them); the others use one.
"""

from __future__ import annotations

import heapq
import random

from torch import nn

from .plan import DENSE, QuantPlan, check_width, entry_bits, module_shape, quantizable, units

WIDTHS = (2, 3, 4, 8)
METHODS = ("measured", "lim", "zd", "random", "uniform")
Format = tuple[int, int]  # (bits, group_size)


def formats(widths, group_sizes) -> list[Format]:
    """Every ``(bits, group_size)`` pair, validated; 16 (dense) once, whatever the group sizes."""
    out = sorted({(int(b), int(g)) for b in widths for g in group_sizes if int(b) != DENSE})
    if DENSE in {int(b) for b in widths}:
        out.append((DENSE, min(int(g) for g in group_sizes)))
    if not out:
        raise ValueError("no widths to choose from")
    for b, g in out:
        check_width(b, g)
    return out


def unit_shapes(model: nn.Module) -> dict[str, list[tuple[int, int]]]:
    """``[out, in]`` of every member of every unit of ``model``."""
    mods = quantizable(model)
    return {u: [module_shape(mods[n]) for n in names] for u, names in units(model).items()}


def _storage(shapes, fmt: Format) -> int:
    return sum(entry_bits(s, *fmt) for s in shapes)


def _below_floor(target: float, floor_bpw: float, bits: int, group_size: int) -> ValueError:
    return ValueError(f"budget {target} bits/weight is below the smallest width's {floor_bpw:.4f} "
                      f"({bits}-bit, group {group_size}, scales and zero points included)")


def _hull(options: list[tuple[int, float, Format]]) -> list[tuple[int, float, Format]]:
    """Lower convex hull of ``(storage, cost, format)`` points, storage ascending, cost descending."""
    pts: list[tuple[int, float, Format]] = []
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


def allocate(costs: dict[str, dict[Format, float]], shapes: dict[str, list[tuple[int, int]]], target: float,
             choices: list[Format]) -> dict[str, Format]:
    """The format of every unit in ``shapes`` minimising the summed ``costs`` at ≤ ``target`` bits/weight.

    ``costs[u][f]`` is needed for every unit and format in ``choices`` (16, dense, defaults to cost 0).
    """
    if not choices:
        raise ValueError("no formats to choose from")
    for b, g in choices:
        check_width(b, g)
    missing = sorted(set(shapes) - set(costs))
    if missing:
        raise ValueError(f"no costs for units {missing[:4]}{'...' if len(missing) > 4 else ''}")
    params = sum(n * k for s in shapes.values() for n, k in s)
    budget = target * params
    options = {}
    for u, s in shapes.items():
        lacking = [f for f in choices if f[0] != DENSE and f not in costs[u]]
        if lacking:
            raise ValueError(f"no cost for unit {u} in formats (bits, group) {lacking}")
        options[u] = [(_storage(s, f), float(costs[u].get(f, 0.0)), f) for f in choices]
    floor = sum(min(o)[0] for o in options.values())
    if floor > budget:
        smallest = min(choices, key=lambda f: entry_bits((1, 4096), *f))
        raise _below_floor(target, floor / params, *smallest)
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
                choices: list[Format]) -> dict[str, dict[Format, float]]:
    """The surrogate ``score_u · params_u · 4^−b`` (module docstring)."""
    return {u: {f: float(scores[u]) * sum(n * k for n, k in s) * 4.0 ** -f[0] for f in choices}
            for u, s in shapes.items()}


def uniform_width(shapes: dict[str, list[tuple[int, int]]], target: float, group_size: int = 64,
                  widths=WIDTHS) -> int:
    """The widest single width whose bits per weight fit ``target``."""
    params = sum(n * k for s in shapes.values() for n, k in s)
    fits = [b for b in sorted(widths) if sum(_storage(s, (b, group_size)) for s in shapes.values()) <= target * params]
    if not fits:
        low = min(widths)
        raise _below_floor(target, sum(_storage(s, (low, group_size)) for s in shapes.values()) / params, low, group_size)
    return fits[-1]


def plan_for(model: nn.Module, method: str, target: float, measurements=None, group_size: int = 64,
             widths=WIDTHS, seed: int = 0, group_sizes=None) -> QuantPlan:
    """A :class:`QuantPlan` for ``model`` at ≤ ``target`` bits/weight by ``method`` (one of :data:`METHODS`).

    ``measured``, ``lim`` and ``zd`` need ``measurements`` (a :class:`~splice.tools.quant_sensitivity.Measurements`
    for this model; ``measured`` needs its KL costs). ``measured`` chooses among ``group_sizes``
    (default: ``[group_size]``), all of which must have been measured; the others use ``group_size``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; choose one of {METHODS}")
    shapes = unit_shapes(model)
    info = {"method": method, "target_bpw": target, "group_size": group_size}
    if method == "uniform":
        bits = uniform_width(shapes, target, group_size, widths)
        return QuantPlan.for_units(model, {u: (bits, group_size) for u in shapes}, info=info)
    scores: dict[str, float] = {}
    if method == "random":
        rng = random.Random(seed)
        scores = {u: rng.random() for u in shapes}
        info["seed"] = seed
    elif measurements is None:
        raise ValueError(f"allocation method {method!r} needs measurements (splice.tools.quant_sensitivity.measure)")
    else:
        measurements.check_model(model)
        if method in ("lim", "zd"):
            scores = dict(getattr(measurements, method))
    if method == "measured":
        costs = measurements.costs()
        groups = list(group_sizes or [group_size])
        unmeasured = sorted(set(groups) - set(measurements.group_sizes))
        if unmeasured:
            raise ValueError(f"the costs were measured at groups {measurements.group_sizes}, not {unmeasured}")
        measured = set().union(*(c.keys() for c in costs.values()))
        choices = [f for f in formats(widths, groups) if f[0] == DENSE or f in measured]
        info["group_sizes"] = groups
    else:
        choices = formats(widths, [group_size])
        costs = score_costs(scores, shapes, choices)
    unit_formats = allocate(costs, shapes, target, choices)
    return QuantPlan.for_units(model, unit_formats, scores=scores, info=info)
