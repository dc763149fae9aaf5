"""``splice bench skip`` report:
perplexity and decode speed per skip fraction and method, and routing (a markdown table, a plot).
"""

from __future__ import annotations

from ..tools.layer_profile import METHODS
from ..tools.plotting import pyplot, save_figure


def table(report: dict) -> str:
    lines = ["| skipped | method | layers | perplexity | decode tok/s (b1) |", "|---:|---|---|---:|---:|"]
    for r in report["static"]:
        lines.append(f"| {r['fraction']:.0%} | {r['method']} | {len(r['layers'])} | {r['ppl']:.2f} | "
                     f"{r['decode_tps_b1']:.1f} |")
    lines += ["", "| router | mean layers skipped | continuation ppl | decode tok/s (b8) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['router']} | {r['mean_skipped']:.2f} | {r['ppl']:.2f} | {r['decode_tps_b8']:.1f} |"
              for r in report["routing"]]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    full = report["static"][0]
    for method in METHODS:
        rows = [full] + [r for r in report["static"] if r["method"] == method]
        xs = [r["fraction"] * 100 for r in rows]
        ax1.plot(xs, [r["ppl"] for r in rows], marker="o", label=method, linestyle="--" if method == "random" else "-")
        ax2.plot(xs, [r["decode_tps_b1"] for r in rows], marker="o", label=method)
    ax1.set_yscale("log")
    ax1.set_xlabel("layers skipped (%)")
    ax1.set_ylabel("WikiText-2 perplexity")
    ax2.set_xlabel("layers skipped (%)")
    ax2.set_ylabel("decode tokens/s (batch 1)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"splice bench skip — {report['model']} ({report['dtype']})")
    save_figure(fig, path)
