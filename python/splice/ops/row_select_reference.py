"""Plain-PyTorch reference and argument checks for ``splice::gather_rows`` / ``splice::scatter_rows``.

Contract (``B`` rows of ``x``, each row the ``N`` elements of its trailing dims, ``A`` indices)::

    x    [B, ...]  float32, bfloat16 or float16 (made contiguous if it is not)
    idx  [A]       int64, every value in [0, B)
    y    [A, ...]  x's trailing shape and dtype

    gather_rows(x, idx)     -> out [A, ...],  out[i] = x[idx[i]]
    scatter_rows(x, y, idx) -> out [B, ...],  out = x; out[idx[i]] = y[i]   (x and y unchanged)

Both return new contiguous tensors, exact copies. Precondition of ``scatter_rows``: the values of
``idx`` are distinct (it is not checked; with repeats, which ``y`` row lands is unspecified). The
checks below look at shapes and dtypes only, so they also run on fake tensors. Index values are
checked on the host for CPU tensors (IndexError, :func:`check_row_indices`, the C++ kernels' message),
by a device assert on CUDA (for Triton, only under ``TRITON_DEBUG=1``), so that nothing waits for the
GPU.
"""

from __future__ import annotations

import torch

from .host_checks import first_out_of_range

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gather_rows(x: torch.Tensor, idx: torch.Tensor, op: str = "gather_rows") -> None:
    """Raise RuntimeError, with the C++ kernels' messages, unless ``x`` and ``idx`` fit the contract."""
    torch._check(x.dim() >= 1, lambda: f"{op}: x must be [rows, ...], got a 0-d tensor")
    torch._check(x.dtype in DTYPES, lambda: f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(
        idx.dim() == 1 and idx.dtype == torch.int64,
        lambda: f"{op}: idx must be int64 [indices], got {idx.dtype} {list(idx.shape)}",
    )
    torch._check(idx.device == x.device, lambda: f"{op}: idx must be on {x.device}, got {idx.device}")


def check_scatter_rows(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
    """Raise RuntimeError unless ``x``, ``y`` and ``idx`` fit the contract of ``scatter_rows``."""
    check_gather_rows(x, idx, "scatter_rows")
    torch._check(y.dtype == x.dtype, lambda: f"scatter_rows: y must be {x.dtype} like x, got {y.dtype}")
    torch._check(
        y.dim() == x.dim() and y.shape[0] == idx.shape[0] and y.shape[1:] == x.shape[1:],
        lambda: f"scatter_rows: y must be [indices, ...x's trailing shape] = "
        f"{[idx.shape[0], *x.shape[1:]]}, got {list(y.shape)}",
    )
    torch._check(y.device == x.device, lambda: f"scatter_rows: y must be on {x.device}, got {y.device}")


def check_row_indices(idx: torch.Tensor, rows: int, op: str) -> None:
    """Raise IndexError unless every ``idx`` value lies in ``[0, rows)``; for CPU tensors only (see
    :func:`first_out_of_range`)."""
    i = first_out_of_range(idx, rows)
    if i is not None:
        raise IndexError(f"{op}: idx[{i}] = {int(idx[i])} is out of range for {rows} rows")


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[i] = x[idx[i]]``; see the module docstring."""
    check_gather_rows(x, idx)
    check_row_indices(idx, x.shape[0], "gather_rows")
    return x.contiguous().index_select(0, idx)


def scatter_rows_reference(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` with ``out[idx[i]] = y[i]``; see the module docstring."""
    check_scatter_rows(x, y, idx)
    check_row_indices(idx, x.shape[0], "scatter_rows")
    return x.contiguous().index_copy(0, idx, y)
