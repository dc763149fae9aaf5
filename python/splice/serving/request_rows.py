"""The ``vllm.logits_processors`` entry point, used for its two hooks and not for logits:

* ``validate_params`` runs where vLLM admits a request (the API server process): a malformed
  ``vllm_xargs`` steering request becomes an HTTP 400 naming the field, and a steered request
  without the mark of :class:`~splice.serving.middleware.SteeringMiddleware` for its configuration
  and salt is refused, so steered prompts only ever reach vLLM under the salt the middleware derived;
  a request whose gate is decided at prefill (``splice_whole_prompt``) is set not to read the prefix
  cache, so its whole prompt is computed in its first step (:mod:`.prefill_decisions`).
* ``update_state`` runs in the worker before every step that changes the batch: it hands vLLM's
  ``BatchUpdate`` to the served model's :class:`~splice.serving.steering_state.ServeSteering`.

vLLM loads every installed logits processor, also on servers that are not splice's: there this one
does nothing and refuses steered requests.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from . import middleware, steering_state
from .request_params import WHOLE_PROMPT, parse


class SteeringRows(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        steering = parse(sampling_params.extra_args)
        if steering is not None and not middleware.vouches(sampling_params.extra_args, steering):
            raise ValueError(f"vllm_xargs.splice_vector: steering is served through splice's middleware on "
                             f"{', '.join(middleware.PATHS)}; start the server with `splice serve` (or vllm serve "
                             f"--load-format splice --middleware {middleware.IMPORT_PATH})")
        if steering is not None and sampling_params.extra_args.get(WHOLE_PROMPT) is True:
            sampling_params.skip_reading_prefix_cache = True

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        """vLLM's constructor signature; the state lives in the served model's ServeSteering."""

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        state = steering_state.current()
        if batch_update is not None and state is not None:
            state.update(batch_update)
