"""A backend's recent occupancy: its requests in flight, averaged over the last few seconds.

The sharing cost multiplies a request's work by the batch it joins, (in flight + 1). Read on the instant, that
batch is often empty on every backend (multi-turn sessions leave the replicas idle between their turns), and a
tie on an empty batch goes to whichever backend saves a few tokens of a common system prompt: new sessions then
pile onto one replica, and their later turns follow their history there. The time average says which backend
has been carrying more of the traffic, which is what the request's own batch will look like once the sessions
already placed there send their next turns.

The average is exponential in time (time constant tau) over the piecewise-constant count, so it needs O(1)
memory and O(1) work per change, whatever the rate:
    avg(t) = avg(t0) * e^(-(t - t0) / tau) + count * (1 - e^(-(t - t0) / tau)),  count constant on [t0, t].

Invariant: `count` is the number of requests in flight since `since`, and `average` is the mean up to `since`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Occupancy:
    """Requests in flight on one backend and their exponentially weighted time average (see the module)."""

    tau: float
    count: int = 0
    average: float = 0.0
    since: float = 0.0

    def change(self, now: float, delta: int) -> None:
        """The count moves by delta at time now (a request sent: +1, ended: -1)."""
        self._advance(now)
        self.count = max(0, self.count + delta)

    def mean(self, now: float) -> float:
        """The time average of the count up to now."""
        self._advance(now)
        return self.average

    def _advance(self, now: float) -> None:
        elapsed = now - self.since
        if elapsed <= 0.0:
            return
        keep = math.exp(-elapsed / self.tau) if self.tau > 0 else 0.0
        self.average = self.average * keep + self.count * (1.0 - keep)
        self.since = now
