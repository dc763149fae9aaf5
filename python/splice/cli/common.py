"""What every command shares: model loading and the parent parsers of repeated options."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(args):
    """The model and tokenizer ``args`` name, after applying ``--threads`` where the command has it."""
    from ..models.loader import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=DTYPES[args.dtype])


def model_options(dtype: str = "float32") -> argparse.ArgumentParser:
    """``--model`` and ``--dtype``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=dtype, choices=sorted(DTYPES))
    return p


def threads_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return p


def timing_options(steps: int, repeats: int) -> argparse.ArgumentParser:
    """``--steps`` and ``--repeats`` of a timed benchmark, and ``--threads``."""
    p = argparse.ArgumentParser(add_help=False, parents=[threads_option()])
    p.add_argument("--steps", type=int, default=steps, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per setting (median reported)")
    return p


def report_option(plot: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", help="write the report here" + (" (and a .png plot beside it)" if plot else ""))
    return p
