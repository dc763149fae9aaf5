"""``splice::gather_rows`` / ``splice::scatter_rows``: copy rows of a batch out to a subset and back
(contract in row_select_reference). A layer that runs on only some rows of a batch gathers them,
runs, and scatters its results back."""

from __future__ import annotations

import torch

from . import library
from .row_select_reference import (
    check_gather_rows,
    check_scatter_rows,
    gather_rows_reference,
    scatter_rows_reference,
)


def _gather_fake(x, idx):
    check_gather_rows(x, idx)
    return x.new_empty((idx.shape[0], *x.shape[1:]))


def _scatter_fake(x, y, idx):
    check_scatter_rows(x, y, idx)
    return x.new_empty(x.shape)


GATHER = library.define(
    "gather_rows(Tensor x, Tensor idx) -> Tensor", gather_rows_reference, _gather_fake,
    triton="row_select:gather_rows_triton",
)
SCATTER = library.define(
    "scatter_rows(Tensor x, Tensor y, Tensor idx) -> Tensor", scatter_rows_reference, _scatter_fake,
    triton="row_select:scatter_rows_triton",
)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[idx]`` as a new contiguous [A, ...] tensor."""
    return library.call(GATHER, x, idx)


def scatter_rows(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with row ``idx[i]`` replaced by ``y[i]`` (``idx`` distinct); inputs unchanged."""
    return library.call(SCATTER, x, y, idx)
