"""What every benchmark report shares: provenance (command line, machine) and the JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..utils.atomic import write_atomic


def _cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc (not Linux): fall back to platform's answer
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
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


def write(report: dict, path: str | Path) -> Path:
    """Write ``report`` as JSON at ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(report, indent=2))
