"""``splice bench attention --method gemfilter`` report: a markdown table of pass-key accuracy and
long-context cost, full against GemFilter."""

from __future__ import annotations


def table(report: dict) -> str:
    contexts, n = report["contexts"], report["long_context"] // 1024
    head = " | ".join(f"pass-key {c // 1024}K" for c in contexts)
    lines = [f"GemFilter: layer {report['layer']}, keep {report['keep']}, tail {report['tail']}", "",
             f"| setting | {head} | prefill s at {n}K | KV MiB at {n}K | decode tok/s {n}K b1 |",
             "|---|" + "---:|" * (len(contexts) + 3)]
    for r in report["rows"]:
        acc = " | ".join(f"{r['passkey'][str(c)]:.2f}" for c in contexts)
        b1 = r["b1"]
        lines.append(f"| {r['name']} | {acc} | {b1['prefill_s']:.2f} | {b1['kv_bytes'] / 2**20:.1f} | "
                     f"{b1['decode_tps']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)
