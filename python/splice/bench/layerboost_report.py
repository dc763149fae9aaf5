"""``splice bench attention --method layerboost`` report: perplexity and KL per policy (a markdown table)."""

from __future__ import annotations

CODES = {"full": "F", "window": "W", "none": "-"}


def table(report: dict) -> str:
    contexts = report["contexts"]
    head = "".join(f" pass-key {n // 1024}K |" for n in contexts)
    lines = [f"| policy | layers (F full, W window, - none) | cost | perplexity | KL |{head}",
             "|---|---|---:|---:|---:|" + "---:|" * len(contexts)]
    for r in report["rows"]:
        keys = "".join(f" {r['passkey'][str(c)]:.2f} |" for c in contexts)
        kl = "—" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['name']} | `{''.join(CODES[c] for c in r['choices'])}` | {r['cost_fraction']:.3f} | "
                     f"{r['ppl']:.2f} | {kl} |{keys}")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)
