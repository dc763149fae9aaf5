"""Host-side checks of index values, shared by the references and the Triton wrappers."""

from __future__ import annotations

import torch


def first_out_of_range(values: torch.Tensor, bound: int) -> int | None:
    """Position of the first of ``values`` outside ``[0, bound)``, or None. Looks only at CPU tensors
    outside compilation (else None): reading CUDA values would wait for the GPU, so the kernels check
    those on the device."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    bad = ((values < 0) | (values >= bound)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None
