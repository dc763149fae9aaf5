"""``splice bench attention --method hylra`` report: quality per policy and decode speed (a markdown table)."""

from __future__ import annotations


def table(report: dict) -> str:
    contexts = report["contexts"]
    n = report["long_context"] // 1024
    head = "".join(f" pass-key {c // 1024}K |" for c in contexts)
    lines = [f"| policy | full layers | perplexity |{head} KV MiB at {n}K | decode tok/s {n}K b1 | "
             f"decode tok/s {n}K b4 |", "|---|---|---:|" + "---:|" * (len(contexts) + 3)]
    for r in report["rows"]:
        keys = "".join(f" {r['passkey'][str(c)]:.2f} |" for c in contexts)
        layers = "all" if r["name"] == "full" else " ".join(map(str, r["full_layers"]))
        b1, b4 = r.get("b1"), r.get("b4")
        speed = (f" {b1['kv_bytes'] / 2**20:.0f} | {b1['decode_tps']:.1f} | {b4['decode_tps']:.1f} |" if b1
                 else " — | — | — |")
        lines.append(f"| {r['name']} | {layers} | {r['ppl']:.2f} |{keys}{speed}")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)
