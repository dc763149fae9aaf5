"""``splice eval steer`` report: markdown tables (per method and scale; concept at equal fluency; the
conditional methods' gate) and a plot of concept score against perplexity, one line per method."""

from __future__ import annotations

import math
from pathlib import Path

from .plotting import pyplot, save_figure


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _kl(value) -> str:
    return "—" if value is None else f"{value:.2e}"


def table(report: dict) -> str:
    probe = report["probe"]
    base = report["unsteered"]
    budget = report["settings"]["fluency_budget"]
    lines = [f"probe: layer {probe['layer']} site {probe['site']}, held-out accuracy {probe['test_accuracy']:.3f} "
             f"({probe['n_test']} texts; train {probe['train_accuracy']:.3f} on {probe['n_train']})",
             f"unsteered: concept {_f(base['concept'])}, perplexity {_f(base['perplexity'], 2)}, "
             f"repetition {_f(base['repetition'])}, relevance {_f(base['relevance'])}, KL floor {_kl(base['kl'])}", "",
             "| method | scale | concept | perplexity | repetition | relevance | KL to unsteered |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in report["methods"].items():
        for run in entry["runs"]:
            lines.append(f"| {name} | {run['scale']:g} | {_f(run['concept'])} | {_f(run['perplexity'], 2)} | "
                         f"{_f(run['repetition'])} | {_f(run['relevance'])} | {_kl(run['kl'])} |")
    lines += ["", f"| method | concept at equal fluency (perplexity ≤ {budget:g}× unsteered) | scale | perplexity |",
              "|---|---:|---:|---:|"]
    for name, entry in report["methods"].items():
        best = entry["equal_fluency"]
        if best is None:
            lines.append(f"| {name} | — | — | — |")
        else:
            lines.append(f"| {name} | {_f(best['concept'])} | {best['scale']:g} | {_f(best['perplexity'], 2)} |")
    for name, entry in report["methods"].items():
        cond = entry.get("condition")
        if cond is None:
            continue
        lines += ["", f"{name}: gate at layer {cond['layer']}: TPR {cond['tpr']:.3f} on {cond['n_condition_prompts']} "
                  f"held-out condition prompts, FPR {cond['fpr_instructions']:.3f} on {cond['n_instructions']} "
                  f"instructions, {cond['fpr_condition_negatives']:.3f} on {cond['n_condition_negatives']} held-out "
                  f"condition negatives; {cond['decision_mismatches']} decisions differ from the patched runs'", "",
                  "| scale | concept (met) | concept (not met) | perplexity (met) | KL (not met) | "
                  "concept on condition prompts |", "|---:|---:|---:|---:|---:|---:|"]
        for run in cond["runs"]:
            met, not_met = run["met"] or {}, run["not_met"] or {}
            lines.append(f"| {run['scale']:g} | {_f(met.get('concept'))} | {_f(not_met.get('concept'))} | "
                         f"{_f(met.get('perplexity'), 2)} | {_kl(not_met.get('kl'))} | "
                         f"{_f(run['condition_prompts']['concept'])} |")
    return "\n".join(lines)


def _curve(ax, runs, label, **style):
    """One line of (perplexity, concept) points, each labelled by its scale (coinciding points once)."""
    runs = [r for r in runs if r["concept"] is not None and r["perplexity"] is not None]
    (line,) = ax.plot([r["perplexity"] for r in runs], [r["concept"] for r in runs], marker="o", label=label, **style)
    points: dict = {}
    for r in runs:
        points.setdefault((round(r["perplexity"], 6), round(r["concept"], 6)), []).append(f"{r['scale']:g}")
    for (x, y), scales in points.items():
        ax.annotate(",".join(scales), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color=line.get_color())
    return line


def plot(report: dict, path) -> Path:
    """Concept score against perplexity per method on the instructions, points labelled by scale; a
    conditional method also on its held-out condition prompts (dashed); the fluency budget dotted."""
    plt = pyplot()
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = report["unsteered"]
    for name, entry in report["methods"].items():
        line = _curve(ax, entry["runs"], name)
        cond = entry.get("condition")
        if cond is not None:
            runs = [{"scale": r["scale"], **r["condition_prompts"]} for r in cond["runs"]]
            _curve(ax, runs, f"{name} (condition prompts)", linestyle="--", color=line.get_color(), alpha=0.8)
    limit = report["settings"]["fluency_budget"] * base["perplexity"]
    ax.axvline(limit, color="#888888", linestyle=":", linewidth=1,
               label=f"{report['settings']['fluency_budget']:g}× unsteered perplexity")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("perplexity of the response under the unsteered model (log)")
    ax.set_ylabel(f"concept score ({report['settings']['concept']} probe)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    model = Path(str(report["model"])).name if report["model"] else "model"
    ax.set_title(f"splice eval steer — {model}: concept vs fluency, labels are scales", fontsize=9)
    return save_figure(fig, path)
