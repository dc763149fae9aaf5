"""``splice bench serve`` report: output tokens/s per setting and the ratios (a markdown table)."""

from __future__ import annotations


def table(report: dict) -> str:
    lines = ["| setting | output tok/s (median) |", "|---|---:|"]
    lines += [f"| {name} | {r['median_tps']:.1f} |" for name, r in report["results"].items()]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)
