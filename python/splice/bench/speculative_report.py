"""``splice bench speculative`` report: per workload, the chosen draft and tokens/s of each setting (markdown)."""

from __future__ import annotations


def draft_name(row: dict) -> str:
    """The chosen draft in words: skipped layers, prompt lookup, length; or no draft."""
    parts = ([f"skip {len(row['draft_layers'])} layers"] if row["draft_layers"] else []) + (
        [f"prompt lookup (n <= {row['lookup_ngram']})"] if row["lookup_ngram"] else [])
    return f"{' + '.join(parts)}, length {row['draft_len']}" if parts else "no draft (plain decoding)"


def table(report: dict) -> str:
    lines = ["| workload | chosen draft | acceptance | greedy generate tok/s | splice speculative tok/s | "
             "HF prompt lookup tok/s | outputs identical |", "|---|---|---:|---:|---:|---:|---|"]
    for workload, row in report["workloads"].items():
        tps = row["tps"]
        lines.append(f"| {workload} | {draft_name(row)} | {row['acceptance']:.2f} | {tps['greedy']:.1f} | "
                     f"{tps['speculative']:.1f} | {tps['hf_lookup']:.1f} | {row['identical_output']} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)
