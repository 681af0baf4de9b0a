"""How late the router's event loop runs: every request, every relayed token and every KV-event batch waits on
it, so a callback that holds it (a long computation, a full garbage collection, a blocking call) delays them all
at once. Measured as the overshoot of a short sleep, exported as a histogram, shown on /debug/backends, and
logged when it passes a threshold: a stalled router says so instead of looking like slow backends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoopLagStats:
    """Invariant: worst_s >= last_s >= 0; stalls counts the samples of at least warn_s since the start."""

    samples: int = 0
    last_s: float = 0.0
    worst_s: float = 0.0  # since the start
    worst_at: float | None = None  # time.monotonic() of the worst sample
    stalls: int = 0


class LoopLagMonitor:
    """Sleeps `interval` seconds at a time and records how much later than asked it woke (the loop's lag).

    `observe` gets each sample (the metrics histogram). A sample of at least `warn_s` counts as a stall and is
    logged, at most once per `warn_every` seconds (with the number of stalls since the last line)."""

    def __init__(self, observe: Callable[[float], None] | None = None, interval: float = 0.1, warn_s: float = 0.25,
                 warn_every: float = 60.0) -> None:
        self.observe = observe
        self.interval = interval
        self.warn_s = warn_s
        self.warn_every = warn_every
        self.stats = LoopLagStats()
        self._last_warn = -float("inf")
        self._unwarned = 0

    def record(self, lag: float, now: float) -> None:
        s = self.stats
        lag = max(0.0, lag)
        s.samples += 1
        s.last_s = lag
        if lag > s.worst_s:
            s.worst_s, s.worst_at = lag, now
        if self.observe is not None:
            self.observe(lag)
        if lag < self.warn_s:
            return
        s.stalls += 1
        self._unwarned += 1
        if now - self._last_warn >= self.warn_every:
            log.warning("event loop stalled %.3f s (%d stalls of >= %.2f s since the last warning): requests, "
                        "streams and KV events all waited; see preble_event_loop_lag_seconds", lag,
                        self._unwarned, self.warn_s)
            self._last_warn, self._unwarned = now, 0

    async def run(self) -> None:
        while True:
            asked = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.record(now - asked, now)

    def debug(self, now: float) -> dict[str, float | int | None]:
        s = self.stats
        return {"samples": s.samples, "last_s": round(s.last_s, 4), "worst_s": round(s.worst_s, 4),
                "worst_age_s": None if s.worst_at is None else round(now - s.worst_at, 1), "stalls": s.stalls,
                "stall_threshold_s": self.warn_s}
