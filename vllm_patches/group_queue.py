"""Preble's local waiting queue: priority groups by cache-hit ratio, served in weighted turns, with an age bound.

A drop-in for vLLM V1's ``RequestQueue`` (``self.waiting``): vLLM's ``schedule()`` keeps its loop
(peek, prefix lookup, budgets, allocate, pop), this queue only decides *which* request is at the front.

- A waiting request goes into one of P = 10 groups by h = cached / prompt tokens, cached being what the
  engine's prefix cache holds now: h = 0 -> group 0, else group ceil(10 h) - 1.
- Groups take turns from the highest down (9, 8, ..., 0, 9, ...), skipping empty ones. Group g's turn admits
  up to (g + 1) x 10 requests, FCFS inside the group. A turn ends when its quota is used or its group runs
  empty; the step then goes on with the next group, so budget is never left idle while requests wait.
- A request that has waited max_wait_s or longer goes to the *aged* lane, served FCFS ahead of every group:
  no request waits forever behind a stream of better-cached ones.
- Requests vLLM puts back at the front (``prepend_request[s]``: preempted, or skipped this step) are served
  first, exactly as vLLM's FCFS queue does.
- Hit ratios are re-read from the prefix cache when a request arrives, at a step's start (``begin_step``: at
  most every refresh_s, up to refresh_batch requests round robin, so a deep queue costs a bounded amount per
  step), and for the head request on every ``peek_request``; vLLM's own lookup follows that
  peek with no cache change in between, so the cached count recorded for an admitted request equals the
  ``cached_tokens`` vLLM reports for it.

No vLLM import here (unit tests stay fast); vllm_patches.scheduler registers the class as a virtual subclass
of vLLM's ``RequestQueue`` ABC.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

NUM_GROUPS = 10
QUOTA_UNIT = 10
AGED = -1  # lane id of requests past the age bound

Request = Any  # vllm.v1.request.Request, or a fake with request_id / num_prompt_tokens


def hit_group(cached: int, prompt: int, num_groups: int = NUM_GROUPS) -> int:
    """Preble's group of a request: 0 for h = 0, else ceil(P h) - 1, with h = cached / prompt (exact integers)."""
    if prompt <= 0 or cached <= 0:
        return 0
    cached = min(cached, prompt)
    return max(0, -(-num_groups * cached // prompt) - 1)


@dataclass(slots=True)
class _Entry:
    seq: int  # arrival order: FCFS inside a lane
    since: float  # clock() at enqueue, for the age bound
    cached: int  # prefix-cache hit (tokens) at the latest lookup
    lane: int  # group index, or AGED


@dataclass(frozen=True, slots=True)
class PopInfo:
    """What the queue knew of a request when it left a group or the aged lane."""

    lane: int
    cached: int
    prompt: int
    waited_s: float


class PrebleRequestQueue:
    def __init__(
        self,
        cached_tokens: Callable[[Request], int] | None = None,
        *,
        max_wait_s: float = 10.0,
        refresh_s: float = 0.05,
        refresh_batch: int = 128,
        num_groups: int = NUM_GROUPS,
        quota_unit: int = QUOTA_UNIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cached_tokens = cached_tokens or (lambda request: 0)
        self.max_wait_s = max_wait_s
        self.refresh_s = refresh_s
        self.refresh_batch = refresh_batch
        self.num_groups = num_groups
        self.quota_unit = quota_unit
        self._clock = clock
        self._front: deque[Request] = deque()  # prepended by vLLM: served first
        self._aged: list[Request] = []  # past the age bound: FCFS, ahead of the groups
        self._groups: list[list[Request]] = [[] for _ in range(num_groups)]
        self._entries: dict[Request, _Entry] = {}  # every request in _aged or _groups
        self._rotation: deque[Request] = deque()  # refresh order (may hold requests that left: skipped lazily)
        self._seq = 0
        self._turn = num_groups - 1  # the group whose turn it is ...
        self._left = self.quota(self._turn)  # ... and how many it may still admit in this turn
        self._last_refresh = -math.inf
        self._popped: dict[str, PopInfo] = {}  # since the last take_popped()

    def quota(self, group: int) -> int:
        return (group + 1) * self.quota_unit

    # --- Preble hooks (called by the scheduler) ----------------------------------------------------
    def begin_step(self, now: float | None = None) -> None:
        """At a step's start: move requests past the age bound to the aged lane; re-read some hit ratios."""
        now = self._clock() if now is None else now
        for members in self._groups:
            # a group is in arrival order, so its requests past the bound are a prefix
            n = 0
            while n < len(members) and now - self._entries[members[n]].since >= self.max_wait_s:
                n += 1
            for request in members[:n]:
                self._entries[request].lane = AGED
                bisect.insort(self._aged, request, key=self._seq_of)
            del members[:n]
        if now - self._last_refresh >= self.refresh_s:
            self._last_refresh = now
            self._refresh(self.refresh_batch)

    def _refresh(self, budget: int) -> None:
        """Re-read the hit ratio of up to `budget` grouped requests, round robin, and re-group those that moved."""
        for _ in range(min(budget, len(self._rotation))):
            request = self._rotation.popleft()
            entry = self._entries.get(request)
            if entry is None:  # left the queue since: drop it from the rotation
                continue
            self._rotation.append(request)
            if entry.lane == AGED:
                continue
            new = self._classify(request, entry)
            if new != entry.lane:
                self._groups[entry.lane].remove(request)
                entry.lane = new
                bisect.insort(self._groups[new], request, key=self._seq_of)

    def take_popped(self) -> dict[str, PopInfo]:
        """Requests that left a group or the aged lane since the last call (admitted, or skipped by vLLM)."""
        popped, self._popped = self._popped, {}
        return popped

    def snapshot(self) -> dict[str, Any]:
        return {
            "groups": [len(members) for members in self._groups],
            "aged": len(self._aged),
            "front": len(self._front),
            "turn": self._turn,
            "turn_left": self._left,
            "pending_prefill_tokens": sum(
                max(0, r.num_prompt_tokens - e.cached) for r, e in self._entries.items()
            )
            + sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self._front),
        }

    # --- vLLM RequestQueue interface ----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        entry = _Entry(seq=self._seq, since=self._clock(), cached=0, lane=0)
        self._seq += 1
        self._entries[request] = entry
        entry.lane = self._classify(request, entry)
        self._groups[entry.lane].append(request)  # highest seq so far: FCFS order kept
        self._rotation.append(request)
        if len(self._rotation) > 2 * len(self._entries) + self.refresh_batch:  # shed requests that left
            self._rotation = deque(r for r in self._rotation if r in self._entries)

    def peek_request(self) -> Request:
        lane = self._next_lane()
        request = lane[0]
        entry = self._entries.get(request)
        if entry is not None:  # vLLM looks the prefix up right after this: record the same number
            entry.cached = self._lookup(request)
        return request

    def pop_request(self) -> Request:
        lane = self._next_lane()
        if lane is self._front:
            return self._front.popleft()
        request = lane.pop(0)
        entry = self._entries.pop(request)
        self._popped[request.request_id] = PopInfo(
            entry.lane, entry.cached, request.num_prompt_tokens, self._clock() - entry.since
        )
        if lane is not self._aged:
            self._left -= 1
            if not lane:
                self._left = 0  # the group ran empty: its turn ends
        return request

    def prepend_request(self, request: Request) -> None:
        self._front.appendleft(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        self._front.extendleft(requests)  # same order semantics as vLLM's FCFSRequestQueue

    def remove_request(self, request: Request) -> None:
        self.remove_requests([request])

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = set(requests)
        if self._front:
            kept = [r for r in self._front if r not in gone]
            self._front.clear()
            self._front.extend(kept)
        lanes = set()
        for request in gone:
            entry = self._entries.pop(request, None)
            if entry is not None:
                lanes.add(entry.lane)
        for lane_id in lanes:
            lane = self._aged if lane_id == AGED else self._groups[lane_id]
            lane[:] = [r for r in lane if r not in gone]

    def __bool__(self) -> bool:
        return bool(self._front) or bool(self._entries)

    def __len__(self) -> int:
        return len(self._front) + len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        """The order pops would take now (no state change)."""
        yield from self._front
        yield from self._aged
        taken = [0] * self.num_groups
        turn, left = self._turn, self._left
        remaining = sum(len(members) for members in self._groups)
        while remaining:
            members = self._groups[turn]
            if left <= 0 or taken[turn] >= len(members):
                turn = (turn - 1) % self.num_groups
                left = self.quota(turn)
                continue
            yield members[taken[turn]]
            taken[turn] += 1
            left -= 1
            remaining -= 1
            if taken[turn] >= len(members):
                left = 0

    # --- internals ------------------------------------------------------------------------------------
    def _seq_of(self, request: Request) -> int:
        return self._entries[request].seq

    def _lookup(self, request: Request) -> int:
        try:
            return max(0, int(self._cached_tokens(request)))
        except Exception:  # noqa: BLE001 - a failed lookup must not stop the engine; it counts as a miss
            return 0

    def _classify(self, request: Request, entry: _Entry) -> int:
        entry.cached = self._lookup(request)
        return hit_group(entry.cached, request.num_prompt_tokens, self.num_groups)

    def _next_lane(self) -> deque[Request] | list[Request]:
        if self._front:
            return self._front
        if self._aged:
            return self._aged
        if not self._entries:
            raise IndexError("peek/pop from an empty queue")
        while self._left <= 0 or not self._groups[self._turn]:
            self._turn = (self._turn - 1) % self.num_groups  # next group down, wrapping 0 -> P-1
            self._left = self.quota(self._turn)
        return self._groups[self._turn]
