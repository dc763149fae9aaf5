"""A bound on the steering configurations in flight, held by the API server.

Each distinct configuration (:attr:`RequestSteering.key`) in the worker's batch holds one table slot
(:class:`~.steering_state.SlotPool`), and the pool has ``slots`` of them. A request holds its
configuration from before it reaches vLLM until vLLM's handler returns (the response is complete,
refused, or its client is gone) and vLLM has sent the engine its abort (the middleware waits for a
cancelled handler's abort), so the configurations the worker holds are always among those held here:
one API server sends adds and aborts to the engine through one ordered socket. A
request needing a slot when all are held waits up to ``wait_s`` for one to free, then gets
:class:`SlotsBusy` (HTTP 503); it never shares another configuration's slot.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager


class SlotsBusy(RuntimeError):
    """Every slot is held by another configuration (HTTP 503, retry later)."""


class Admission:
    def __init__(self, slots: int, wait_s: float):
        self.slots, self.wait_s = slots, wait_s
        self.held: Counter[str] = Counter()  # configuration -> requests in flight
        self.versions: Counter[str] = Counter()  # registry version -> requests in flight
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @asynccontextmanager
    async def hold(self, key: str, versions=(), on_release=None):
        """Hold configuration ``key`` (and its registry ``versions``) for the block. ``on_release``
        runs after the release, with the versions no request in flight names any more."""
        changed = self._condition()
        async with changed:
            if key not in self.held and len(self.held) >= self.slots:
                try:
                    await asyncio.wait_for(changed.wait_for(lambda: key in self.held or len(self.held) < self.slots),
                                           self.wait_s)
                except asyncio.TimeoutError:
                    raise SlotsBusy(f"all {self.slots} steering slots are in use by other configurations "
                                    f"(waited {self.wait_s:g} s); retry later") from None
            self.held[key] += 1
            self.versions.update(v for v in versions if v)
        try:
            yield
        finally:
            async with changed:
                self.held[key] -= 1
                if not self.held[key]:
                    del self.held[key]
                self.versions.subtract(v for v in versions if v)
                freed = {v for v in versions if v and self.versions[v] <= 0}
                for v in freed:
                    del self.versions[v]
                changed.notify_all()
            if freed and on_release is not None:
                on_release(freed)
