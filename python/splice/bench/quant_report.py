"""``splice bench quant`` report:
perplexity, bytes and decode speed per width and allocation method (a markdown table, a plot).
"""

from __future__ import annotations

from ..tools.plotting import pyplot, save_figure
from .step_profile import split_table


def table(report: dict) -> str:
    batches = sorted(int(k.removeprefix("decode_tps_b")) for k in report["rows"][0] if k.startswith("decode_tps_b"))
    lines = ["| model | bits/weight | perplexity | KL to fp32 | model MiB | "
             + " | ".join(f"decode tok/s b{b}" for b in batches) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(batches)]
    for r in report["rows"]:
        if "ppl" not in r:  # a timing-only row (compiled decoding, llama.cpp): quality is its model's
            bpw = ppl = kl = size = "—"
        else:
            bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ("32" if r["name"] == "fp32" else "16")
            ppl, kl, size = f"{r['ppl']:.2f}", f"{r['kl']:.4f}", f"{r['model_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['name']} | {bpw} | {ppl} | {kl} | {size} | "
                     + " | ".join(_value(r, f"decode_tps_b{b}", ".1f") for b in batches) + " |")
    lines += ["", f"Read bandwidth (median of the rounds): {report['read_bandwidth'] / 1e9:.1f} GB/s; fraction of it "
              "each row's decode streams: " + "; ".join(
                  f"{r['name']} " + " / ".join(_value(r, f"bandwidth_fraction_b{b}", ".2f") for b in batches)
                  for r in report["rows"]) + f" (batch {' / '.join(map(str, batches))})"]
    lines += [f"Skipped: {name} ({why})" for name, why in report.get("skipped_rows", {}).items()]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    if "decode_split" in report:
        lines += ["", "Where a decode step goes (torch profiler):", "", split_table(report["decode_split"])]
    return "\n".join(lines)


def _value(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def plot(report: dict, path) -> None:
    """Perplexity against bits per weight: uniform widths, each mixed method, bf16 as a line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bf16 = next(r for r in report["rows"] if r["name"] == "bf16")
    ax.axhline(bf16["ppl"], color="#888888", linestyle=":", label="bf16")
    methods = dict.fromkeys(r["method"] for r in report["rows"] if "method" in r)
    for method in methods:
        rows = sorted((r for r in report["rows"] if r.get("method") == method), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], marker="o", label=method,
                linestyle="--" if method == "random" else "-")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales and zero points included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=8)
    ax.set_title(f"splice bench quant — {report['model']}")
    save_figure(fig, path)
