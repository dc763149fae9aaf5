"""Group-wise weight quantizers: round-to-nearest (asymmetric, integer-zero, symmetric) and HQQ refinement.

A weight ``W`` [N, K] is cut along K into groups of ``group_size`` columns (the last group of a row is
partial when K is not a multiple). Each group gets a scale ``s`` and zero point ``z`` (stored as
float16) and each weight an integer code ``q`` in ``[0, 2**bits − 1]``::

    w ≈ (q − z) · s,        q = clamp(round(w / s + z), 0, 2**bits − 1)

* ``rtn`` (asymmetric): ``s = (max − min) / (2**bits − 1)``, ``z = −min / s`` (not rounded), so every
  weight is within ``s / 2`` of its reconstruction (plus the float16 rounding of ``s`` and ``z``).
* ``rtn_int`` (asymmetric, integer zero points, as GPTQ / AWQ checkpoints store them): the range is
  widened to include 0 (``min ≤ 0 ≤ max``), ``s = (max − min) / (2**bits − 1)`` and
  ``z = round(−min / s)``, an integer code in ``[0, 2**bits − 1]``; the grid, shifted by at most
  ``s / 2``, still ends within ``s / 2`` of ``min`` and ``max``, so again ``|w − ŵ| ≤ s / 2``. This is
  the form compressed-tensors and vLLM load (:mod:`splice.quant.compressed_tensors_export`).
* ``rtn_sym`` (symmetric): ``z = 2**(bits − 1)`` and ``s = 2 · max|w| / (2**bits − 1)``; again
  ``|w − ŵ| ≤ s / 2``.
* ``hqq``: starts from ``rtn`` and refines the zero points without calibration data (half-quadratic
  splitting, after Badri & Shaji's HQQ): with ``s`` fixed it alternates a generalized soft-threshold
  (``l_p``, p < 1) of the reconstruction error ``E`` with the closed-form zero point
  ``z = mean(q − (W − E) / s)`` and fresh codes, for a few dozen iterations. Each group keeps the
  iterate with the smallest mean absolute error, so no group ends worse than ``rtn``.
"""

from __future__ import annotations

import math

import torch

from ..ops.quant_format import Quantized, check_bits_group

METHODS = ("rtn", "rtn_sym", "rtn_int", "hqq")


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] as fp32 [N, G, group_size] (zero-padded) and the mask of real entries [1, G, gs]."""
    n, k = w.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    wg = torch.nn.functional.pad(w.to(torch.float32), (0, pad)).view(n, groups, group_size)
    mask = (torch.arange(groups * group_size, device=w.device) < k).view(1, groups, group_size)
    return wg, mask


def group_codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s + z), 0, 2**bits − 1)`` of grouped weights [N, G, gs] with parameters [N, G]."""
    return torch.round(wg / s[..., None] + z[..., None]).clamp_(0, 2**bits - 1)


def as_stored(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros rounded to float16, back in fp32 (codes are chosen for the stored values)."""
    if not bool(torch.isfinite(s.to(torch.float16)).all() and torch.isfinite(z.to(torch.float16)).all()):
        raise ValueError("weight range too large for float16 scales / zero points")
    return s.to(torch.float16).to(torch.float32), z.to(torch.float16).to(torch.float32)


def rtn_params(wg: torch.Tensor, mask: torch.Tensor, bits: int, method: str):
    qmax = 2**bits - 1
    symmetric = method == "rtn_sym"
    if symmetric:
        amax = wg.abs().amax(-1)
        s = 2 * amax / qmax
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        lo = torch.where(mask, wg, torch.inf).amin(-1)
        hi = torch.where(mask, wg, -torch.inf).amax(-1)
        if method == "rtn_int":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / qmax
        z = -lo / torch.where(s > 0, s, 1.0)
    s = torch.where(s > 0, s, 1.0)  # constant (or all-zero) groups: any scale reproduces them
    if not symmetric:
        z = torch.where((hi - lo) > 0, z, -lo)
    if method == "rtn_int":
        z = torch.round(z)
    return s, z


CLIP_STEPS = 80
CLIP_CHUNK = 2**22  # candidate elements evaluated at once


def clip_search(wg: torch.Tensor, mask: torch.Tensor, bits: int, method: str):
    """The factor in ``1, 0.99, …, 0.21`` (``CLIP_STEPS``) by which shrinking each group's range minimises its
    ``Σ (w − ŵ)²`` (float16-rounded parameters; the largest factor wins a tie), and the ``rtn_params`` of the
    shrunk range: GPTQ's reference code's ``mse`` option, with the squared error where it takes
    ``|w − ŵ|^2.4`` (7× cheaper here). Clipping a few outliers buys a finer grid for the rest. Never worse
    than ``rtn_params`` by that measure (factor 1 is a candidate). Returns ``(factor, s, z)``, each [N, G]."""
    factors = 1.0 - torch.arange(CLIP_STEPS, dtype=torch.float32, device=wg.device) / 100
    partial = not bool(mask.all())
    best = None
    for chunk in factors.split(max(1, CLIP_CHUNK // wg.numel())):
        s, z = as_stored(*rtn_params(wg * chunk.view(-1, *[1] * wg.dim()), mask, bits, method))
        err = ((group_codes(wg, s, z, bits) - z[..., None]) * s[..., None] - wg).square_()
        err = (err * mask if partial else err).sum(-1)
        err, i = err.min(0)
        found = (chunk[i], s.gather(0, i[None])[0], z.gather(0, i[None])[0], err)
        if best is None:
            best = found
            continue
        better = err < best[3]
        best = (*[torch.where(better, new, old) for new, old in zip(found[:3], best[:3])], torch.minimum(err, best[3]))
    return best[:3]


def clipped_params(wg: torch.Tensor, mask: torch.Tensor, bits: int, method: str):
    """``(s, z)`` of :func:`clip_search`."""
    return clip_search(wg, mask, bits, method)[1:]


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft threshold: the proximal step of ``|x|^p / beta`` (p < 1)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def _hqq_zeros(wg, mask, s, z, bits, iters: int, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
    """HQQ zero-point refinement with ``s`` fixed; returns per-group best zero points."""
    count = mask.sum(-1).to(torch.float32)

    def group_error(zz):
        return ((wg - (group_codes(wg, s, zz, bits) - zz[..., None]) * s[..., None]).abs() * mask).sum(-1) / count

    best_z, best_err = z, group_error(z)
    for _ in range(iters):
        q = group_codes(wg, s, z, bits)
        err = _shrink_lp(wg - (q - z[..., None]) * s[..., None], beta, p)
        z = ((q - (wg - err) / s[..., None]) * mask).sum(-1) / count
        e = group_error(z)
        better = e < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, e, best_err)
        beta *= kappa
    return best_z


def quantize(w: torch.Tensor, bits: int, group_size: int, method: str = "rtn", *, iters: int = 30) -> Quantized:
    """Quantize ``w`` [N, K] group-wise along K (see the module docstring for the math)."""
    check_bits_group(bits, group_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        raise ValueError(f"w must be a non-empty float [N, K] tensor, got {tuple(w.shape)} {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w has non-finite values")
    n, k = w.shape
    wg, mask = grouped(w, group_size)
    s, z = rtn_params(wg, mask, bits, method)
    s, z = as_stored(s, z)
    if method == "hqq":
        s, z = as_stored(s, _hqq_zeros(wg, mask, s, z, bits, iters))
    codes = group_codes(wg, s, z, bits).view(n, -1)[:, :k].to(torch.uint8)
    return Quantized(codes.contiguous(), s.to(torch.float16), z.to(torch.float16), bits, group_size)
