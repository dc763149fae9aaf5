"""Layer Fused Decoding (Sun et al., "LFD: Layer Fused Decoding to Exploit External Knowledge in
Retrieval-Augmented Generation", 2025): the next-token logits get an intermediate layer's logit-lens
logits added, so what the middle layers took from the context is not overwritten by the late
layers' parametric memory.

For a model of ``L`` layers, ``φ(h) = lm_head(final_norm(h))`` (the logit lens) and ``h_l`` the output
of layer ``l`` at the position being predicted::

    z      = φ(h_{L-1})                         (the model's own logits)
    z_LFD  = z + w · φ(h_{l*})                  (w = ``weight``; w = 0 leaves z as it is)

``l*`` is a fixed layer, or (``layer="auto"``) the candidate with the lowest internal knowledge
score among the latter half of the layers, ``C = {⌊L/2⌋, …, L-2}``::

    m_l    = h_l − FFN_l(…)                     (the residual stream entering layer l's FFN)
    IKS_l  = JSD(softmax φ(m_l) ‖ softmax φ(h_l))  (how far layer l's FFN moves the prediction)
    l*     = argmin_{l ∈ C} IKS_l               (per row; ties go to the earlier layer)

``select="step"`` recomputes ``l*`` at every decoding step from that step's activations;
``select="prompt"`` computes it once per row at the prompt's last token (the first call of the
output head) and keeps it for the rest of the generation. Everything stays on the device: no host
sync per layer or per step.

The fusion is installed by :func:`layer_fused` as forward hooks (the candidate layers' outputs and,
for ``"auto"``, their FFN outputs are captured; ``lm_head``'s output is replaced by ``z_LFD``) and
removed when the block ends, also when it raises. Where the family soft-caps its final logits
(Gemma 2), the cap applies to ``z_LFD``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..adapters.architecture import Adapter

SELECTS = ("step", "prompt")


@dataclass(frozen=True)
class LayerFusedDecoding:
    """Fuse layer ``layer`` (an index, or ``"auto"``: the lowest-IKS layer of the latter half) into the
    final logits with weight ``weight``; ``select`` says when ``"auto"`` chooses (module docstring)."""

    layer: int | str = "auto"
    weight: float = 1.0
    select: str = "step"

    def __post_init__(self):
        if not (self.layer == "auto" or (isinstance(self.layer, int) and not isinstance(self.layer, bool))):
            raise ValueError(f"LayerFusedDecoding layer must be a layer index or 'auto', got {self.layer!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"LayerFusedDecoding weight must be a finite number >= 0, got {self.weight!r}")
        if self.select not in SELECTS:
            raise ValueError(f"LayerFusedDecoding select must be one of {SELECTS}, got {self.select!r}")

    def check(self, adapter: Adapter) -> None:
        """Raise ValueError unless the layer (or the auto candidates) exist below the model's last layer."""
        last = adapter.num_layers - 1
        if self.layer == "auto":
            if not candidates(adapter.num_layers):
                raise ValueError(f"LayerFusedDecoding layer='auto' needs at least 3 layers; {adapter.name} has "
                                 f"{adapter.num_layers}")
        elif not 0 <= self.layer < last:
            raise ValueError(f"LayerFusedDecoding layer {self.layer} out of range: {adapter.name} has layers "
                             f"0..{last}, and the fused layer must be below the last one (0..{last - 1})")


def candidates(num_layers: int) -> list[int]:
    """The layers ``"auto"`` chooses from: the latter half, the last layer left out (it is ``z`` itself)."""
    return list(range(num_layers // 2, num_layers - 1))


def jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats) between the softmax distributions of two logit tensors, over
    the last dimension, in float32."""
    lp, lq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


class _Fusion:
    """The hooks' shared state: captured hidden states and the fused-logit computation."""

    def __init__(self, adapter: Adapter, spec: LayerFusedDecoding):
        self.adapter, self.spec = adapter, spec
        self.norm, self.head = adapter.final_norm, adapter.lm_head
        self.layers = candidates(adapter.num_layers) if spec.layer == "auto" else [spec.layer]
        self.outputs: dict[int, torch.Tensor] = {}
        self.ffn: dict[int, torch.Tensor] = {}
        self.kept: torch.Tensor | None = None     # select="prompt": [B] chosen layer per row
        self.chosen: torch.Tensor | None = None   # the last call's [B, k] chosen layer (diagnostics)
        self.scores: torch.Tensor | None = None   # the last call's [C, B, k] IKS (auto)
        self.busy = False                         # lens() calls lm_head: its hook must not fuse those calls

    def lens(self, hidden: torch.Tensor) -> torch.Tensor:
        self.busy = True
        try:
            return self.head(self.norm(hidden))
        finally:
            self.busy = False

    def capture_output(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[layer] = hidden.detach().clone()
        return hook

    def capture_ffn(self, layer: int):
        post = getattr(self.adapter.layers[layer], "post_feedforward_layernorm", None) \
            if self.adapter.family.sandwich else None

        def hook(module, args, output):
            self.ffn[layer] = (post(output) if post is not None else output).detach().clone()
        return hook

    def need_scores(self) -> bool:
        return self.spec.layer == "auto" and (self.spec.select == "step" or self.kept is None)

    def taken(self, store: dict[int, torch.Tensor], layer: int, k: int, what: str) -> torch.Tensor:
        if layer not in store:
            raise RuntimeError(f"LFD: layer {layer}'s {what} was not computed in this forward (a skipped layer or "
                               f"FFN cannot be fused or scored)")
        return store[layer][:, -k:]

    def iks(self, k: int) -> torch.Tensor:
        """[C, B, k] IKS of every candidate at the last ``k`` positions."""
        rows = []
        for layer in self.layers:
            out = self.taken(self.outputs, layer, k, "output")
            ffn = self.taken(self.ffn, layer, k, "FFN output")
            if ffn.shape != out.shape:
                raise RuntimeError(f"LFD: layer {layer}'s FFN ran on {ffn.shape[0]} of {out.shape[0]} rows (row "
                                   f"skipping); layer='auto' needs every row's FFN")
            rows.append(jsd(self.lens(out - ffn), self.lens(out)))
        return torch.stack(rows)

    def fuse(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, k, V] (the model's own, last k positions) → z_LFD."""
        k = logits.shape[1]
        if self.spec.layer != "auto":
            index = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
        elif self.need_scores():
            self.scores = self.iks(k)
            index = self.scores.argmin(0)
            if self.spec.select == "prompt":
                self.kept = index[:, -1]
        else:
            index = self.kept[:, None].expand(logits.shape[:2])
        hidden = torch.stack([self.taken(self.outputs, layer, k, "output") for layer in self.layers])
        picked = hidden.gather(0, index[None, :, :, None].expand(1, *hidden.shape[1:]))[0]
        self.chosen = torch.tensor(self.layers, device=logits.device)[index]
        self.outputs.clear()
        self.ffn.clear()
        return logits + self.spec.weight * self.lens(picked).to(logits.dtype)

    def head_hook(self, module, args, output):
        return None if self.busy else self.fuse(output)


@contextlib.contextmanager
def layer_fused(model, spec: LayerFusedDecoding):
    """Within the block, ``model``'s logits are ``z_LFD`` (module docstring); the block yields the
    fusion's state (``.chosen``: the last forward's chosen layer per row and position). With
    ``select="prompt"`` the first forward in the block chooses for the whole block (one ``generate``).
    ValueError before any hook is installed if the model has no adapter or ``spec`` does not fit it."""
    if not isinstance(spec, LayerFusedDecoding):
        raise ValueError(f"lfd must be a splice.LayerFusedDecoding, got {type(spec).__name__}")
    adapter = Adapter(model)
    spec.check(adapter)
    fusion = _Fusion(adapter, spec)
    handles = []
    try:
        for layer in fusion.layers:
            handles.append(adapter.layers[layer].register_forward_hook(fusion.capture_output(layer)))
            if spec.layer == "auto":
                handles.append(adapter.layers[layer].mlp.register_forward_hook(fusion.capture_ffn(layer)))
        handles.append(fusion.head.register_forward_hook(fusion.head_hook))
        yield fusion
    finally:
        for handle in handles:
            handle.remove()
