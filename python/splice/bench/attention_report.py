"""``splice bench attention`` report:
pass-key accuracy, perplexity, KV bytes and long-context speed per head map (a markdown table, a plot).
"""

from __future__ import annotations

from ..tools.plotting import pyplot, save_figure


def table(report: dict) -> str:
    contexts = report["contexts"]
    head = " | ".join(f"pass-key {n // 1024}K" for n in contexts)
    n = report["long_context"] // 1024
    lines = [f"| attention | full heads | {head} | perplexity | KV MiB at {n}K | prefill s at {n}K | "
             f"decode tok/s {n}K b1 | decode tok/s {n}K b4 |",
             "|---|---:|" + "---:|" * (len(contexts) + 5)]
    for r in report["rows"]:
        acc = " | ".join(f"{r['passkey'][str(c)]:.2f}" for c in contexts)
        b1, b4 = r.get("b1"), r.get("b4")
        long = (f"{b1['kv_bytes'] / 2**20:.1f} | {b1['prefill_s']:.1f} | {b1['decode_tps']:.1f}" if b1 else "— | — | —")
        long += f" | {b4['decode_tps']:.1f}" if b4 else " | —"
        lines.append(f"| {r['name']} | {r['full_fraction']:.0%} | {acc} | {r['ppl']:.2f} | {long} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Pass-key accuracy against context per configuration, and decode tokens/s at the longest context."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    contexts = report["contexts"]
    for i, r in enumerate(report["rows"]):  # shrinking lines and markers: equal accuracies stay visible
        ax1.plot([c // 1024 for c in contexts], [r["passkey"][str(c)] for c in contexts], marker="osD^v"[i % 5],
                 markersize=10 - 1.5 * i, linewidth=3.5 - 0.6 * i, label=r["name"],
                 linestyle="--" if r["name"].startswith("random") else "-")
    ax1.set_xlabel("context (K tokens)")
    ax1.set_ylabel("pass-key accuracy")
    ax1.legend(fontsize=8)
    timed = [r for r in report["rows"] if "b1" in r]
    width = 0.38
    for i, batch in enumerate(("b1", "b4")):
        shown = [(j, r[batch]["decode_tps"]) for j, r in enumerate(timed) if batch in r]
        ax2.bar([j + (i - 0.5) * width for j, _ in shown], [v for _, v in shown], width, label=f"batch {batch[1:]}")
    ax2.set_xticks(range(len(timed)), [r["name"] for r in timed])
    ax2.set_ylabel(f"decode tokens/s at {report['long_context'] // 1024}K")
    ax2.legend(fontsize=8)
    fig.suptitle(f"splice bench attention — {report['model']} ({report['dtype']})")
    save_figure(fig, path)
