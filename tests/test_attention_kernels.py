"""Every backend of ``splice::band_attention`` / ``splice::decode_attention`` against the fp32
reference, the reference against plain causal attention, opcheck, bad arguments, and compile checks of
the Triton and CUDA kernels.

Backends are forced with :func:`splice.ops.use_backend`: the C++ CPU kernel, the Triton kernel (on CPU
under ``TRITON_INTERPRET=1``, set in conftest.py, at small shapes; on CUDA when present), the C++ CUDA
kernel (CUDA only) and, for argument errors, the reference. The reference itself is checked against
SDPA and against the contract written out as loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    ALL_BACKENDS,
    BACKENDS,
    compile_header,
    compile_launcher,
    compile_triton_sm90,
    launcher_opt_in,
    needs_nvcc,
    skip_unless_runs,
)

from splice.ops import band_attention, decode_attention, use_backend
from splice.ops.attention_reference import band_attention_reference, decode_attention_reference

DTYPES = (torch.float32, torch.bfloat16)
# fp32 sums in another order; bf16 / fp16 outputs are rounded once (their inputs feed fp32 math everywhere).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
# (B, Hq, Hkv, T, D): GQA 6/2 and MHA 3/3, T not a multiple of any block size (16, 32, 64), odd D.
BAND_SHAPES = [(2, 6, 2, 37, 16), (3, 3, 3, 70, 24), (1, 6, 2, 5, 8)]
# Per KV head (sinks, window): full; sinks + window; window only; a window longer than T.
HEAD_KINDS = [(0, 0), (3, 8), (0, 5), (2, 1000), (4, -1), (1, 1)]


def run(device: str, backend: str, fn, *args):
    """``fn(*args)`` (CPU tensors moved to ``device``) with ``backend`` forced, or skip where it cannot run."""
    skip_unless_runs(device, backend)
    with use_backend(backend):
        return fn(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


def band_case(b, hq, hkv, t, d, dtype, *, pads=None, kinds=HEAD_KINDS, seed=0):
    """Prefill inputs; row r is left-padded by ``pads[r]`` tokens (positions count from its first real
    token, pads get position 0, as HF's cumsum-of-mask positions do)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    pads = torch.tensor(pads if pads is not None else [0] * b)
    valid = torch.arange(t)[None] >= pads[:, None]
    pos = (torch.arange(t)[None] - pads[:, None]).clamp(min=0)
    sinks = torch.tensor([kinds[i % len(kinds)][0] for i in range(hkv)])
    window = torch.tensor([kinds[i % len(kinds)][1] for i in range(hkv)])
    return q, k, v, pos, valid, sinks, window, d**-0.5


def decode_case(b, hq, hkv, length, d, dtype, seed=0):
    """Decode inputs: about a third of the slots invalid, and row 1 (where it exists) has none valid."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, length, d, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(b, length, generator=g) > 0.35
    if b > 1:
        valid[1] = False
    return q, k, v, valid, d**-0.5


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BAND_SHAPES, ids=str)
def test_band_matches_reference(device, backend, dtype, shape):
    """Mixed heads (full, sinks + window, window only, ...), GQA and MHA, one row left-padded."""
    b = shape[0]
    args = band_case(*shape, dtype, pads=[0, 4, shape[3] - 1][:b])
    assert_close(run(device, backend, band_attention, *args), band_attention_reference(*args), dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_band_long_rows_skip_blocks(device, backend):
    """T spans several key and query blocks of every kernel (streaming heads skip most of them),
    a row padded past the first block, and positions that start above 0 (a chunk of a longer prompt)."""
    if backend == "triton" and device == "cpu":
        t = 150  # the interpreter is slow
    else:
        t = 301
    args = list(band_case(2, 6, 3, t, 16, torch.float32, pads=[0, 70], kinds=[(0, 0), (4, 40), (0, 33)]))
    args[3] = args[3] + 5 * torch.tensor([[0], [1]])
    assert_close(run(device, backend, band_attention, *args), band_attention_reference(*args), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_matches_reference(device, backend, dtype):
    """Gemma 2's logit soft-capping, on scores large enough that the cap changes them (|s| up to ~10
    against a cap of 2), prefill with mixed heads and a padded row, and decode."""
    q, *rest = band_case(2, 6, 2, 37, 16, dtype, pads=[0, 4])
    args = (q * 3, *rest, 2.0)
    ref = band_attention_reference(*args)
    assert not torch.allclose(ref.float(), band_attention_reference(*args[:-1]).float(), atol=1e-2)
    assert_close(run(device, backend, band_attention, *args), ref, dtype)
    q, k, v, valid, scale = decode_case(3, 6, 2, 45, 16, dtype)
    args = (q * 3, k, v, valid, scale, 2.0)
    assert_close(run(device, backend, decode_attention, *args), decode_attention_reference(*args), dtype)


def test_reference_is_causal_attention():
    """With every head full and no padding the reference is SDPA's causal attention (GQA expanded); a
    window of 1 without sinks reads only the token itself (out = v); a padding query gives 0."""
    q, k, v, pos, valid, sinks, window, scale = band_case(2, 6, 2, 9, 8, torch.float32, kinds=[(0, 0)])
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True, scale=scale
    )
    torch.testing.assert_close(band_attention_reference(q, k, v, pos, valid, sinks, window, scale), expected)
    one = torch.ones(2, dtype=torch.int64)
    out = band_attention_reference(q, k, v, pos, valid, 0 * one, one, scale)
    torch.testing.assert_close(out, v.repeat_interleave(3, 1))
    valid[1, :4] = False
    out = band_attention_reference(q, k, v, pos, valid, sinks, window, scale)
    assert torch.equal(out[1, :, :4], torch.zeros_like(out[1, :, :4]))


def loop_attention(q, k, v, scale, may_read, softcap=0.0):
    """out[b, h, i] by the contract, one query at a time in float64: softmax over the keys j with
    ``may_read(b, g, i, j)`` of scale * q.k (soft-capped: cap * tanh(s / cap)), times v; 0 where no key
    may be read."""
    b_count, hq, t, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b_count, hq, t, d, dtype=torch.float64)
    for b in range(b_count):
        for h in range(hq):
            g = h // group
            for i in range(t):
                keys = [j for j in range(k.shape[2]) if may_read(b, g, i, j)]
                if keys:
                    s = torch.stack([scale * q[b, h, i].double() @ k[b, g, j].double() for j in keys])
                    s = softcap * torch.tanh(s / softcap) if softcap else s
                    out[b, h, i] = torch.softmax(s, 0) @ v[b, g, keys].double()
    return out


@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_band_reference_is_the_contract(softcap):
    """Mixed heads (full, sinks + window, window only, window 1), a left-padded row and positions that
    start above 0, against the contract's rule written out per (query, key) pair."""
    q, k, v, pos, valid, sinks, window, scale = band_case(2, 8, 4, 11, 4, torch.float32, pads=[0, 3],
                                                          kinds=[(0, 0), (2, 3), (0, 4), (0, 1)])
    pos = pos + 4 * torch.tensor([[1], [0]])

    def may_read(b, g, i, j):
        near = window[g] <= 0 or pos[b, i] - pos[b, j] < window[g] or pos[b, j] < sinks[g]
        return bool(valid[b, j]) and j <= i and bool(near)

    expected = loop_attention(q, k, v, scale, may_read, softcap)
    torch.testing.assert_close(band_attention_reference(q, k, v, pos, valid, sinks, window, scale, softcap).double(),
                               expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_decode_reference_is_the_contract(softcap):
    """One query per row over the valid slots of the cache (a row with none gives 0), GQA."""
    q, k, v, valid, scale = decode_case(3, 6, 2, 9, 4, torch.float32)
    expected = loop_attention(q[:, :, None], k, v, scale, lambda b, g, i, j: bool(valid[b, j]), softcap)[:, :, 0]
    torch.testing.assert_close(decode_attention_reference(q, k, v, valid, scale, softcap).double(), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 6, 2, 45, 16), (2, 3, 3, 200, 24), (1, 6, 2, 1, 8)], ids=str)
def test_decode_matches_reference(device, backend, dtype, shape):
    """Some invalid slots, an all-invalid row (gives 0), GQA and MHA, L across several slot blocks."""
    args = decode_case(*shape, dtype)
    out = run(device, backend, decode_attention, *args)
    assert_close(out, decode_attention_reference(*args), dtype)
    if shape[0] > 1:
        assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_decode_long_cache_is_split(device, backend):
    """A cache long enough that the C++ kernel splits it over chunks and merges them (flash-decoding)."""
    length = 700 if backend == "triton" and device == "cpu" else 2100
    args = decode_case(1, 3, 1, length, 16, torch.float32)
    assert_close(run(device, backend, decode_attention, *args), decode_attention_reference(*args), torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_decode_is_last_row_of_prefill(device, backend):
    """Decoding the last token over the prompt's cache equals the last row of full band attention."""
    q, k, v, pos, valid, sinks, window, scale = band_case(2, 6, 2, 19, 8, torch.float32, pads=[0, 3],
                                                          kinds=[(0, 0)])
    out = run(device, backend, decode_attention, q[:, :, -1], k, v, valid, scale)
    ref = band_attention_reference(q, k, v, pos, valid, sinks, window, scale)[:, :, -1]
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


def _band(**over):
    args = dict(zip(("q", "k", "v", "pos", "valid", "sinks", "window", "scale"),
                    band_case(1, 4, 2, 6, 8, torch.float32)))
    args.update(over)
    return (band_attention, *args.values())


def _decode(**over):
    args = dict(zip(("q", "k", "v", "valid", "scale"), decode_case(1, 4, 2, 6, 8, torch.float32)))
    args.update(over)
    return (decode_attention, *args.values())


BAD_ARGS = {  # name: ((op, *args), message)
    "k and v T": (_band(k=torch.zeros(1, 2, 5, 8), v=torch.zeros(1, 2, 5, 8)), "same T"),
    "v shape": (_band(v=torch.zeros(1, 2, 6, 4)), "v must have k's shape"),
    "head size": (_band(k=torch.zeros(1, 2, 6, 4), v=torch.zeros(1, 2, 6, 4)), "head size"),
    "heads not a multiple": (_band(k=torch.zeros(1, 3, 6, 8), v=torch.zeros(1, 3, 6, 8),
                                   sinks=torch.zeros(3, dtype=torch.int64), window=torch.zeros(3, dtype=torch.int64)),
                             "multiple of KV heads"),
    "q int": (_band(q=torch.zeros(1, 4, 6, 8, dtype=torch.int32)), "q must be float32"),
    "k dtype": (_band(k=torch.zeros(1, 2, 6, 8, dtype=torch.bfloat16)), "k must be"),
    "q 3-d": (_band(q=torch.zeros(4, 6, 8)), "q must be 4-d"),
    "pos int32": (_band(pos=torch.zeros(1, 6, dtype=torch.int32)), "pos must be"),
    "pos shape": (_band(pos=torch.zeros(1, 5, dtype=torch.int64)), "pos must be"),
    "valid float": (_band(valid=torch.ones(1, 6)), "valid must be"),
    "sinks shape": (_band(sinks=torch.zeros(4, dtype=torch.int64)), "sinks must be"),
    "window dtype": (_band(window=torch.zeros(2, dtype=torch.int32)), "window must be"),
    "decode q 4-d": (_decode(q=torch.zeros(1, 4, 1, 8)), "q must be 3-d"),
    "decode heads": (_decode(q=torch.zeros(1, 3, 8)), "multiple of KV heads"),
    "decode valid shape": (_decode(valid=torch.ones(1, 5, dtype=torch.bool)), "valid must be"),
    "decode v dtype": (_decode(v=torch.zeros(1, 2, 6, 8, dtype=torch.float16)), "v must be"),
    "negative softcap": ((*_band(), -1.0), "softcap must be"),
    "decode infinite softcap": ((*_decode(), float("inf")), "softcap must be"),
}


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments_raise(device, backend, case):
    (op, *args), message = BAD_ARGS[case]
    with pytest.raises(RuntimeError, match=message):
        run(device, backend, op, *args)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    move = lambda args: tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    band = move(band_case(2, 6, 2, 11, 8, dtype, pads=[0, 3]))
    torch.library.opcheck(torch.ops.splice.band_attention, band)
    q, k, v, valid, scale = move(decode_case(2, 6, 2, 13, 8, dtype))
    torch.library.opcheck(torch.ops.splice.decode_attention, (q, k, v, valid, scale))
    torch.library.opcheck(torch.ops.splice.decode_attention, (q, k, v, valid, scale, 1.5))
    torch.library.opcheck(torch.ops.splice.band_attention, (*band, 1.5))
    # a non-contiguous q: a [B, T, H, D] projection viewed as [B, H, T, D]
    torch.library.opcheck(torch.ops.splice.band_attention, (band[0].transpose(1, 2).contiguous().transpose(1, 2),
                                                            *band[1:]))


TRITON_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splice.kernels import attention as a

for dt in ("fp32", "bf16", "fp16"):
    for kernel, types, consts in (
        (a._band_attention_kernel,
         [f"*{dt}", f"*{dt}", f"*{dt}", "*i64", "*i1", "*i64", "*i64", f"*{dt}", "fp32", "fp32", "i32", "i32", "i32",
          "i32"],
         dict(D=64, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64)),
        (a._decode_attention_kernel,
         [f"*{dt}", f"*{dt}", f"*{dt}", "*i1", f"*{dt}", "fp32", "fp32", "i32", "i32", "i32"],
         dict(D=64, GROUP_PAD=4, BLOCK_N=64, BLOCK_D=64)),
    ):
        signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(consts)))
        source = ASTSource(kernel, signature, consts)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels compile (not interpreted) to sm_90 cubins for every dtype; in a subprocess
    because TRITON_INTERPRET is read when the kernels are defined."""
    compile_triton_sm90(TRITON_SM90)


@needs_nvcc
def test_cuda_kernel_compiles(tmp_path):
    """attention_kernel.cuh (no torch headers) compiles warning-free for every dtype."""
    compile_header(tmp_path, (
        '#include "attention_kernel.cuh"\n'
        + "".join(
            f"template cudaError_t splice::gpu::launch_band_attention<{t}>("
            f"const splice::gpu::AttentionArgs<{t}>&, cudaStream_t);\n"
            f"template cudaError_t splice::gpu::launch_decode_attention<{t}>("
            f"const splice::gpu::AttentionArgs<{t}>&, cudaStream_t);\n"
            for t in ("float", "__nv_bfloat16", "__half")
        )
    ))


@needs_nvcc
@launcher_opt_in
def test_cuda_launcher_compiles(tmp_path):
    """csrc/cuda/attention.cu compiles against the installed torch's headers."""
    compile_launcher(tmp_path, "attention")
