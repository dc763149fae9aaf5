"""SliderQuant's learnable quantizer and its sliding windows of layers.

After Wang et al., "SliderQuant: Accurate Post-Training Quantization for LLMs" (ICLR 2026) and its
reference code (deep-optimization/SliderQuant, weight-only ``lora_only`` mode). A Linear's weight
``W`` [N, K] is quantized group-wise along K as

    W' = W + (1/r) · B A                         (rank-r LoRA, B [N, r] = 0 at the start)
    lo = σ(γ) · min W'_g,  hi = σ(β) · max W'_g    (learnable weight clipping, per group; σ(4) ≈ 0.98 at the start)
    s = (hi − lo) / (2^bits − 1),  z = round(−lo / s)
    Ŵ = (clamp(⌊W' / s⌉ + z, 0, 2^bits − 1) − z) · s

with ``⌊·⌉`` rounding by the straight-through estimator, so ``γ``, ``β``, ``A`` and ``B`` learn from
the output error of a window of decoder layers. ``lo``/``hi`` are widened to include 0 (splice's
``rtn_int`` grid): zero points are integers in ``[0, 2^bits − 1]``, so the result exports exactly to
compressed-tensors. The LoRA is merged before quantizing, so the model keeps no extra weights.

*Intra-layer sliding* (the paper's incremental strategy): a *rate* ``ρ`` quantizes the first
``⌈ρ · G⌉`` of a row's ``G`` groups and leaves the rest at ``W'``; calibration runs all windows at
``ρ = 0.5``, then again at ``ρ = 1``. (The reference code slices its flattened per-group scales by
the rate while slicing the weight's columns, which pairs columns with other rows' scales when a row
has several groups; splice quantizes the first groups of every row with their own parameters.)

*Inter-layer sliding*: :func:`window_schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.quant_format import Quantized, check_bits_group
from .quantizers import as_stored, clip_search, group_codes, grouped

LWC_INIT = 4.0  # the reference code's initial clipping logit: σ(4) ≈ 0.982
INITS = ("minmax", "clip", "gptq")
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SliderQuantSettings:
    """A SliderQuant calibration.

    ``epochs`` passes over the calibration chunks (``batch_size`` windows each, one AdamW step per chunk)
    per window of layers and per rate of ``rates``; windows by :func:`window_schedule` (``fill``,
    ``window``, ``stride``); learning rates ``lwc_lr`` (clipping logits) and ``lora_lr`` (rank ``rank``);
    ``init`` (:data:`INITS`, see :class:`LearnableQuantLinear`); bfloat16 ``autocast`` for the matmuls;
    ``seed`` orders the chunks. The defaults fit SmolLM2-135M's calibration in about 10 minutes on 2
    cores (16 × 512 tokens); the reference code trains 60 epochs on 128 × 2048 tokens."""

    epochs: int = 1
    rates: tuple[float, ...] = (0.5, 1.0)
    fill: int = 4
    window: int = 2
    stride: int = 1
    lwc_lr: float = 0.1
    lora_lr: float = 2e-3
    rank: int = 4
    init: str = "clip"
    batch_size: int = 1
    autocast: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.epochs < 1 or self.rank < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, rank and batch_size must be >= 1, got {self.epochs}, {self.rank}, "
                             f"{self.batch_size}")
        if not self.rates or any(not 0 < r <= 1 for r in self.rates) or self.rates[-1] != 1:
            raise ValueError(f"rates must be in (0, 1] and end at 1 (the final pass quantizes everything), "
                             f"got {self.rates}")
        if not all(math.isfinite(v) and v >= 0 for v in (self.lwc_lr, self.lora_lr)):
            raise ValueError(f"learning rates must be finite and >= 0, got {self.lwc_lr}, {self.lora_lr}")
        if self.window < 1 or not 1 <= self.stride <= self.window or self.fill < 0 or 0 < self.fill < self.stride:
            raise ValueError(f"need window >= 1, 1 <= stride <= window and fill 0 or >= stride, got window "
                             f"{self.window}, stride {self.stride}, fill {self.fill}")


def check_start(settings: SliderQuantSettings, grid: str) -> None:
    """A GPTQ start (``init="gptq"``) needs GPTQ's integer zero points: grid ``rtn_int`` or ``rtn_sym``."""
    if settings.init == "gptq" and grid == "rtn":
        raise ValueError("SliderQuant from GPTQ needs integer zero points: GPTQ grid rtn_int or rtn_sym, not rtn")


def window_schedule(num_layers: int, fill: int, window: int, stride: int) -> list[list[int]]:
    """The decoder layers trained together, window by window (the reference code's ``fill_window_size``).

    Shallow layers: windows expand ``[0], [0, 1], …, [0 … fill−1]``; middle layers: ``window`` layers
    sliding by ``stride``; deep layers: windows contract ``[L−fill … L−1], …, [L−1]``. ``fill = 0``:
    sliding windows only."""
    edge = fill - stride if fill else 0
    middle = num_layers - 2 * edge
    if num_layers < 1 or middle < window:
        raise ValueError(f"{num_layers} layers are too few for fill {fill}, window {window}, stride {stride} "
                         f"(need at least {2 * edge + window})")
    start = [list(range(i + 1)) for i in range(fill)]
    end = [list(range(num_layers - fill + i, num_layers)) for i in range(fill)]
    rounds = math.ceil((middle - window) / stride) + 1
    mid = [list(range(edge + r * stride, min(edge + r * stride + window, num_layers))) for r in range(rounds)]
    return start + mid + end


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LearnableQuantLinear(nn.Module):
    """A Linear fake-quantized with learnable clipping (``upper``, ``lower``) and a LoRA (module docstring).

    ``init`` (:data:`INITS`) sets where the clipping starts: ``minmax`` at the reference code's σ(4) ≈ 0.98;
    ``clip`` at the factor with the least squared weight error (:func:`~splice.quant.quantizers.clip_search`,
    never above σ(4)); ``gptq`` at a GPTQ solution ``start = (Quantized, W̃)`` (:func:`splice.quant.gptq.
    gptq_compensated`, integer zero points): the LoRA is added to ``W̃`` instead of ``W``, and the range is
    ``2σ(γ)`` times GPTQ's, so the quantizer starts exactly at GPTQ's codes, scales and zero points.

    ``rate``: ``None`` runs the original weight (the full-precision target), else the fraction of each
    row's groups quantized."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, rank: int = 4, init: str = "clip",
                 start: tuple[Quantized, torch.Tensor] | None = None) -> None:
        super().__init__()
        check_bits_group(bits, group_size)
        if init not in INITS or (init == "gptq") != (start is not None):
            raise ValueError(f"init must be one of {INITS}, with a GPTQ start exactly when it is gptq; got {init!r}")
        self.bits, self.group_size = bits, group_size
        if not bool(torch.isfinite(linear.weight).all()):
            raise ValueError("the weight has non-finite values")
        self.register_buffer("weight", linear.weight.detach().to(torch.float32, copy=True))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.float32, copy=True))
        n, k = self.weight.shape
        groups = math.ceil(k / group_size)
        logit = torch.full((n, groups), LWC_INIT)
        self.register_buffer("base", None)
        self.register_buffer("range_lo", None)
        self.register_buffer("range_hi", None)
        if init == "clip":
            factor = clip_search(*grouped(self.weight, group_size), bits, "rtn_int")[0]
            logit = torch.logit(factor).clamp(max=LWC_INIT)
        elif init == "gptq":
            q, compensated = start
            if (q.bits, q.group_size) != (bits, group_size) or tuple(compensated.shape) != (n, k):
                raise ValueError(f"the GPTQ start is {q.bits}-bit in groups of {q.group_size} for "
                                 f"{list(compensated.shape)}, not {bits}-bit in groups of {group_size} for [{n}, {k}]")
            scale, zero = q.scales.to(torch.float32), q.zeros.to(torch.float32)
            if not bool((zero == zero.round()).all()):
                raise ValueError("the GPTQ start has fractional zero points (grid rtn); use rtn_int or rtn_sym")
            self.base = compensated.detach().to(torch.float32, copy=True)
            self.range_lo, self.range_hi = -zero * scale, (2**bits - 1 - zero) * scale
            logit = torch.zeros(n, groups)
        self.upper = nn.Parameter(logit.clone())
        self.lower = nn.Parameter(logit.clone())
        self.lora_a = nn.Parameter(torch.empty(rank, k))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(n, rank))
        self.scaling = 1.0 / rank
        self.rate: float | None = 1.0

    def adjusted(self) -> torch.Tensor:
        """``W' = W + (1/r) · B A`` (``W̃`` for ``W`` after a GPTQ start) in fp32."""
        return (self.weight if self.base is None else self.base) + (self.lora_b @ self.lora_a) * self.scaling

    def _params(self, wg: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base is None:
            lo = torch.where(mask, wg, torch.inf).amin(-1) * torch.sigmoid(self.lower)
            hi = torch.where(mask, wg, -torch.inf).amax(-1) * torch.sigmoid(self.upper)
        else:
            lo, hi = self.range_lo * 2 * torch.sigmoid(self.lower), self.range_hi * 2 * torch.sigmoid(self.upper)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / (2**self.bits - 1)).clamp(min=MIN_SCALE)
        return s, torch.round(-lo / s).detach()

    def fake_quantized(self, rate: float = 1.0) -> torch.Tensor:
        """``Ŵ`` with the first ``⌈rate · G⌉`` groups of every row quantized, the rest at ``W'``."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self.adjusted()
            n, k = w.shape
            wg, mask = grouped(w, self.group_size)
            s, z = self._params(wg, mask)
            q = (_round_ste(wg / s[..., None]) + z[..., None]).clamp(0, 2**self.bits - 1)
            fake = (q - z[..., None]) * s[..., None]
            if rate < 1:
                first = torch.arange(wg.shape[1], device=w.device) < math.ceil(rate * wg.shape[1])
                fake = torch.where(first[None, :, None], fake, wg)
            return fake.reshape(n, -1)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.rate is None else self.fake_quantized(self.rate)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def quantized(self) -> Quantized:
        """The learned quantization of ``W'`` (every group), parameters stored as float16."""
        w = self.adjusted()
        n, k = w.shape
        wg, mask = grouped(w, self.group_size)
        s, z = as_stored(*self._params(wg, mask))
        codes = group_codes(wg, s, z, self.bits).view(n, -1)[:, :k].to(torch.uint8)
        return Quantized(codes.contiguous(), s.to(torch.float16), z.to(torch.float16), self.bits, self.group_size)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"in_features={k}, out_features={n}, bits={self.bits}, group_size={self.group_size}, rate={self.rate}"
