"""What keeps a model's decode step from compiling, checked before anything is compiled or run.

Each blocker names the part of the configuration and why ``torch.compile`` cannot hold it in one
graph of fixed shapes. Everything else splice installs (steering at every site, maps, token
gates, CAST conditions, static skips, hybrid heads, quantized linears) is built from registered
ops and buffers and compiles; :class:`CompiledDecoder` proves it with ``fullgraph=True``.
"""

from __future__ import annotations

from torch import nn

from ..runtime.splice_runtime import ATTRIBUTE


class CompileError(RuntimeError):
    """The decode step cannot compile; the message names the part and why."""


def compile_blockers(model: nn.Module) -> list[str]:
    """Reasons (one per part) that ``model``'s decode step cannot compile; empty if none."""
    blockers = []
    if not getattr(model, "_can_compile_fullgraph", False):
        blockers.append(f"{type(model).__name__}: Hugging Face does not mark this architecture as compiling "
                        "in one graph over a static cache (_can_compile_fullgraph)")
    runtime = getattr(model, ATTRIBUTE, None)
    if runtime is None:
        return blockers
    if runtime.skip.router is not None:
        blockers.append("per-request routing (Patch.set_router): the rows that run each routed layer are "
                        "chosen from the prefill's activations, so the layer's batch has a data-dependent size")
    if runtime.skip.draft:
        blockers.append("a self-speculative draft pass is active: it skips layers for one forward at a time")
    return blockers


def raise_if_blocked(model: nn.Module, fallback: bool = False) -> list[str]:
    """:func:`compile_blockers` of ``model``; raises :class:`CompileError` naming them all unless
    ``fallback`` (then the caller runs eagerly)."""
    blockers = compile_blockers(model)
    if blockers and not fallback:
        raise CompileError("cannot compile the decode step: " + "; ".join(blockers))
    return blockers
