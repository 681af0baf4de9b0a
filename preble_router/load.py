"""What each backend is doing right now, as the router sees it (it reacts at once, unlike engine metrics).

Written only by the proxy's request lifecycle callbacks: begin -> first_token -> finish. Accounting follows
Dynamo's: a request costs its uncached prompt tokens until its first token, then one decode slot until done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class BackendLoad:
    in_flight: int = 0
    pending_prefill_tokens: int = 0
    running_decode: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(slots=True)
class InFlight:
    """One dispatched request; the proxy holds it and reports its progress."""

    backend_id: int
    uncached_tokens: int
    started: float
    load: BackendLoad  # the entry it was counted in (still right if the backend leaves and its id is reused)
    first_token_at: float | None = None
    done: bool = False
    route: Any = None  # the policy's view of the request (RouteRequest), for its callbacks
    backend: Any = None  # the Backend it was sent to, to tell a departed backend from a reused id
    predicted: Any = None  # its blocks predicted on that backend (cache_index.RoutedBlocks), released when it ends
    cacheable_tokens: int = 0  # > 0: it should store new blocks there (KV events due); the most vLLM reports cached


class LoadTracker:
    def __init__(self) -> None:
        self._loads: dict[int, BackendLoad] = {}

    def add_backend(self, backend_id: int) -> None:
        self._loads[backend_id] = BackendLoad()  # a reused id starts from zero

    def remove_backend(self, backend_id: int) -> None:
        self._loads.pop(backend_id, None)

    def get(self, backend_id: int) -> BackendLoad:
        return self._loads.setdefault(backend_id, BackendLoad())

    def begin(self, backend_id: int, uncached_tokens: int, now: float) -> InFlight:
        load = self.get(backend_id)
        load.in_flight += 1
        load.pending_prefill_tokens += uncached_tokens
        return InFlight(backend_id, uncached_tokens, now, load)

    def first_token(self, req: InFlight, now: float) -> None:
        if req.first_token_at is not None or req.done:
            return
        req.first_token_at = now
        load = req.load
        load.pending_prefill_tokens -= req.uncached_tokens
        load.running_decode += 1

    def finish(self, req: InFlight, now: float, *, ok: bool, output_tokens: int | None = None) -> None:
        """The request ended (now and output_tokens: as the router reports them; the counts here need neither)."""
        if req.done:
            return
        req.done = True
        load = req.load
        load.in_flight -= 1
        if req.first_token_at is None:
            load.pending_prefill_tokens -= req.uncached_tokens
        else:
            load.running_decode -= 1
        if ok:
            load.completed += 1
        else:
            load.failed += 1
