"""``splice bench steer`` report:
prefill and decode tokens/s per setting and batch (a markdown table, a plot).
"""

from __future__ import annotations

from pathlib import Path

from ..tools.plotting import pyplot, save_figure
from .step_profile import split_table


def table(report: dict) -> str:
    """Markdown table: median prefill/decode tokens/s per setting and batch, then the ratios."""
    lines = ["| setting | batch | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|"]
    for name, by_batch in report["results"].items():
        for batch, kinds in by_batch.items():
            prefill = f"{kinds['prefill']['median_tps']:.1f}" if "prefill" in kinds else "— (eager)"
            lines.append(f"| {name} | {batch[1:]} | {prefill} | {kinds['decode']['median_tps']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    if "decode_split" in report:
        lines += ["", "Where a decode step goes (torch profiler):", "", split_table(report["decode_split"])]
    return "\n".join(lines)


def plot(report: dict, path) -> Path:
    """Decode tokens/s per setting, one panel per batch size."""
    plt = pyplot()

    names = list(report["results"])
    batches = sorted({b for by_batch in report["results"].values() for b in by_batch}, key=lambda b: int(b[1:]))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        shown = [n for n in names if batch in report["results"][n]]
        values = [report["results"][n][batch]["decode"]["median_tps"] for n in shown]
        ax.bar(shown, values, color=["#888888" if n == "unpatched" else "#3b7dd8" for n in shown])
        ax.set_title(f"decode, batch {batch[1:]}")
        ax.set_ylabel("tokens/s (median)")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"splice bench {report['benchmark']} — {report['model']} ({report['dtype']})")
    return save_figure(fig, path)
