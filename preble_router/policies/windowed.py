"""Running sums over a sliding time window, in memory that does not grow with the request rate.

The policy's history figures (compute sent to a backend within H, a prefix's uses within H, a group's TTFTs, a
backend's hit ratio) would naively keep one entry per request: memory, garbage-collector work and any scan of them
then grow with rate x window (hundreds of thousands of entries at a few thousand requests per second over
H = 180 s), and copying a hot node's history at a split costs as much. Here a window is cut into `slots` equal
time slots; a value is added to the slot of its time, and a slot leaves whole once it lies entirely before the
window. So a figure covers between `window` and `window + window / slots` seconds of history, whatever the rate,
and a WindowedSums holds at most slots + 1 slots.

Invariant: totals[i] is the sum of field i over the slots held (up to float rounding); slots are oldest first and
their starts are multiples of the slot width. Times must not go backwards by more than a slot (a late value is
counted in the newest slot).
"""

from __future__ import annotations

DEFAULT_SLOTS = 32


class WindowedSums:
    """Sums of `fields` values added within the last `window` seconds (see the module docstring)."""

    __slots__ = ("window", "width", "_slots", "totals")

    def __init__(self, window: float, fields: int = 1, slots: int = DEFAULT_SLOTS) -> None:
        self.window = window
        self.width = window / slots if window > 0 else float("inf")
        # Each slot is [start, sum of field 0, sum of field 1, ...]: a list, so that add() can hand it out as a
        # handle for a later correction (correct()) without another object per slot.
        self._slots: list[list[float]] = []
        self.totals = [0.0] * fields

    def __len__(self) -> int:
        """Slots held (at most slots + 1)."""
        return len(self._slots)

    def add(self, now: float, *values: float) -> list[float]:
        """Count values (one per field) at time now; returns the slot they went to, for correct()."""
        self._expire(now)
        slots = self._slots
        if not slots or now >= slots[-1][0] + self.width:
            start = now - now % self.width if self.width != float("inf") else 0.0
            slots.append([start] + [0.0] * len(self.totals))
        slot, totals = slots[-1], self.totals
        for i, value in enumerate(values, 1):
            slot[i] += value
            totals[i - 1] += value
        return slot

    def correct(self, slot: list[float], field: int, delta: float, now: float) -> bool:
        """Add delta to a value counted earlier in `slot` (as add() returned it), if the slot is still in the
        window; returns whether it was. Consistent either way: an expired slot's values are no longer in the
        totals, and a live one's leave them with it."""
        if slot[0] + self.width <= now - self.window:
            return False
        slot[field + 1] += delta
        self.totals[field] += delta
        return True

    def total(self, now: float, field: int = 0) -> float:
        """The sum of one field within the window."""
        self._expire(now)
        return self.totals[field]

    def since(self, now: float, start: float, field: int = 0) -> float:
        """The sum of one field over the slots that begin at or after `start` (slot-granular)."""
        self._expire(now)
        return sum(slot[field + 1] for slot in self._slots if slot[0] >= start)

    def copy(self) -> WindowedSums:
        other = WindowedSums.__new__(WindowedSums)
        other.window, other.width = self.window, self.width
        other._slots = [list(slot) for slot in self._slots]
        other.totals = list(self.totals)
        return other

    def _expire(self, now: float) -> None:
        slots, horizon = self._slots, now - self.window - self.width
        if not slots or slots[0][0] > horizon:
            return
        drop = 0
        while drop < len(slots) and slots[drop][0] <= horizon:
            drop += 1
        totals = self.totals
        for slot in slots[:drop]:
            for i in range(len(totals)):
                totals[i] -= slot[i + 1]
        del slots[:drop]
        if not slots:
            self.totals = [0.0] * len(totals)  # no rounding residue once empty
