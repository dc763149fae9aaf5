"""Compiled decoding: ``splice.compile_decode(model) -> CompiledDecoder``, then ``.generate(...)``.

The decode step is the model's own forward, compiled once per batch size by ``torch.compile`` with
``fullgraph=True`` (a graph break anywhere, splice's code included, is an error) over Hugging
Face's ``StaticCache`` (key and value tensors of ``max_cache_len`` positions, written in place, so
every step has the same shapes). The prefill runs eagerly into the same cache.

A patched model is *driven*: before each forward the decoder sets splice's per-token state (slots,
positions, row gates; :meth:`SpliceRuntime.begin_forward`) outside the graph, and the compiled
layers only read it. Changing a slot's vectors or scales, or which rows use which slot
(``Patch.set_slot`` on a site already in use, ``Patch.assign``), writes buffers and recompiles
nothing. Changing the batch size, or steering a site no slot used before, compiles once more.

Greedy decoding by default; ``temperature > 0`` samples (optionally from the ``top_k`` most likely
tokens). A row that emits an EOS token is padded from then on, as Hugging Face's ``generate`` does.
"""

from __future__ import annotations

import time
import types
import warnings

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from ..runtime.splice_runtime import ATTRIBUTE
from .compile_check import CompileError, raise_if_blocked


# A decoder keeps one graph per batch size and patch configuration (on its own code object, see
# _own_step), and Dynamo's default limit of 8 graphs a code object would refuse a ninth.
RECOMPILE_LIMIT = 64


class CompiledDecoder:
    """Greedy or sampled generation with a compiled decode step; see :func:`compile_decode`."""

    def __init__(self, model: nn.Module, max_cache_len: int, fallback: bool, **compile_options):
        self.model, self.max_cache_len, self.fallback = model, max_cache_len, fallback
        self.compile_options = {"fullgraph": True, "dynamic": False, **compile_options}
        self._checked = _own_step(model)
        self.step = torch.compile(self._checked, **self.compile_options)
        self._unguarded: dict = {}  # graph of self.step -> the step compiled without the model's guards
        self.failed = False  # set when torch.compile failed and the fallback took over
        self.last_compiled = False  # whether the last generation's decode steps ran compiled
        self.last_decode_seconds = 0.0  # wall time of the last generation's decode steps (no prefill)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch, prompt + new]`` token ids, like Hugging Face's ``generate`` (left padding). EOS and
        pad ids default to the model's ``generation_config``; ``eos_token_id=[]`` never stops."""
        batch, prompt = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self._check(input_ids, mask, max_new_tokens, temperature, top_k)
        device = input_ids.device
        runtime = getattr(self.model, ATTRIBUTE, None)
        blockers = raise_if_blocked(self.model, self.fallback)
        step = self.model.forward if blockers or self.failed else self.step
        config = getattr(self.model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
        pad_token_id = getattr(config, "pad_token_id", None) if pad_token_id is None else pad_token_id
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        full_mask = torch.ones(batch, self.max_cache_len, dtype=mask.dtype, device=device)
        full_mask[:, :prompt] = mask
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # a configuration that cannot compile (run eagerly on request) keeps Hugging Face's growing cache
        cache = (DynamicCache(config=self.model.config) if blockers else
                 StaticCache(config=self.model.config, max_cache_len=self.max_cache_len))
        tokens, done = [input_ids], torch.zeros(batch, dtype=torch.bool, device=device)
        if runtime is not None:
            runtime.driven = True
        try:
            limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
                logits = self._forward(self.model.forward, runtime, input_ids, full_mask, position, cache, True)
                position = position[:, -1:]
                start = time.perf_counter()
                for i in range(max_new_tokens):
                    nxt = _choose(logits[:, -1], temperature, top_k, generator)
                    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                    tokens.append(nxt[:, None])
                    done |= torch.isin(nxt, eos)
                    if i + 1 == max_new_tokens or bool(done.all()):
                        break
                    position = position + 1
                    logits, step = self._decode_step(step, runtime, nxt[:, None], full_mask, position, cache)
                    if step is self.step:
                        step = self._unguarded_step()
                self.last_decode_seconds = time.perf_counter() - start
                self.last_compiled = not (blockers or self.failed)
        finally:
            if runtime is not None:
                runtime.driven = False
        return torch.cat(tokens, 1)

    def _unguarded_step(self):
        """The later decode steps of this generation: the graph its first step ran (with all of Dynamo's
        guards) compiled once more, with the guards on the model's modules skipped.

        Those guards (about 10,000 for a 30-layer quantized model, 1-3 ms a step on a CPU) check that
        nothing the graph was traced from has changed. The first step of every generation evaluates
        them all, so a changed model or patch runs its own graph or compiles one, and Dynamo moves the
        entry it ran to the front of the cache. Its unguarded twin was compiled from a model that
        passed the same guards, and between steps the decoder changes tensors only (tokens,
        positions, the cache), so the twin computes what the checked graph would."""
        graph = _graph_run_last(self._checked)
        if graph is None:
            return self.step
        if graph not in self._unguarded:
            options = _with_options(self.compile_options,
                                    guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe)
            self._unguarded[graph] = torch.compile(_own_step(self.model), **options)
        return self._unguarded[graph]

    def _decode_step(self, step, runtime, ids, full_mask, position, cache):
        """One decode step through ``step``; on a compile failure, raise or (fallback) run it eagerly."""
        try:
            return self._forward(step, runtime, ids, full_mask, position, cache, False), step
        except Exception as error:  # noqa: BLE001: any failure inside torch.compile is reported the same way
            if step is self.model.forward or not _from_compiler(error):
                raise
            where = _first_line(error)
            if not self.fallback:
                raise CompileError(f"torch.compile failed on the decode step (fallback=False, so nothing ran "
                                   f"eagerly): {where}") from error
            warnings.warn(f"splice: decoding eagerly, torch.compile failed: {where}", stacklevel=3)
            self.failed = True
            eager = self.model.forward
            return self._forward(eager, runtime, ids, full_mask, position, cache, False), eager

    @staticmethod
    def _forward(step, runtime, ids, full_mask, position, cache, prefill: bool) -> torch.Tensor:
        if runtime is not None:
            runtime.begin_forward(ids.shape[0], ids.shape[1], position, cache, prefill)
        mask = full_mask if cache.is_compileable else full_mask[:, :cache.get_seq_length() + ids.shape[1]]
        return step(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                    use_cache=True, logits_to_keep=1).logits

    def _check(self, input_ids, mask, max_new_tokens, temperature, top_k) -> None:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a [batch, length] long tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if input_ids.shape[1] + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_cache_len {self.max_cache_len}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


def _own_step(model: nn.Module):
    """``model.forward`` behind a code object of its own: Dynamo keeps compiled graphs on the code object,
    so this one's graphs are apart from those of other decoders (and of models of the same class)."""
    forward = model.forward

    def step(*args, **kwargs):
        return forward(*args, **kwargs)

    step.__code__ = step.__code__.replace()
    return step


def _graph_run_last(function) -> types.CodeType | None:
    """The compiled code of the Dynamo cache entry that ``function``'s last call ran (or added): the
    entry at the front of its code's cache."""
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__)
    return entries[0].code if entries else None


def _with_options(options: dict, **defaults) -> dict:
    """torch.compile ``options`` with ``defaults`` in its ``options`` where the caller set none.
    torch.compile takes a ``mode`` or ``options``: Inductor's mode is turned into its options; with
    another backend's mode, ``options`` are returned unchanged."""
    options = dict(options)
    mode = options.pop("mode", None)
    inner = dict(options.pop("options", None) or {})
    if mode not in (None, "default"):
        if options.get("backend", "inductor") != "inductor":
            return {**options, "mode": mode}
        from torch._inductor import list_mode_options  # noqa: PLC0415: loaded by torch.compile on first use

        inner = {**list_mode_options(mode, options.get("dynamic")), **inner}
    return {**options, "options": {**defaults, **inner}}


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature) over the top_k tokens."""
    if temperature == 0.0:  # argmax's index (the first maximum): bf16 argmax takes ~4x as long on a CPU
        return logits.max(-1).indices
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _from_compiler(error: BaseException) -> bool:
    """Whether ``error`` was raised by torch.compile (Dynamo, AOT autograd, Inductor), not by the model."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def compile_decode(model: nn.Module, max_cache_len: int = 2048, fallback: bool = False,
                   **compile_options) -> CompiledDecoder:
    """A :class:`CompiledDecoder` for ``model`` (patched or not), KV cache of ``max_cache_len`` positions.

    Raises :class:`CompileError` now if the model's configuration cannot compile (naming the part
    and why), unless ``fallback=True``: then that generation runs eagerly. ``compile_options`` go
    to ``torch.compile`` (``backend``, ``mode``); ``fullgraph=True`` and ``dynamic=False`` by default.
    """
    if not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
    raise_if_blocked(model, fallback)
    return CompiledDecoder(model, max_cache_len, fallback, **compile_options)
