"""Every backend of ``splice::gather_rows`` / ``splice::scatter_rows`` against the reference and
indexing, the reference against indexing, bad arguments, opcheck, and compile checks of the Triton
and CUDA kernels.

Backends are forced with :func:`splice.ops.use_backend`: the C++ CPU kernel, the Triton kernel (on
CPU under ``TRITON_INTERPRET=1``, set in conftest.py; on CUDA when present), the C++ CUDA kernel
(CUDA only) and, for argument errors, the reference. Both ops are exact copies, so results must
equal the reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import (
    ALL_BACKENDS,
    BACKENDS,
    compile_header,
    compile_launcher,
    compile_triton_sm90,
    launcher_opt_in,
    needs_nvcc,
    skip_unless_runs,
)

from splice.ops import gather_rows, scatter_rows, use_backend
from splice.ops.row_select_reference import gather_rows_reference, scatter_rows_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Row shapes: single elements, odd sizes, SmolLM2's hidden size, and [seq, hidden] rows of a prefill.
ROWS = [(1,), (7,), (576,), (1000,), (3, 37)]


def run(device: str, backend: str, fn, *args):
    """``fn(*args)`` (CPU tensors, moved to ``device``) with ``backend`` forced, or skip where it cannot
    run here."""
    skip_unless_runs(device, backend)
    with use_backend(backend):
        return fn(*(a.to(device) for a in args))


def make_x(b: int, row: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, *row, generator=torch.Generator().manual_seed(seed)).to(dtype)


def indices(b: int, kind: str) -> torch.Tensor:
    """Distinct row indices of a batch of ``b``: none, some in scrambled order, or all (permuted)."""
    order = torch.randperm(b, generator=torch.Generator().manual_seed(1))
    return {"none": order[:0], "some": order[: max(1, b // 2)], "all": order}[kind]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=str)
@pytest.mark.parametrize("kind", ["none", "some", "all"])
def test_matches_reference(device, backend, dtype, row, kind):
    """gather_rows(x, idx) and scatter_rows(x, y, idx): equal to the reference and to indexing,
    contiguous, and x and y unchanged."""
    x, idx = make_x(6, row, dtype), indices(6, kind)
    y = make_x(idx.numel(), row, dtype, seed=1)
    x_before, y_before = x.clone(), y.clone()
    gathered = run(device, backend, gather_rows, x, idx)
    assert gathered.dtype == dtype and gathered.shape == (idx.numel(), *row) and gathered.is_contiguous()
    assert torch.equal(gathered.cpu(), gather_rows_reference(x, idx))
    assert torch.equal(gathered.cpu(), x[idx])
    scattered = run(device, backend, scatter_rows, x, y, idx)
    assert scattered.dtype == dtype and scattered.shape == x.shape and scattered.is_contiguous()
    assert torch.equal(scattered.cpu(), scatter_rows_reference(x, y, idx))
    expected = x.clone()
    expected[idx] = y
    assert torch.equal(scattered.cpu(), expected)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)


def test_reference_is_indexing():
    """The reference is ``x[idx]`` and indexed assignment, for scrambled, repeated (gather only) and
    no indices, on a non-contiguous x; its results are new contiguous tensors."""
    x = make_x(6, (2, 9), torch.bfloat16)[:, :, ::2]
    y = make_x(3, (2, 5), torch.bfloat16, seed=1)
    for idx in (torch.tensor([5, 0, 3]), torch.tensor([1, 1, 4, 1]), torch.empty(0, dtype=torch.int64)):
        gathered = gather_rows_reference(x, idx)
        assert torch.equal(gathered, x[idx]) and gathered.is_contiguous()
    idx = torch.tensor([4, 0, 2])
    expected = x.clone()
    expected[idx] = y
    scattered = scatter_rows_reference(x, y, idx)
    assert torch.equal(scattered, expected) and scattered.is_contiguous()
    assert scattered.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gather_repeats_rows(device, backend):
    """gather_rows allows repeated indices (only scatter_rows needs them distinct)."""
    x, idx = make_x(4, (7,), torch.float32), torch.tensor([2, 2, 0, 2])
    assert torch.equal(run(device, backend, gather_rows, x, idx).cpu(), x[idx])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(device, backend, dtype):
    """x as a [B, S, H] view of a [S, B, 2H] tensor (transposed and strided), y transposed too."""
    b, s, h = 5, 3, 37
    x = make_x(s, (b, 2 * h), dtype).transpose(0, 1)[..., ::2]
    y = make_x(s, (2, h), dtype, seed=1).transpose(0, 1)
    idx = torch.tensor([4, 1])
    assert not x.is_contiguous() and not y.is_contiguous()
    x_before = x.clone()
    assert torch.equal(run(device, backend, gather_rows, x, idx).cpu(), x[idx])
    expected = x.clone()
    expected[idx] = y
    assert torch.equal(run(device, backend, scatter_rows, x, y, idx).cpu(), expected)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_batch_and_rows(device, backend):
    """B = 0 (nothing to gather) and rows of zero elements."""
    x, none = torch.empty(0, 4), torch.empty(0, dtype=torch.int64)
    assert run(device, backend, gather_rows, x, none).shape == (0, 4)
    assert run(device, backend, scatter_rows, x, x, none).shape == (0, 4)
    x, idx = torch.empty(3, 0), torch.tensor([2, 0])
    assert run(device, backend, gather_rows, x, idx).shape == (2, 0)
    assert run(device, backend, scatter_rows, x, torch.empty(2, 0), idx).shape == (3, 0)


BAD_ARGS = {  # name: (op, x, y or None, idx, message)
    "idx int32": (gather_rows, torch.zeros(4, 3), None, torch.tensor([0], dtype=torch.int32), "idx must be int64"),
    "idx 2-d": (gather_rows, torch.zeros(4, 3), None, torch.tensor([[0]]), "idx must be int64"),
    "x int": (gather_rows, torch.zeros(4, 3, dtype=torch.int32), None, torch.tensor([0]), "x must be float32"),
    "x 0-d": (gather_rows, torch.tensor(1.0), None, torch.tensor([0]), "0-d"),
    "y dtype": (scatter_rows, torch.zeros(4, 3), torch.zeros(1, 3, dtype=torch.float16), torch.tensor([0]),
                "y must be"),
    "y trailing shape": (scatter_rows, torch.zeros(4, 3), torch.zeros(1, 4), torch.tensor([0]), "y must be"),
    "y rows": (scatter_rows, torch.zeros(4, 3), torch.zeros(2, 3), torch.tensor([0]), "y must be"),
    "y 2-d for 3-d x": (scatter_rows, torch.zeros(4, 2, 3), torch.zeros(1, 6), torch.tensor([0]), "y must be"),
}


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments_raise(device, backend, case):
    op, x, y, idx, message = BAD_ARGS[case]
    args = (x, idx) if y is None else (x, y, idx)
    with pytest.raises(RuntimeError, match=message):
        run(device, backend, op, *args)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("bad", [4, -1])
def test_index_out_of_range_raises(backend, bad):
    """On CPU tensors every backend checks every index on the host before copying, with the C++
    kernels' message. On CUDA the Triton and CUDA kernels check them with a device assert instead
    (Triton's only under TRITON_DEBUG=1), which cannot be run here."""
    x, y, idx = torch.zeros(4, 3), torch.ones(2, 3), torch.tensor([0, bad])
    for op, args in (("gather_rows", (gather_rows, x, idx)), ("scatter_rows", (scatter_rows, x, y, idx))):
        with pytest.raises(IndexError, match=rf"{op}: idx\[1\] = {bad} is out of range for 4 rows"):
            run("cpu", backend, *args)
    assert torch.equal(x, torch.zeros(4, 3))


OPCHECK_CASES = [  # (dtype, x shape, idx, non-contiguous x)
    pytest.param(torch.float32, (6, 3, 37), [5, 0, 2], False, id="fp32-3d"),
    pytest.param(torch.bfloat16, (4, 576), [1, 3], True, id="bf16-strided"),
    pytest.param(torch.float16, (3, 7), [], False, id="fp16-none"),
    pytest.param(torch.float32, (3, 7), [2, 0, 1], False, id="fp32-all"),
]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype,shape,idx,strided", OPCHECK_CASES)
def test_opcheck(device, dtype, shape, idx, strided):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = make_x(shape[0], (*shape[1:-1], 2 * shape[-1]) if strided else shape[1:], dtype)
    x = (x[..., ::2] if strided else x).to(device)
    idx = torch.tensor(idx, dtype=torch.int64, device=device)
    y = make_x(idx.numel(), shape[1:], dtype, seed=1).to(device)
    torch.library.opcheck(torch.ops.splice.gather_rows, (x, idx))
    torch.library.opcheck(torch.ops.splice.scatter_rows, (x, y, idx))


TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels.row_select import MAX_BLOCK, _copy_rows_kernel as kernel

for dt in ("fp32", "bf16", "fp16"):
    for gather in (True, False):
        types = [f"*{dt}", f"*{dt}", "*i64", "i32", "i32", "constexpr", "constexpr"]
        source = ASTSource(kernel, dict(zip(kernel.arg_names, types)), dict(GATHER=gather, BLOCK=MAX_BLOCK))
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernel_compiles_for_sm90():
    """The Triton kernel compiles (not interpreted) to sm_90 cubins for every dtype, gather and scatter;
    in a subprocess because TRITON_INTERPRET is read when the kernel is defined."""
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """row_select_kernel.cuh (no torch headers) compiles warning-free, with and without NDEBUG."""
    compile_header(tmp_path, (
        '#include "row_select_kernel.cuh"\n'
        "cudaError_t copy_rows(const splice::gpu::RowCopyArgs& a, cudaStream_t s) {\n"
        "  return splice::gpu::launch_copy_rows(a, s);\n}\n"
    ), (), ("-DNDEBUG",))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    """csrc/cuda/row_select.cu compiles against the installed torch's headers."""
    compile_launcher(tmp_path, "row_select")
