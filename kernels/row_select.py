"""Triton kernels of ``splice::gather_rows`` / ``splice::scatter_rows``: one program per (index, block
of a row) copies that block from ``src[s]`` to ``dst[d]``.

The contract is :mod:`splice.ops.row_select_reference`. Index values are checked on the host for CPU
tensors, as the reference checks them; on the device by a device assert (compiled in with
``TRITON_DEBUG=1``), and an out-of-range index never reads or writes memory. Runs on CUDA tensors, and
on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from splice.ops.row_select_reference import check_gather_rows, check_row_indices, check_scatter_rows

MAX_BLOCK = 4096


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, B, N, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """Gather: ``dst[i] = src[idx[i]]``; scatter: ``dst[idx[i]] = src[i]``; ``idx`` values in [0, B)."""
    i = tl.program_id(0).to(tl.int64)
    r = tl.load(idx_ptr + i)
    in_range = (r >= 0) & (r < B)
    tl.device_assert(in_range, "row index out of range")
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(in_range, N, 0)
    if GATHER:
        s, d = r, i
    else:
        s, d = i, r
    tl.store(dst_ptr + d * N + offs, tl.load(src_ptr + s * N + offs, mask=mask), mask=mask)


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, rows: int, gather: bool) -> None:
    """Copy the rows selected by ``idx`` from ``src`` into ``dst`` (both contiguous), ``rows`` the
    row count of the indexed tensor."""
    a, n = idx.shape[0], src.shape[1:].numel()
    if a == 0 or n == 0:
        return
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    device = torch.cuda.device(src.device) if src.is_cuda else contextlib.nullcontext()
    with device:
        _copy_rows_kernel[(a, triton.cdiv(n, block))](
            src, dst, idx.contiguous(), rows, n, GATHER=gather, BLOCK=block, num_warps=4 if block <= 2048 else 8
        )


def gather_rows_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``torch.ops.splice.gather_rows``."""
    check_gather_rows(x, idx)
    check_row_indices(idx, x.shape[0], "gather_rows")
    x = x.contiguous()
    out = x.new_empty((idx.shape[0], *x.shape[1:]))
    _copy_rows(x, out, idx, x.shape[0], gather=True)
    return out


def scatter_rows_triton(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``torch.ops.splice.scatter_rows``."""
    check_scatter_rows(x, y, idx)
    check_row_indices(idx, x.shape[0], "scatter_rows")
    out = x.clone(memory_format=torch.contiguous_format)
    _copy_rows(y.contiguous(), out, idx, out.shape[0], gather=False)
    return out
