"""Writing benchmark reports: provenance (command line, machine), JSON, a plain-text table, and a
bar plot of decode throughput."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..tools.plotting import pyplot, save_figure


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the splice source tree this runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """Where a benchmark ran: platform, CPU model and cores, torch's version and threads, splice's commit."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "splice_commit": _git_commit()}


def provenance() -> dict:
    """What every report carries: the command line that ran it and :func:`machine`."""
    return {"command": list(sys.argv), "machine": machine()}


def table(report: dict) -> str:
    """Markdown table: median prefill/decode tokens/s per setting and batch, then the ratios."""
    lines = ["| setting | batch | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|"]
    for name, by_batch in report["results"].items():
        for batch, kinds in by_batch.items():
            lines.append(f"| {name} | {batch[1:]} | {kinds['prefill']['median_tps']:.1f} | "
                         f"{kinds['decode']['median_tps']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def write(report: dict, path: str | Path, plot: bool = True) -> list[Path]:
    """Write ``report`` as JSON at ``path`` and, with ``plot``, a PNG beside it; returns the files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    written = [path]
    if plot:
        written.append(plot_decode(report, path.with_suffix(".png")))
    return written


def plot_decode(report: dict, path: Path) -> Path:
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
