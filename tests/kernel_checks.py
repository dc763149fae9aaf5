"""Backend lists and compile checks shared by the kernel test files.

* ``BACKENDS``: the (device, backend) pairs of the kernels, each compared with the reference;
  ``ALL_BACKENDS`` adds the reference itself, for tests whose expected results do not come from it
  (hand-derived results, argument errors);
* ``skip_unless_runs(device, backend)``: skips a backend that cannot run here, except that the C++
  CPU backend must run wherever splice._C was built (unless ``SPLICE_NO_EXT=1``): a missing or broken
  extension fails instead of skipping.

No GPU here, so compiling is what can be checked of the CUDA kernels:

* ``compile_triton_sm90(script)``: a script that compiles Triton kernels (not interpreted) to sm_90
  cubins, run in a subprocess because TRITON_INTERPRET is read when kernels are defined;
* ``compile_header(tmp_path, text, *flag_sets)``: a translation unit over a torch-free CUDA kernel
  header, compiled warning-free by nvcc once per extra flag set;
* ``compile_launcher(tmp_path, name)``: ``csrc/cuda/<name>.cu`` against the installed torch's
  headers. A CPU torch wheel ships the c10/cuda headers but not the generated
  c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips; torch's headers
  need C++20, as BuildExtension passes. It takes ~45 CPU-seconds, so it runs only with
  SPLICE_TEST_NVCC_LAUNCHER=1 (``launcher_opt_in``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from splice.ops import available_backends, library

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
NVCC_FLAGS = ["-arch=sm_90", "-O3", "--use_fast_math", *cpp_extension.COMMON_NVCC_FLAGS]
WARNINGS_ARE_ERRORS = ("-std=c++17", "-Xcompiler=-Wall,-Wextra", "-Werror=all-warnings")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
launcher_opt_in = pytest.mark.skipif(
    os.environ.get("SPLICE_TEST_NVCC_LAUNCHER") != "1",
    reason="compiling an ATen launcher against torch headers takes ~45 CPU-seconds; "
    "set SPLICE_TEST_NVCC_LAUNCHER=1 to run it",
)


BACKENDS = [
    pytest.param("cpu", "cpp", id="cpu-cpp"),
    pytest.param("cpu", "triton", id="cpu-triton"),
    pytest.param("cuda", "cuda", id="cuda-cuda"),
    pytest.param("cuda", "triton", id="cuda-triton"),
]
ALL_BACKENDS = [*BACKENDS, pytest.param("cpu", "reference", id="cpu-reference")]


def extension_expected() -> bool:
    """Whether splice._C must have loaded: always, unless the build skipped it (SPLICE_NO_EXT=1)."""
    return os.environ.get("SPLICE_NO_EXT") != "1"


def skip_unless_runs(device: str, backend: str) -> None:
    """Skip unless ``backend`` can run on ``device`` here; fail if that is because splice._C is missing."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "cpp" and not library.extension_loaded() and extension_expected():
        pytest.fail(f"splice._C did not load: {library.extension_error()}")
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} cannot run on {device} here")


def nvcc(source: Path, out: Path, *flags: str) -> None:
    cmd = [NVCC, "-c", *flags, *NVCC_FLAGS, "-I", str(ROOT / "csrc/cpu"), "-I", str(ROOT / "csrc/cuda"),
           str(source), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    assert out.stat().st_size > 0


def compile_triton_sm90(script: str) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def compile_header(tmp_path: Path, text: str, *flag_sets: tuple[str, ...]) -> None:
    tu = tmp_path / "kernel_tu.cu"
    tu.write_text(text)
    for flags in flag_sets or ((),):
        nvcc(tu, tmp_path / "tu.o", *WARNINGS_ARE_ERRORS, *flags)


def compile_launcher(tmp_path: Path, name: str) -> None:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    if not (Path(cpp_extension.include_paths()[0]) / "c10/cuda/CUDAGuard.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    nvcc(ROOT / f"csrc/cuda/{name}.cu", tmp_path / f"{name}.o", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
         *includes)
