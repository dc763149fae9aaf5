"""The packed weight format read by ``splice::quant_matmul``: codes in uint8 rows, SIMD-friendly.

Each row of K codes is zero-padded to ``Kp = ceil(K / 64) · 64`` codes and packed into
``Kp · bits / 8`` bytes. A *chunk* is 16 consecutive codes (one AVX-512 register of fp32), the unit
that every kernel decodes; chunk ``c`` covers codes ``16c … 16c + 15``:

* 8 bits: byte ``k`` is code ``k``.
* 4 bits: codes come in tiles of 32 (16 bytes); byte ``j`` of tile ``t`` holds code ``32t + j`` in
  its low nibble and code ``32t + 16 + j`` in its high nibble. Decoding a tile: widen 16 bytes to
  16 int32 lanes, then ``& 15`` and ``>> 4``.
* 2 bits: tiles of 64 codes (16 bytes); byte ``j`` of tile ``t`` holds code ``64t + 16i + j`` in bits
  ``2i, 2i + 1`` (i = 0…3). Decoding: widen once, then ``(v >> 2i) & 3``.
* 3 bits: a 2-bit plane (the low two bits of every code, laid out as for 2 bits, ``Kp / 4`` bytes)
  followed by a 1-bit plane (the high bit, ``Kp / 8`` bytes, code ``k`` at bit ``k % 8`` of byte
  ``k // 8``), so chunk ``c``'s high bits are the little-endian uint16 at plane offset ``2c``: an
  AVX-512 lane mask. Decoding: the 2-bit decode, plus 4 where the mask bit is set.

Padding codes are 0; kernels multiply them by zero-padded activations, so any K works. Scales and
zero points are float16 [N, ceil(K / group_size)]; ``w ≈ (q − z) · s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant_format import Quantized, check_bits_group, dequantize_codes

TILE = 64  # rows are padded to a multiple of this many codes


def padded_k(k: int) -> int:
    return math.ceil(k / TILE) * TILE


def row_bytes(k: int, bits: int) -> int:
    return padded_k(k) * bits // 8


def _pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, Kp] (< 2**bits, bits in 2, 4, 8) -> uint8 [N, Kp · bits / 8] in the tiled layout."""
    n, kp = codes.shape
    per_byte = 8 // bits
    c = codes.to(torch.int32).view(n, kp // (16 * per_byte), per_byte, 16)
    shifts = (torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits).view(1, 1, per_byte, 1)
    return (c << shifts).sum(2).to(torch.uint8).view(n, -1)


def _unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    n = packed.shape[0]
    per_byte = 8 // bits
    b = packed.to(torch.int32).view(n, -1, 1, 16)
    shifts = (torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits).view(1, 1, per_byte, 1)
    return ((b >> shifts) & (2**bits - 1)).view(n, -1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, row_bytes(K, bits)] from integer codes [N, K] in ``[0, 2**bits − 1]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got {tuple(codes.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, padded_k(k) - k))
    if bits != 3:
        return _pack_planes(padded, bits).contiguous()
    high = (padded >> 2).view(n, -1, 8) << torch.arange(8, dtype=torch.int32, device=codes.device)
    return torch.cat([_pack_planes(padded & 3, 2), high.sum(-1).to(torch.uint8)], dim=1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Integer codes uint8 [N, K] from the packed rows (inverse of :func:`pack_codes`)."""
    kp = padded_k(k)
    if bits != 3:
        return _unpack_planes(packed, bits)[:, :k].to(torch.uint8)
    low = _unpack_planes(packed[:, : kp // 4], 2)
    high = (packed[:, kp // 4 :].to(torch.int32)[..., None] >> torch.arange(8, device=packed.device)) & 1
    return (low | (high.view(packed.shape[0], kp) << 2))[:, :k].to(torch.uint8)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized ``[out_features, in_features]`` weight in the packed format (module docstring).

    ``qweight`` uint8 [N, row_bytes(K, bits)], ``scales`` / ``zeros`` float16 [N, ceil(K / group_size)],
    all on one device and contiguous. Every field is validated on construction.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        check_bits_group(self.bits, self.group_size)
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"shape must be (out_features, in_features) > 0, got {self.shape}")
        n, k = self.shape
        groups = math.ceil(k / self.group_size)
        expect = {
            "qweight": (self.qweight, torch.uint8, (n, row_bytes(k, self.bits))),
            "scales": (self.scales, torch.float16, (n, groups)),
            "zeros": (self.zeros, torch.float16, (n, groups)),
        }
        for name, (t, dtype, shape) in expect.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {dtype} {shape} for {self.bits}-bit, group {self.group_size}, "
                                 f"shape {self.shape}; got {t.dtype} {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device}, qweight on {self.qweight.device}")

    @classmethod
    def from_quantized(cls, q: Quantized) -> PackedWeight:
        return cls(pack_codes(q.codes, q.bits), q.scales.contiguous(), q.zeros.contiguous(), q.bits, q.group_size,
                   tuple(q.codes.shape))

    @property
    def nbytes(self) -> int:
        """Bytes used by the packed codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """fp32 ``(q − z) · s`` [N, K]."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size)
