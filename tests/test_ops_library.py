"""splice.ops.library: the C++ extension is the CPU backend of every op wherever it was built, a failed
import is kept and reported, and a forced backend that cannot run says why."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_checks import extension_expected

import splice
from splice.ops import backend_for, fused_steer, library, use_backend


@pytest.mark.skipif(not extension_expected(), reason="built without the extension (SPLICE_NO_EXT=1)")
def test_extension_runs_every_op_on_cpu(monkeypatch):
    """Unless the build skipped it, splice._C imported and its C++ kernels are what runs on CPU."""
    monkeypatch.setattr(library, "_ENV_FORCED", None)  # a SPLICE_BACKEND in the environment would hide it
    assert library.extension_loaded(), f"splice._C did not load: {library.extension_error()}"
    # not an extension found elsewhere (an editable install of another checkout): the one built here
    assert Path(library._EXT.__file__).parent == Path(splice.__file__).parent, library._EXT.__file__
    chosen = {name: backend_for(name, "cpu") for name in library.op_names()}
    assert chosen == dict.fromkeys(library.op_names(), "cpp")


@pytest.mark.parametrize("error,warns", [
    pytest.param(ImportError("_C.so: undefined symbol: _ZN3c10"), True, id="broken"),
    pytest.param(ModuleNotFoundError("No module named 'splice._C'", name="splice._C"), False, id="absent"),
])
def test_failed_import_is_kept_and_a_broken_build_warns(monkeypatch, error, warns):
    """Either failure is kept for extension_error(); an extension that exists but fails to load warns,
    one that was never built (SPLICE_NO_EXT=1) does not."""

    def import_module(name):
        raise error

    monkeypatch.setattr(library.importlib, "import_module", import_module)
    monkeypatch.setattr(library, "_EXT_ERROR", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert library._load_extension() is None
    text = f"{type(error).__name__}: {error}"
    assert library.extension_error() == text
    expected = [f"splice._C failed to load; its kernels are off ({text})"] if warns else []
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == expected


def test_forced_backend_without_extension_says_why(monkeypatch):
    """Forcing cpp without splice._C raises before running anything, naming the import error; forcing
    cuda with an extension built without CUDA kernels says that."""
    monkeypatch.setattr(library, "_EXT", None)
    monkeypatch.setattr(library, "_EXT_ERROR", "ImportError: _C.so: undefined symbol: _ZN3c10")
    args = (torch.randn(2, 8), None, None, None, torch.zeros(2, dtype=torch.int32), torch.arange(2),
            torch.zeros(2, dtype=torch.bool))
    message = r"backend 'cpp' cannot run on cpu; .*\(splice._C did not load: ImportError: _C.so: undefined symbol"
    with use_backend("cpp"), pytest.raises(RuntimeError, match=message):
        fused_steer(*args)
    monkeypatch.setattr(library, "_EXT", SimpleNamespace(with_cuda=False))
    with use_backend("cuda"), pytest.raises(RuntimeError, match=r"\(splice._C was built without CUDA kernels\)"):
        backend_for("fused_steer", "cuda")


def test_ops_trace_whole_under_torch_compile():
    """vLLM compiles the served model with fullgraph: a splice op called through library.call must not
    break the graph, nor make the second call recompile (a lazily resolved overload did, once)."""
    from splice.ops import quant_matmul
    from splice.ops.quant_packing import PackedWeight
    from splice.quant.quantizers import quantize

    pw = PackedWeight.from_quantized(quantize(torch.randn(8, 64), 4, 32))
    x = torch.randn(2, 64)

    def f(x):
        return quant_matmul(x, pw.qweight, pw.scales, pw.zeros, None, 4, 32, 8, 64) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(compiled(x), f(x))
