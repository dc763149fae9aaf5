"""The ``splice`` command line: ``demo``, ``extract``, ``profile layers|heads``, ``route train``,
``condition fit``, ``train lineas|gact|controller``, ``search heads|attention``,
``bench steer|skip|speculative|quant|attention|serve``, ``eval steer|lfd``, ``quantize``, ``export``, ``serve``."""

from __future__ import annotations

import argparse
import sys

from . import bench, evaluation, profiling, quantization, serving, steering


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splice", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for commands in (steering, bench, evaluation, profiling, quantization, serving):
        commands.add_commands(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and not hasattr(args, "vllm_args"):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.vllm_args = [a for a in extra if a != "--"]
    return args.func(args)
