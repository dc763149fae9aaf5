"""Gates decided at prefill (CAST conditions) behind vLLM: one decision per request, made when its
prompt passes the condition's layer and read by every later layer and decode step.

As in ``splice.patch`` (:mod:`splice.runtime.row_gates`), each recipe decider owns ``width``
consecutive columns of a row-gate matrix, which ``splice::fused_steer`` reads per token (its
``gates`` argument). A request's row starts at 0; :meth:`PrefillDecisions.plan` (before the compiled
model runs) finds this step's prompts whose configuration uses a decider, and ``splice::serve_decide``
(inside the compiled layer ``layer``, on its input stream) hands each its prompt's hidden states,
left-padded as Hugging Face's batch would be, and writes the decision into the request's row and
into this step's per-token gates, so layers after ``layer`` see it on the prompt itself.

A decision needs the whole prompt in one step: the server runs without chunked prefill (the
loader refuses it otherwise) and such requests never read the prefix cache (the middleware marks
them; :mod:`.request_rows` sets ``skip_reading_prefix_cache``). A prompt that still arrives split
stops the step with an error rather than deciding from part of it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..steering.gates import RowDecider

_STATE: "PrefillDecisions | None" = None


@torch.library.custom_op("splice::serve_decide", mutates_args=("gates",))
def serve_decide(stream: torch.Tensor, gates: torch.Tensor, layer: int) -> None:
    """Decide this step's pending prompts at ``layer`` from its input ``stream`` [T, H]; write ``gates``."""
    if _STATE is not None:
        _STATE.decide(layer, stream, gates)


@serve_decide.register_fake
def _(stream, gates, layer) -> None:
    return None


class PrefillDecisions(nn.Module):
    def __init__(self, deciders: list[RowDecider], max_rows: int, max_tokens: int, device):
        super().__init__()
        global _STATE
        self.deciders = deciders
        self.columns, width = [], 0
        for decider in deciders:
            self.columns.append(width)
            width += decider.width
        self.layers = {d.layer for d in deciders}
        self.register_buffer("row_gate", torch.zeros(max_rows, max(width, 1), device=device), persistent=False)
        self.register_buffer("gates", torch.zeros(max_tokens, max(width, 1), device=device), persistent=False)
        self.slot_deciders: dict[int, tuple[int, ...]] = {}  # steering slot -> indices of its deciders
        self._pending: dict[int, list[tuple[int, list[int], torch.Tensor, torch.Tensor, list[torch.Tensor]]]] = {}
        _STATE = self if deciders else None

    def _index(self, decider: RowDecider) -> int:
        for i, known in enumerate(self.deciders):
            if known is decider:
                return i
        raise ValueError("a gate decided at prefill must come from the server's recipe (its columns are fixed at load)")

    def column_of(self, decider: RowDecider) -> int:
        """The first gate column of a recipe decider; ValueError for any other."""
        return self.columns[self._index(decider)]

    def use(self, slot: int, deciders: list[RowDecider]) -> None:
        """Record that configuration ``slot`` is gated by ``deciders``."""
        self.slot_deciders[slot] = tuple(self._index(d) for d in deciders)

    # --- rows ----------------------------------------------------------------------------------
    def reset(self, row: int) -> None:
        self.row_gate[row] = 0

    def swap(self, a: int, b: int) -> None:
        self.row_gate[[a, b]] = self.row_gate[[b, a]]

    def move(self, a: int, b: int) -> None:
        self.row_gate[b] = self.row_gate[a]
        self.row_gate[a] = 0

    # --- one step --------------------------------------------------------------------------------
    def plan_nothing(self) -> None:
        """A step with no steered row: nothing to decide."""
        self._pending = {}

    def plan(self, rows: torch.Tensor, positions: torch.Tensor, row_prompt: torch.Tensor, row_slots: list[int]) -> None:
        """Before the compiled model: this step's per-token gates from the rows' decisions so far, and
        the prompts to decide (``rows[t]``: token ``t``'s row, ``positions[t]`` its position)."""
        tokens = rows.shape[0]
        torch.index_select(self.row_gate, 0, rows, out=self.gates[:tokens])
        self._pending = {}
        prompt = positions < row_prompt.index_select(0, rows)
        if not prompt.any():
            return
        order = torch.arange(tokens, device=rows.device)
        groups: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        for row in rows[prompt].unique().tolist():
            used = self.slot_deciders.get(row_slots[row], ())
            if not used:
                continue
            mine = rows == row
            prompt_tokens = order[mine & prompt]
            if prompt_tokens.numel() != int(row_prompt[row]) or int(positions[prompt_tokens[0]]) != 0:
                raise RuntimeError("splice: a prompt gated by a prefill decision reached the model in parts "
                                   "(chunked prefill or a prefix-cache hit); serve with --no-enable-chunked-prefill")
            for i in used:
                rows_i, prompts_i, all_i = groups.setdefault(i, ([], [], []))
                rows_i.append(row)
                prompts_i.append(prompt_tokens)
                all_i.append(order[mine])
        for i, (rows_i, prompts_i, all_i) in groups.items():
            longest = max(p.numel() for p in prompts_i)
            index = torch.zeros(len(rows_i), longest, dtype=torch.long, device=rows.device)
            mask = torch.zeros(len(rows_i), longest, device=rows.device)
            for r, p in enumerate(prompts_i):  # left padding, as a Hugging Face batch
                index[r, longest - p.numel():] = p
                mask[r, longest - p.numel():] = 1.0
            self._pending.setdefault(self.deciders[i].layer, []).append((i, rows_i, index, mask, all_i))

    def decide(self, layer: int, stream: torch.Tensor, gates: torch.Tensor) -> None:
        for i, rows, index, mask, tokens in self._pending.get(layer, ()):
            decider, start = self.deciders[i], self.columns[i]
            hidden = stream.index_select(0, index.reshape(-1)).view(*index.shape, stream.shape[-1])
            value = decider.decide(hidden.float(), mask).to(gates.dtype)
            for r, row in enumerate(rows):
                self.row_gate[row, start:start + decider.width] = value[r]
                gates[tokens[r], start:start + decider.width] = value[r]
