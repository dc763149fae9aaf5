"""Training a steering :class:`~splice.steering.controller.Controller` (Guiding Giants) on CPU.

The controller should steer where steering is wanted and leave the rest alone. Guiding Giants
trains it on harmful and benign prompts against the behaviour each should get; splice states that
behaviour as a teacher: on ``steer`` prompts, the model steered by ``vector`` at ``layers`` with
``scale`` on every token; on ``keep`` prompts, the unsteered model. The loss is the KL divergence
from the teacher's next-token distributions to the controlled model's, averaged over the last
``positions`` tokens of every prompt (where the answer starts; the full vocabulary at every token
would cost more than the rest of the step); only the controller's parameters learn (Adam). The controller reads the
pooled input of ``read_layer``, which must precede the steered layers (so its decision, made at
prefill, covers the whole prompt there too, exactly as in training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters.architecture import Adapter
from ..patch import patch
from ..steering.controller import Controller, controller_gates
from ..steering.spec import Steer
from ..vectors.vector_set import VectorSet
from .condition_fit import condition_activations

MIN_PROMPTS = 4


def _forward(model, enc, keep: int, hooks=()):
    """Logits of the last ``keep`` positions (left padding: real tokens of every row)."""
    mask = enc["attention_mask"]
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    layers = Adapter(model).layers
    handles = [layers[l].register_forward_hook(h) for l, h in hooks]
    try:
        return model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False,
                     logits_to_keep=keep).logits
    finally:
        for h in handles:
            h.remove()


def train_controller(model, tokenizer, steer: Sequence[str], keep: Sequence[str], vector: VectorSet,
                     layers: Sequence[int], scale: float, read_layer: int, units: int = 32, steps: int = 40,
                     lr: float = 1e-2, positions: int = 4, seed: int = 0, progress: bool = True) -> tuple[Controller, Steer, dict]:
    """A controller and the Steer it gates (``vector`` at ``layers`` with ``scale``), trained as the
    module docstring says; the report has the loss curve and the mean gates on each set."""
    adapter = Adapter(model)
    layers = sorted(set(layers))
    if not 0 <= read_layer < layers[0] or layers[-1] >= adapter.num_layers:
        raise ValueError(f"read_layer {read_layer} must precede the steered layers {layers} (model layers "
                         f"0..{adapter.num_layers - 1})")
    for name, prompts in (("steer", steer), ("keep", keep)):
        if isinstance(prompts, str) or len(prompts) < MIN_PROMPTS:
            raise ValueError(f"a controller needs at least {MIN_PROMPTS} {name} prompts")
    missing = [l for l in layers if l not in vector.directions]
    if missing or vector.hidden_size != adapter.hidden_size:
        raise ValueError(f"the vector must cover layers {layers} with the model's hidden size {adapter.hidden_size}")
    torch.manual_seed(seed)
    prompts = [*steer, *keep]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = {k: v.to(adapter.device) for k, v in tokenizer(prompts, padding=True, return_tensors="pt").items()}
    finally:
        tokenizer.padding_side = side
    feats = condition_activations(model, tokenizer, prompts, [read_layer], "mean", progress=False)[:, 0]
    positions = min(positions, int(enc["attention_mask"].sum(1).min()))
    with torch.no_grad():
        with patch(model, Steer(vector, layers=layers, scale=scale)):
            steered = _forward(model, enc, positions)
        plain = _forward(model, enc, positions)
        teacher = torch.where(torch.arange(len(prompts))[:, None, None] < len(steer), steered, plain).log_softmax(-1)
    units_w = torch.randn(units, adapter.hidden_size) / adapter.hidden_size ** 0.5
    params = {"w1": units_w, "c1": torch.zeros(units), "w2": torch.zeros(1 + len(layers), units),
              "c2": torch.zeros(1 + len(layers))}
    for t in params.values():
        t.requires_grad_(True)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    opt = torch.optim.Adam(params.values(), lr=lr)
    directions = {l: vector[l].to(adapter.device) for l in layers}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    curve = []
    try:
        for _ in tqdm(range(steps), disable=not progress, desc="controller", unit="step"):
            opt.zero_grad()
            gates = controller_gates(feats, *params.values(), mean, std)

            def hook_for(j, l):
                def hook(module, args, out):
                    u = out[0] if isinstance(out, tuple) else out
                    u = u + (gates[:, j] * scale)[:, None, None] * directions[l]
                    return (u,) + tuple(out[1:]) if isinstance(out, tuple) else u
                return hook
            logits = _forward(model, enc, positions, [(l, hook_for(j, l)) for j, l in enumerate(layers)])
            loss = F.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1).mean()
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    controller = Controller(**{k: v.detach() for k, v in params.items()}, mean=mean, std=std, layer=read_layer,
                            layers=layers, name="controller")
    with torch.no_grad():
        final = controller.gates(feats)
    report = {"read_layer": read_layer, "layers": layers, "scale": scale, "units": units, "steps": steps, "lr": lr,
              "positions": positions,
              "steer_prompts": len(steer), "keep_prompts": len(keep), "loss_first": curve[0], "loss_last": curve[-1],
              "curve": curve, "mean_gate_steer": final[:len(steer)].mean(0).tolist(),
              "mean_gate_keep": final[len(steer):].mean(0).tolist()}
    return controller, Steer(vector, layers=layers, scale=scale, gate=controller, name="controlled"), report
