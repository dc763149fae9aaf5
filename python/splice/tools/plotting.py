"""Figures written to files: matplotlib on its file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

from ..utils.atomic import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Lay out ``fig``, write it atomically to ``path`` (format from the suffix) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary's name ends in .tmp: name the format
        fig.savefig(tmp, dpi=110, format=path.suffix[1:] or plt.rcParams["savefig.format"])
    plt.close(fig)
    return path
