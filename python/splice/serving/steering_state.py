"""Worker-side steering state of a served model: fixed-size tables, a slot per steering
configuration, and the per-row / per-token buffers the model's steering ops read.

Everything the compiled model reads is allocated once at load time and only written in place
(vLLM compiles the forward once and never re-checks guards, so a table must never appear, grow or
disappear). Rows are vLLM's persistent-batch indices; :meth:`ServeSteering.update` follows vLLM's
``BatchUpdate`` (removed, added, moved), and :meth:`ServeSteering.prepare` maps each token of the
step to its row through the attention metadata's ``query_start_loc``, before the compiled model runs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch
from torch import nn

from ..runtime.steering_tables import Key, SteeringTables
from ..steering.slot_entries import row_deciders, slot_entries
from ..vectors.vector_set import SITES
from .prefill_decisions import PrefillDecisions
from .request_params import parse

_CURRENT: "ServeSteering | None" = None


def current() -> "ServeSteering | None":
    """The state of the model this worker process serves (None: not a splice server)."""
    return _CURRENT


def set_current(state: "ServeSteering | None") -> None:
    global _CURRENT
    _CURRENT = state


class FixedTables(SteeringTables):
    """:class:`SteeringTables` allocated once with ``capacity[key]`` entries per slot, never dropped."""

    def __init__(self, max_slots: int, site_sizes: dict[str, int], device, capacity: dict[Key, int]):
        super().__init__(max_slots, site_sizes, device)
        for key, entries in capacity.items():
            super()._ensure(key, entries)

    def _ensure(self, key: Key, entries: int) -> None:
        vecs, _ = self.get(*key)
        if vecs is None or vecs.shape[1] < entries:
            raise RuntimeError(f"splice: steering table {key} holds {0 if vecs is None else vecs.shape[1]} "
                               f"entries per slot, {entries} needed")

    def _drop_if_unused(self, key: Key) -> None:
        """Never drop a table: the compiled graph reads every table the recipe declared."""


def entry_counts(steer, shape) -> dict[Key, int]:
    """Table entries one intervention takes at each ``(layer, site)`` (a vector one, a gated one two,
    a rank-r map 2r; a vector behind a CAST condition two)."""
    size = shape.site_size(steer.site)  # any row-gate column gives the count; 0 stands for the real one
    return {(layer, steer.site): len(steer.entries(layer, steer.scale, size, 0)) for layer in steer.layers}


def table_capacity(steers: dict, shape, per_request: int, registry_tables: dict[str, int] | None = None) -> dict[Key, int]:
    """Entries per slot each ``(layer, site)`` table holds: the sum of the ``per_request`` largest
    entry counts of the recipe's interventions there, raised to ``registry_tables[site]`` at every
    layer for the sites interventions registered at run time may use."""
    counts: dict[Key, list[int]] = {}
    for steer in steers.values():
        for key, n in entry_counts(steer, shape).items():
            counts.setdefault(key, []).append(n)
    capacity = {key: sum(sorted(c, reverse=True)[:per_request]) for key, c in counts.items()}
    for site, entries in (registry_tables or {}).items():
        for layer in range(shape.num_layers):
            capacity[(layer, site)] = max(capacity.get((layer, site), 0), entries)
    return dict(sorted(capacity.items()))


def overflow(counts: list[dict[Key, int]], capacity: dict[Key, int]) -> str | None:
    """Why interventions with these entry counts cannot share one slot (None: they fit)."""
    total = sum((Counter(c) for c in counts), Counter())
    for (layer, site), n in sorted(total.items()):
        room = capacity.get((layer, site), 0)
        if n > room:
            return (f"{n} table entries at layer {layer} site {site!r}, which holds {room} per request"
                    + (" (no table there: the server's recipe and registry_tables give none)" if not room else ""))
    return None


class SlotPool:
    """Steering configuration -> table slot (1..n-1), reference-counted by the rows using it.
    Unused slots keep their contents and are reused least recently released first."""

    def __init__(self, num_slots: int):
        self.slot_of: dict[tuple, int] = {}
        self.refs = [0] * num_slots
        self.idle: OrderedDict[int, tuple | None] = OrderedDict((s, None) for s in range(1, num_slots))

    def acquire(self, items: tuple) -> tuple[int, bool]:
        """(slot, whether its tables must be written)."""
        slot = self.slot_of.get(items)
        fresh = slot is None
        if fresh:
            if not self.idle:
                raise RuntimeError("splice: no free steering slot (more configurations in flight than max_slots)")
            slot, old = self.idle.popitem(last=False)
            self.slot_of.pop(old, None)
            self.slot_of[items] = slot
        else:
            self.idle.pop(slot, None)
        self.refs[slot] += 1
        return slot, fresh

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            owner = next(k for k, s in self.slot_of.items() if s == slot)
            self.idle[slot] = owner


class ServeSteering(nn.Module):
    """Tables, slots and row/token buffers for one served model (attached as ``splice_serving``).
    ``lookup(name, version)`` gives a registered intervention (:class:`~.registry.Registry.load`)."""

    def __init__(self, adapter, recipe, max_rows: int, max_tokens: int, options, lookup=None):
        super().__init__()
        self.adapter, self.recipe, self.lookup = adapter, recipe, lookup
        capacity = table_capacity(recipe.steers, adapter, options.max_vectors_per_request, options.registry_tables)
        sizes = {site: adapter.site_size(site) for site in SITES}
        device = adapter.device
        slots = min(max_rows, options.max_slots or max_rows) + 1
        self.tables = FixedTables(slots, sizes, device, capacity)
        self.pool = SlotPool(slots)
        self.per_request = options.max_vectors_per_request
        self.register_buffer("row_slot", torch.zeros(max_rows, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("row_prompt", torch.zeros(max_rows, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot", torch.zeros(max_tokens, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("gen", torch.zeros(max_tokens, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("token", torch.arange(max_tokens, dtype=torch.int32, device=device), persistent=False)
        self.decisions = PrefillDecisions(row_deciders(recipe.steers, recipe.steers), max_rows, max_tokens, device)
        self.row_slots = [0] * max_rows  # host copy, for releasing slots
        self.steered_rows = 0

    # --- rows (vLLM's persistent batch) ------------------------------------------------------
    def _set_row(self, row: int, slot: int, prompt_len: int) -> None:
        if self.row_slots[row]:
            self.pool.release(self.row_slots[row])
            self.steered_rows -= 1
        self.row_slots[row] = slot
        self.steered_rows += slot != 0
        self.row_slot[row] = slot
        self.row_prompt[row] = prompt_len
        self.decisions.reset(row)

    def _intervention(self, name: str, version: str):
        if not version:
            return self.recipe.steers[name]
        if self.lookup is None:
            raise ValueError(f"{name!r} names a registered intervention; this server has no registry")
        return self.lookup(name, version)

    def _slot_for(self, extra_args) -> int:
        """The slot of a request's (middleware-checked, canonical) steering; 0 when unsteered."""
        steering = parse(extra_args)
        if steering is None:
            return 0
        if len(steering.items) > self.per_request:
            raise ValueError(f"{len(steering.items)} vectors in one request; max_vectors_per_request is {self.per_request}")
        steers = {n: self._intervention(n, v) for (n, _), v in zip(steering.items, steering.versions)}
        deciders = row_deciders(steers, steers)
        column_of = self.decisions.column_of if deciders else None
        entries = slot_entries(steers, steering.items, self.adapter, column_of)  # raises before a slot is taken
        slot, fresh = self.pool.acquire((steering.items, steering.versions))
        if fresh:
            self.tables.write_slot(slot, entries)
        self.decisions.use(slot, deciders)
        return slot

    def update(self, batch_update) -> None:
        """Apply vLLM's BatchUpdate: removed, then added, then moved (its documented order)."""
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for row in batch_update.removed:
            self._set_row(row, 0, 0)
        for row, params, prompt_ids, _ in batch_update.added:
            slot = self._slot_for(params.extra_args if params is not None else None)
            self._set_row(row, slot, len(prompt_ids) if prompt_ids is not None else 0)
        for a, b, direction in batch_update.moved:
            slot_a, prompt_a = self.row_slots[a], int(self.row_prompt[a])
            if direction == MoveDirectionality.SWAP:
                slot_b, prompt_b = self.row_slots[b], int(self.row_prompt[b])
                self.row_slots[a], self.row_slots[b] = slot_b, slot_a
                self.row_slot[a], self.row_prompt[a] = slot_b, prompt_b
                self.decisions.swap(a, b)
            else:
                self.row_slots[a] = 0
                self.row_slot[a], self.row_prompt[a] = 0, 0
                if self.row_slots[b]:
                    self.pool.release(self.row_slots[b])
                    self.steered_rows -= 1
                self.decisions.move(a, b)
            self.row_slots[b] = slot_a
            self.row_slot[b], self.row_prompt[b] = slot_a, prompt_a

    # --- tokens (one forward step) -----------------------------------------------------------
    def prepare(self, positions: torch.Tensor) -> None:
        """Fill ``slot[:T]``, ``gen[:T]`` and ``pos[:T]`` (for sites whose module is not handed the
        positions) for this step's ``T`` tokens (before the compiled model)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        tokens = positions.shape[0]
        if tokens > self.slot.shape[0]:
            raise RuntimeError(f"splice: {tokens} tokens in one step, buffers sized for {self.slot.shape[0]}")
        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(metadata, list):
            raise RuntimeError("splice: micro-batched (DBO) steps are not supported")
        if not self.steered_rows or not metadata:
            self.slot[:tokens].zero_()
            self.decisions.plan_nothing()
            return
        self.pos[:tokens].copy_(positions)
        starts = next(iter(metadata.values())).query_start_loc
        rows = torch.searchsorted(starts[1:], self.token[:tokens], right=True).clamp_(max=starts.numel() - 2)
        torch.index_select(self.row_slot, 0, rows, out=self.slot[:tokens])
        torch.ge(positions, self.row_prompt.index_select(0, rows), out=self.gen[:tokens])
        if self.decisions.deciders:
            self.decisions.plan(rows, positions, self.row_prompt, self.row_slots)
