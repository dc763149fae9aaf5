"""The llama.cpp row of ``splice bench quant``: llama-cpp-python decoding the default model's own
Q4_1 GGUF (the file splice converts its model from) at batch 1, on the same threads, timed among
splice's rows in the same interleaved rounds.

llama-cpp-python is optional (``make install-llamacpp``). It must be built from source with
``GGML_NATIVE=OFF`` and explicit instruction-set flags: a native build crashes on the AVX-512
development machines. Without it the row is skipped and the report says why.

Decode is timed like splice's rows: greedy, a 64-token prompt, then ``steps`` one-token steps
(``Llama.generate`` with ``top_k=1``; the clock starts at the first generated token, so the prompt's
evaluation is not on it). Bytes per token: every tensor of the GGUF (the tied embedding is read
whole as the output projection) plus llama.cpp's float16 KV cache.
"""

from __future__ import annotations

import importlib.util
import time

from gguf import GGUFReader

INSTALL = "make install-llamacpp (llama-cpp-python built with GGML_NATIVE=OFF and explicit ISA flags)"


def unavailable() -> str | None:
    """Why the llama.cpp row cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL}"
    return None


def gguf_bytes(path) -> int:
    """Bytes of every tensor in the GGUF file at ``path``."""
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


class LlamaCpp:
    """One llama.cpp model, kept loaded across rounds."""

    def __init__(self, gguf_path, threads: int, context: int):
        from llama_cpp import Llama

        self.path = str(gguf_path)
        self.llm = Llama(model_path=self.path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         n_batch=context, logits_all=False, verbose=False)

    def decode_tps(self, prompt: list[int], steps: int) -> float:
        """Tokens/s of ``steps`` greedy one-token steps after ``prompt`` (token ids of the same vocabulary)."""
        self.llm.reset()
        stream = self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        next(stream)  # the prompt is evaluated and the first token chosen
        start = time.perf_counter()
        for _ in range(steps):
            next(stream)
        seconds = time.perf_counter() - start
        stream.close()
        return steps / seconds

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finaliser fails at interpreter exit)."""
        self.llm.close()

    def kv_bytes_per_token(self) -> int:
        """float16 keys and values of every layer for one position (llama.cpp's default cache type)."""
        from llama_cpp import llama_cpp as lib

        model = self.llm.model
        layers, embd = lib.llama_model_n_layer(model), lib.llama_model_n_embd(model)
        heads, kv_heads = lib.llama_model_n_head(model), lib.llama_model_n_head_kv(model)
        return layers * 2 * kv_heads * (embd // heads) * 2
