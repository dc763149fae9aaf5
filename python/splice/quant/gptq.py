"""GPTQ: quantize a weight column by column, compensating each column's error in the columns not yet quantized.

After Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). For a Linear ``y = x Wᵀ`` (``W`` [N, K]) and calibration inputs ``X`` [n, K],
GPTQ minimises ``‖X Wᵀ − X Ŵᵀ‖²`` row by row with the Hessian ``H = 2 XᵀX / n`` [K, K]:

* *dampening*: ``H += damp · mean(diag H) · I``; *dead columns* (``H_jj = 0``, an input that is
  always zero) get ``H_jj = 1`` and ``W_:j = 0``;
* ``U`` = the upper Cholesky factor of ``H⁻¹``; sweeping the columns in order ``j = 0 … K−1``,
  column ``j`` is rounded to ``q_j`` and its scaled error ``e = (w_j − q_j) / U_jj`` is spread
  over the later columns, ``W_:,j+1: −= e · U_j,j+1:`` (the optimal-brain-surgeon update);
* *lazy batches*: inside a block of ``block_size`` columns the update touches the block only; the
  later columns get the block's accumulated update in one matmul at its end;
* *activation order* (``act_order``): columns are swept by decreasing ``H_jj``. The group
  parameters still belong to the original column groups (the packed format's), so each group's
  scale and zero point are computed when the sweep first reaches one of its columns, from the
  current (already compensated) values of all its columns. The reference code's ``static_groups``
  computes them from the uncompensated weight before the sweep; splice's choice sees the updates
  made so far and keeps the same valid layout;
* *group parameters* without ``act_order``: computed when the sweep reaches the group's first
  column, from its current values (the block's pending updates included);
* *clipping* (``clip``, the reference code's ``mse`` option): each group's range is shrunk by the
  factor that minimises its ``Σ |w − ŵ|^2.4`` (:func:`splice.quant.quantizers.clipped_params`).

Group parameters are those of one of :mod:`splice.quant.quantizers`' round-to-nearest grids
(``grid``), stored as float16: ``rtn_int`` (asymmetric, range widened to include 0, integer zero
point ``z = round(−min / s)``) or ``rtn_sym`` (symmetric), whose GPTQ weights export exactly to
compressed-tensors; or ``rtn`` (asymmetric min-max, a float zero point), which the export refuses but
which can land exactly on a grid a model was already stored on (the default model's Q4_1 weights
at 4 bits in groups of 32). With ``H = I`` no error is spread and GPTQ gives exactly
``quantize(W, bits, group_size, grid)``.

The sweep is thousands of small torch ops; where one column's update touches fewer than
``SMALL_UPDATE`` weights it runs on one torch thread (the setting is restored afterwards), which on
2 cores was about 10× faster than two threads synchronising on every op.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..ops.quant_format import Quantized, check_bits_group
from .quantizers import as_stored, clipped_params, rtn_params

DAMP = 0.01
BLOCK_SIZE = 128
GRIDS = ("rtn_int", "rtn_sym", "rtn")
SMALL_UPDATE = 2**20  # below this many weights per column update, one thread sweeps faster (no sync)


class Hessian:
    """Accumulates ``H = 2 XᵀX / n`` of a Linear's inputs ``X`` (any leading dimensions) in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).to(torch.float32)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """``2 XᵀX / n``; ValueError with fewer tokens than inputs (the Hessian could not have full rank)."""
        k = self.sum.shape[0]
        if self.tokens < k:
            raise ValueError(f"too few calibration tokens: {self.tokens} for {k} inputs (the Hessian needs at "
                             f"least {k}); use more or longer calibration windows")
        return self.sum * (2.0 / self.tokens)


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``U``, the upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹``.

    ValueError if the dampened Hessian is not positive definite."""
    h = hessian.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise ValueError(f"the Hessian is not positive definite after dampening {damp} (non-finite inputs, or "
                         "too little dampening for a singular Hessian): raise damp")
    return upper


def _check_settings(damp: float, block_size: int, grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")


def _check(w: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int, grid: str) -> None:
    _check_settings(damp, block_size, grid)
    if w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        raise ValueError(f"w must be a non-empty float [N, K] tensor, got {tuple(w.shape)} {w.dtype}")
    if tuple(hessian.shape) != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian must be [{w.shape[1]}, {w.shape[1]}] for a weight of {w.shape[1]} inputs, "
                         f"got {list(hessian.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w has non-finite values")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian has non-finite values (non-finite calibration inputs)")


@dataclass(frozen=True)
class GPTQSettings:
    """The settings of :func:`gptq_quantize` besides the format: one object for a whole calibration."""

    damp: float = DAMP
    act_order: bool = False
    grid: str = "rtn_int"
    block_size: int = BLOCK_SIZE
    clip: bool = False

    def __post_init__(self) -> None:
        _check_settings(self.damp, self.block_size, self.grid)

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> Quantized:
        return gptq_quantize(w, hessian, bits, group_size, **asdict(self))

    def compensated(self, w: torch.Tensor, hessian: torch.Tensor, bits: int,
                    group_size: int) -> tuple[Quantized, torch.Tensor]:
        """:func:`gptq_compensated` with these settings."""
        return gptq_compensated(w, hessian, bits, group_size, **asdict(self))


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, **settings) -> Quantized:
    """Quantize ``w`` [N, K] group-wise along K, minimising ``‖X Wᵀ − X Ŵᵀ‖²`` for ``hessian`` = 2 XᵀX / n
    (keywords: :class:`GPTQSettings`' fields)."""
    return gptq_compensated(w, hessian, bits, group_size, **settings)[0]


def gptq_compensated(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *, damp: float = DAMP,
                     act_order: bool = False, grid: str = "rtn_int", block_size: int = BLOCK_SIZE,
                     clip: bool = False) -> tuple[Quantized, torch.Tensor]:
    """:func:`gptq_quantize`'s result and ``W̃`` [N, K] fp32, each column's value when the sweep rounded it
    (the weight with the earlier columns' errors compensated): the codes are ``round(W̃ / s + z)``."""
    check_bits_group(bits, group_size)
    _check(w, hessian, damp, block_size, grid)
    n, k = w.shape
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    position = torch.argsort(perm).tolist()  # original column -> its place in the sweep
    order = perm.tolist()
    threads = torch.get_num_threads()
    if n * block_size < SMALL_UPDATE:
        torch.set_num_threads(1)
    try:
        U = inverse_cholesky(H, damp)
        codes, scales, zeros, updated = _sweep(W, U, order, position, bits, group_size, block_size, grid, clip)
    finally:
        torch.set_num_threads(threads)
    return (Quantized(codes[:, position].to(torch.uint8).contiguous(), scales.to(torch.float16),
                      zeros.to(torch.float16), bits, group_size), updated[:, position].contiguous())


def _sweep(W, U, order, position, bits, group_size, block_size, grid, clip):
    """The blocked column sweep (module docstring) over ``W`` [N, K] in sweep order; ``W`` is updated in place.
    Returns codes in sweep order, the per-group float16-rounded scales and zero points (fp32) and each
    column's value when it was rounded (sweep order)."""
    n, k = W.shape
    qmax = 2**bits - 1
    groups = math.ceil(k / group_size)
    codes = torch.zeros_like(W)
    updated = torch.zeros_like(W)
    scales = torch.zeros(n, groups)
    zeros = torch.zeros(n, groups)
    ready = [False] * groups
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = order[i1 + i] // group_size
            if not ready[g]:
                # the group's columns now: their values at the block's start less the block's updates so far
                p = torch.tensor(position[g * group_size:(g + 1) * group_size])
                current = (W[:, p] - E1[:, :i] @ U[i1:i1 + i, p])[:, None, :]
                every = torch.ones_like(current[:1], dtype=torch.bool)
                s, z = (clipped_params(current, every, bits, grid) if clip else
                        as_stored(*rtn_params(current, every, bits, grid)))
                scales[:, g], zeros[:, g], ready[g] = s[:, 0], z[:, 0], True
            col = W1[:, i]
            s, z = scales[:, g], zeros[:, g]
            code = torch.round(col / s + z).clamp_(0, qmax)
            codes[:, i1 + i] = code
            updated[:, i1 + i] = col
            q = (code - z) * s
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scales, zeros, updated
