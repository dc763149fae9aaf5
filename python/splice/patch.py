"""``splice.patch(model, ...) -> Patch``: install interventions on a loaded model, reversibly.

Everything is validated before the model is touched; a failed call leaves it as it was.
``Patch.remove()`` (or leaving a ``with`` block) restores the original forwards, after which the
model's outputs are bit-identical to before the patch.

Steering is organised in *slots*: slot 0 never steers; each other slot holds an ordered list of
interventions with their scales. Every batch row uses the default slot (1, holding the
interventions given to ``patch``) until :meth:`Patch.assign` gives rows their own slots.
Changing a slot or an assignment writes buffers; it never re-patches.

Layer skipping (:class:`~splice.skipping.spec.Skip`, and per-request routing with a router) is
set with :meth:`Patch.set_skip` / :meth:`Patch.set_router`. Steering on a skipped part of a layer,
or on a routed layer, is refused with an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from .adapters.architecture import Adapter
from .hybrid.layer_policy import LayerPolicy
from .hybrid.reuse_policy import ReusePolicy
from .ops import backend_for
from .recipe import Recipe, check_steering_fits, load_recipe
from .runtime.decoder_layer import make_forward, make_o_proj_forward
from .runtime.hybrid_attention import make_attention_forward
from .runtime.reuse_attention import SlotSelection, make_reuse_forward
from .runtime.splice_runtime import ATTRIBUTE, SpliceRuntime
from .skipping.spec import Skip, skipped_parts
from .steering.slot_entries import INTERVENTIONS, Intervention, row_deciders, slot_entries

SlotItem = Intervention | str | tuple[str, float]


class Patch:
    """A live patch on one model. Use :func:`patch` to make one."""

    def __init__(self, model: nn.Module, adapter: Adapter, runtime: SpliceRuntime, recipe: Recipe):
        self.model, self.adapter, self.runtime = model, adapter, runtime
        self.recipe = recipe
        self.slots: dict[int, list[tuple[str, float]]] = {}
        self.skips: list[Skip] = []
        self.router = None
        self.head_map = None
        self.reuse = None
        self._spliced: list[nn.Module] = []
        self.active = True

    # --- configuration -------------------------------------------------------------------
    @property
    def steers(self) -> dict[str, Intervention]:
        """The registered interventions, by name."""
        return self.recipe.steers

    def _resolve(self, items: Iterable[SlotItem]) -> list[tuple[str, float]]:
        resolved = []
        for item in items:
            if isinstance(item, INTERVENTIONS):
                name = item.name or f"steer{len(self.steers)}"
                if name in self.steers and self.steers[name] is not item:
                    raise ValueError(f"an intervention named {name!r} is already registered")
                item.validate_for(self.adapter)
                item.name = name
                self.steers[name] = item
                resolved.append((name, item.scale))
                continue
            name, scale = (item, None) if isinstance(item, str) else item
            if name not in self.steers:
                raise KeyError(f"unknown intervention {name!r}; registered: {sorted(self.steers)}")
            scale = self.steers[name].scale if scale is None else float(scale)
            if scale != scale or scale in (float("inf"), float("-inf")):
                raise ValueError(f"scale for {name!r} must be a finite number, got {scale}")
            resolved.append((name, scale))
        return resolved

    def set_slot(self, slot: int, items: Iterable[SlotItem]) -> None:
        """Give ``slot`` (1..max_slots-1) the interventions ``items``: ``Steer``, ``LowRank``,
        ``Affine`` or ``HeadScale`` objects, names of registered ones, or ``(name, scale)`` pairs. An
        empty list clears the slot. A prefill decision (e.g. a ``Condition`` gate) takes effect from
        the next prefill."""
        self._check_active()
        if not 1 <= slot < self.runtime.tables.max_slots:
            raise ValueError(f"slot must be in 1..{self.runtime.tables.max_slots - 1} (slot 0 never steers)")
        resolved = self._resolve(list(items))
        self._check_steering_fits(resolved, self.runtime.skip.static, self._routed_layers())
        self.runtime.gates.check_room(row_deciders(self.steers, [name for name, _ in resolved]))
        entries = slot_entries(self.steers, resolved, self.adapter, self.runtime.gates.column)
        self.runtime.tables.write_slot(slot, entries)
        for layer, site in entries:
            if site == "heads":
                self._splice_o_proj(layer)
        if resolved:
            self.slots[slot] = resolved
        else:
            self.slots.pop(slot, None)
        self.runtime.state.default_slot = 1 if 1 in self.slots else 0

    def set_skip(self, *skips: Skip) -> None:
        """Skip these layers or sub-layers from now on (replacing earlier skips); none: run all."""
        self._check_active()
        if skips and self.reuse is not None:
            raise ValueError("layer skips cannot be combined with layer reuse (reuse=) yet")
        for skip in skips:
            skip.validate_for(self.adapter)
        parts = skipped_parts(skips, self.adapter.num_layers)
        routed = self._routed_layers()
        _check_no_overlap(skips, routed)
        self._check_steering_fits(self._slot_items(), parts, routed)
        self.skips = list(skips)
        self.runtime.skip.static = parts

    def set_router(self, router) -> None:
        """Route requests with ``router`` (decided at prefill, applied while decoding); None: off."""
        self._check_active()
        if router is not None:
            if self.reuse is not None:
                raise ValueError("per-request routing cannot be combined with layer reuse (reuse=) yet")
            router.validate_for(self.adapter)
            self._check_head_map(self.head_map, router)
            _check_no_overlap(self.skips, router.layers)
            self._check_steering_fits(self._slot_items(), self.runtime.skip.static, router.layers)
        self.router = router
        self.runtime.skip.router = router
        self.runtime.skip.rows = [None] * self.adapter.num_layers

    def _check_head_map(self, head_map, router) -> None:
        if head_map is None:
            return
        head_map.validate_for(self.adapter)
        if router is not None:
            raise ValueError("hybrid attention and per-request routing cannot be combined yet")

    def _install_head_map(self, head_map) -> None:
        self.head_map = head_map
        for idx, layer in enumerate(self.adapter.layers):
            if head_map.streaming(idx):
                layer.self_attn.forward = make_attention_forward(self.adapter, idx, head_map, self.runtime)
                self._spliced.append(layer.self_attn)

    def _install_reuse(self, policy: ReusePolicy) -> None:
        self.reuse = policy
        selection = SlotSelection()
        for idx in (*policy.selecting_layers, *policy.reuse_layers):
            attn = self.adapter.layers[idx].self_attn
            attn.forward = make_reuse_forward(self.adapter, idx, policy, self.runtime, selection)
            self._spliced.append(attn)

    def _slot_items(self) -> list[tuple[str, float]]:
        return [item for items in self.slots.values() for item in items]

    def _routed_layers(self) -> list[int]:
        return list(self.router.layers) if self.router is not None else []

    def _check_steering_fits(self, resolved, parts, routed) -> None:
        check_steering_fits(self.steers, [name for name, _ in resolved], parts, routed)

    def assign(self, row_slots: list[int] | None) -> None:
        """Slot of each batch row for the following forward passes; None: every row the default slot."""
        self._check_active()
        if row_slots is not None:
            bad = [s for s in row_slots if not 0 <= int(s) < self.runtime.tables.max_slots]
            if bad:
                raise ValueError(f"row slots {bad} out of range 0..{self.runtime.tables.max_slots - 1}")
            row_slots = [int(s) for s in row_slots]
        self.runtime.state.assign(row_slots)

    # --- life cycle ----------------------------------------------------------------------
    def _install(self) -> None:
        for idx, layer in enumerate(self.adapter.layers):
            layer.forward = make_forward(self.adapter, idx, self.runtime)
            self._spliced.append(layer)

    def _splice_o_proj(self, layer_idx: int) -> None:
        linear = self.adapter.o_proj(layer_idx)
        if "forward" not in vars(linear):
            linear.forward = make_o_proj_forward(self.adapter, layer_idx, self.runtime)
            self._spliced.append(linear)

    def remove(self) -> None:
        """Restore the model's original forwards and drop splice's buffers."""
        if not self.active:
            return
        for module in self._spliced:
            del module.forward
        self._spliced.clear()
        delattr(self.model, ATTRIBUTE)
        self.active = False

    def _check_active(self) -> None:
        if not self.active:
            raise RuntimeError("this patch was removed")

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- reporting -----------------------------------------------------------------------
    def backends(self) -> dict[str, str]:
        """The backend each splice op runs for this model's device."""
        device = self.adapter.device
        names = (["fused_steer"] + (["gather_rows", "scatter_rows"] if self.router is not None else [])
                 + (["band_attention", "decode_attention"] if self.head_map is not None else [])
                 + (["index_attention"] if self.reuse is not None else []))
        return {name: backend_for(name, device) for name in names}

    def to_recipe(self) -> Recipe:
        """The patch as a recipe: its registered interventions, the default slot's list, the skips
        and the router (when it was loaded from a file)."""
        return Recipe(steers=dict(self.steers), default=list(self.slots.get(1, [])), skips=list(self.skips),
                      router=self.router)

    def save_recipe(self, path: str | Path) -> Path:
        """Write the patch as a recipe file; in-memory vectors are saved beside it."""
        return self.to_recipe().save(path)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        skips = f"; skips {[(s.part, list(s.layers)) for s in self.skips]}" if self.skips else ""
        routed = f"; router on layers {list(self.router.layers)}" if self.router is not None else ""
        return (f"Patch({self.adapter.describe()}; {len(self.steers)} interventions; slots {self.slots}"
                f"{skips}{routed}; {state})")


def _check_no_overlap(skips, routed) -> None:
    overlap = sorted({l for s in skips for l in s.layers} & set(routed))
    if overlap:
        raise ValueError(f"layers {overlap} are both skipped statically and routed per request")


def _policy_heads(policy, adapter: Adapter, heads):
    """The head map of ``policy``'s window layers (None without any), after checking the policy."""
    if not isinstance(policy, LayerPolicy):
        raise TypeError(f"policy must be a LayerPolicy, got {type(policy).__name__}")
    policy.validate_for(adapter)
    if heads is not None and policy.window_layers:
        raise ValueError("give streaming layers through the policy or through heads=, not both")
    return policy.head_map(adapter) if policy.window_layers else heads


def _check_reuse(reuse, adapter: Adapter, others: dict) -> None:
    """A reuse policy fits the model and runs alone among the attention-changing options."""
    if not isinstance(reuse, ReusePolicy):
        raise TypeError(f"reuse must be a ReusePolicy, got {type(reuse).__name__}")
    reuse.validate_for(adapter)
    given = [name for name, value in others.items() if value]
    if given:
        raise ValueError(f"layer reuse (reuse=) cannot be combined with {', '.join(given)} yet: they change "
                         "which layers attend, and a reusing layer needs its full layer to run")


def patch(model: nn.Module, *items: Intervention | Skip, recipe=None, router=None, heads=None, policy=None,
          reuse=None, max_slots: int = 8) -> Patch:
    """Patch ``model`` with steering (``Steer``), layer skipping (``Skip``), a per-request
    ``router``, hybrid attention (``heads``: a :class:`~splice.hybrid.head_map.HeadMap`), a
    per-layer attention ``policy`` (a :class:`~splice.hybrid.layer_policy.LayerPolicy`: its window
    layers become a head map, its none layers ``Skip(layers, "attn")``), HyLRA layer ``reuse`` (a
    :class:`~splice.hybrid.reuse_policy.ReusePolicy`, alone among these attention options) and/or a
    recipe (a path, a dict or a :class:`Recipe`).

    The given interventions (the recipe's default list first) fill slot 1, which every row uses
    until :meth:`Patch.assign` says otherwise. ``max_slots`` bounds the distinct steering
    configurations a batch can carry at once (slot 0 included).
    """
    adapter = Adapter(model)
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("model is already patched by splice; call remove() on that patch first")
    if max_slots < 2:
        raise ValueError("max_slots must be at least 2 (slot 0 never steers)")
    unknown = [type(i).__name__ for i in items if not isinstance(i, (*INTERVENTIONS, Skip))]
    if unknown:
        raise TypeError(f"splice.patch takes Steer, LowRank, Affine, HeadScale and Skip objects, got {unknown}")
    recipe = load_recipe(recipe) if recipe is not None else Recipe()
    recipe.validate_for(adapter)
    steers = [i for i in items if isinstance(i, INTERVENTIONS)]
    skips = list(recipe.skips) + [i for i in items if isinstance(i, Skip)]
    if policy is not None:
        heads = _policy_heads(policy, adapter, heads)
        skips += [Skip(policy.none_layers, "attn")] if policy.none_layers else []
    router = router if router is not None else recipe.router
    if reuse is not None:
        _check_reuse(reuse, adapter, {"skips": skips, "router": router is not None, "heads": heads is not None,
                                      "policy": policy is not None})
    for steer in steers:
        steer.validate_for(adapter)
    runtime = SpliceRuntime(adapter, max_slots)
    handle = Patch(model, adapter, runtime, recipe)
    default = list(recipe.default) + steers
    resolved = handle._resolve(default)  # registers and checks names before the model changes
    handle.set_skip(*skips)
    handle.set_router(router)
    handle._check_head_map(heads, router)
    handle._check_steering_fits(resolved, runtime.skip.static, handle._routed_layers())
    model.add_module(ATTRIBUTE, runtime)
    handle._install()
    if heads is not None:
        handle._install_head_map(heads)
    if reuse is not None:
        handle._install_reuse(reuse)
    if default:
        handle.set_slot(1, default)
    return handle

