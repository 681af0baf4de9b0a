"""What each backend is doing right now: this process's own count, merged with what the engine reports.

Local accounting is written only by the request lifecycle callbacks (begin -> first_token -> finish) and follows
Dynamo's: a request costs its uncached prompt tokens until its first token, then one decode slot until done. It
reacts at once but sees only what this process sent: behind N routers (or ``--workers N``) each sees ~1/N of
every queue. The engine's own report (its load feed, polled every ``--load-poll-interval`` seconds: the Preble
plugin's GET /preble/load, else vLLM's /metrics gauges) sees every router's requests but lags.

The merge rule, here and nowhere else (``LoadTracker.view``; policies read only its result, through
``BackendState``, and never know where it came from). Per figure (requests in flight, pending prefill tokens,
decoding requests)::

    merged = report + (local_now - local_at_report)      # floored at local_now

- ``report``: the engine's last figures. in flight = running + waiting; decoding = the plugin's decode batch,
  else vLLM's running count; pending prefill tokens = the plugin's figure (queued and unfinished prefills), else
  (vLLM's gauges carry no token count) waiting x this process's mean uncached prompt tokens per request there.
- ``local_now - local_at_report``: what this process dispatched there since the report was asked for, minus what
  of its requests finished (or, for the prefill and decode figures, reached their first token) since. A burst
  between two polls counts at once; once the next report includes those requests, their delta restarts from
  zero, so nothing is counted twice. ``local_at_report`` is taken when the poll is sent: a request dispatched
  while the poll is in flight may be counted twice for one interval, never missed.
- The floor: this process's own requests are all there even if the report has not caught up with them yet
  (still on the wire, or in a snapshot the plugin wrote a moment before).

Other routers' requests sent since the report (``unseen``): the engine's KV events show each one as its first
blocks are stored (cache_index.py tells ``foreign_started``), up to a poll interval before its report does.
Each counts as one more request in flight (and its estimated prefill) until the next report, which includes it,
or until this router's mean request latency has passed (it has likely ended; the bound without a feed)::

    merged in flight = max(local_now, report + local_now - local_at_report) + unseen

A lone router never sees another's request, so its view is exactly the rule above without the term.
``foreign_recent`` says whether any backend showed another router's request within ``SHARED_WINDOW_S``:
policies then know that their own history (window loads, per-router rebalancing) sees only part of the fleet.

Without an engine report (feed off, failed, or its report older than ``stale_after``) the merged view is the
local count (plus unseen), exactly as without a feed. A feed that fails or goes stale logs a WARNING once (per
transition), and one that recovers logs INFO; ``feed_state`` / ``debug`` expose it for /debug/backends and
/metrics.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Seconds after the last request of another router seen on any backend that the fleet still counts as shared by
# several routers (LoadTracker.foreign_recent).
SHARED_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class EngineReport:
    """What an engine said it is doing (backends.fetch_engine_load reads it; the simulator's engines make it)."""

    running: int
    waiting: int
    pending_prefill_tokens: int | None = None  # the Preble plugin's: prompt tokens still to prefill
    decode_batch: int | None = None  # the Preble plugin's: running requests past their prefill
    kv_usage: float | None = None  # fraction of the KV cache in use
    source: str = "metrics"  # "preble" (GET /preble/load) or "metrics" (vLLM's gauges)


@dataclass(frozen=True, slots=True)
class LoadView:
    """The merged load of one backend: what policies see (BackendState's load fields)."""

    in_flight: int
    pending_prefill_tokens: int
    running_decode: int
    unseen_dispatches: int = 0  # other routers' requests among in_flight, seen only in KV events so far


class LoadFeedState(enum.Enum):
    OFF = "off"  # no engine report (feed disabled, or not polled yet)
    UP = "up"  # a fresh report is merged
    DOWN = "down"  # the last poll failed, or the report went stale: local counts only


@dataclass(slots=True)
class BackendLoad:
    # This process's own requests there (local accounting).
    in_flight: int = 0
    pending_prefill_tokens: int = 0
    running_decode: int = 0
    completed: int = 0
    failed: int = 0
    dispatched: int = 0
    dispatched_uncached_tokens: int = 0  # for the mean, when a report has no token count
    # The engine's side: its last report, when it was received, and the local counts when it was asked for.
    report: EngineReport | None = None
    report_at: float = -math.inf
    base: tuple[int, int, int] = (0, 0, 0)
    feed: LoadFeedState = LoadFeedState.OFF
    feed_error: str | None = None
    name: str = ""
    # Other routers' requests seen starting there since the last report: (when, estimated prefill tokens),
    # oldest first, and the sum of their tokens. Cleared by each report (it includes them), aged out after the
    # mean request latency; at most what other routers send in that long.
    unseen: deque[tuple[float, int]] = field(default_factory=deque)
    unseen_tokens: int = 0

    def local(self) -> tuple[int, int, int]:
        return self.in_flight, self.pending_prefill_tokens, self.running_decode


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
    dispatch_no: int = 0  # > 0: this router's number for it in its peer events (peer_sync.py)


class LoadTracker:
    def __init__(self, stale_after: float = math.inf) -> None:
        """stale_after: seconds an engine report is merged after it came (then local counts, and a WARNING)."""
        self._loads: dict[int, BackendLoad] = {}
        self.stale_after = stale_after
        self.mean_latency = 1.0  # s, this router's requests (moving average): how long an unseen one is counted
        self.foreign_seen_at = -math.inf  # when another router's request was last seen on any backend

    def add_backend(self, backend_id: int, name: str = "") -> None:
        self._loads[backend_id] = BackendLoad(name=name or str(backend_id))  # a reused id starts from zero

    def remove_backend(self, backend_id: int) -> None:
        self._loads.pop(backend_id, None)

    def get(self, backend_id: int) -> BackendLoad:
        return self._loads.setdefault(backend_id, BackendLoad(name=str(backend_id)))

    # ---- local accounting -------------------------------------------------------------------------
    def begin(self, backend_id: int, uncached_tokens: int, now: float) -> InFlight:
        load = self.get(backend_id)
        load.in_flight += 1
        load.pending_prefill_tokens += uncached_tokens
        load.dispatched += 1
        load.dispatched_uncached_tokens += uncached_tokens
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
            self.mean_latency += 0.05 * (now - req.started - self.mean_latency)
        else:
            load.failed += 1

    # ---- other routers' requests (KV events) ------------------------------------------------------------
    def foreign_started(self, backend_id: int, stored_tokens: int, now: float) -> None:
        """Another router's request started on backend_id: its first `stored_tokens` are stored (the index
        tells). Its prefill left is estimated as this router's mean uncached prompt there, less those."""
        load = self._loads.get(backend_id)
        if load is None:
            return
        mean = load.dispatched_uncached_tokens // load.dispatched if load.dispatched else stored_tokens
        tokens = max(0, mean - stored_tokens)
        load.unseen.append((now, tokens))
        load.unseen_tokens += tokens
        self.foreign_seen_at = now

    def foreign_recent(self, now: float) -> bool:
        """Whether other routers' requests were seen on the fleet within SHARED_WINDOW_S."""
        return now - self.foreign_seen_at <= SHARED_WINDOW_S

    def _age_unseen(self, load: BackendLoad, now: float) -> None:
        unseen = load.unseen
        while unseen and now - unseen[0][0] > self.mean_latency:
            load.unseen_tokens -= unseen.popleft()[1]

    # ---- the engine's reports -----------------------------------------------------------------------
    def mark(self, backend_id: int) -> tuple[int, int, int]:
        """The local counts as a poll of the engine's load is sent: hand them to apply_report with its answer."""
        return self.get(backend_id).local()

    def apply_report(self, backend_id: int, report: EngineReport, mark: tuple[int, int, int], now: float) -> None:
        """The engine answered a poll sent when the local counts were `mark` (see mark())."""
        load = self._loads.get(backend_id)
        if load is None:  # it left while the poll was out
            return
        load.report, load.report_at, load.base = report, now, mark
        load.unseen.clear()  # the report counts them now
        load.unseen_tokens = 0
        self._set_feed(load, LoadFeedState.UP, None)

    def feed_failed(self, backend_id: int, error: str) -> None:
        """A poll failed: local counts only, until a report comes again."""
        load = self._loads.get(backend_id)
        if load is not None:
            load.report = None
            self._set_feed(load, LoadFeedState.DOWN, error)

    def check(self, now: float) -> None:
        """Reports older than stale_after stop being merged (the poller calls this each round)."""
        for load in self._loads.values():
            if load.report is not None and now - load.report_at > self.stale_after:
                load.report = None
                self._set_feed(load, LoadFeedState.DOWN, f"no load report for {now - load.report_at:.2f} s")

    @staticmethod
    def _set_feed(load: BackendLoad, state: LoadFeedState, error: str | None) -> None:
        before = load.feed
        load.feed, load.feed_error = state, error
        if state is before:
            return
        if state is LoadFeedState.DOWN:
            log.warning("backend %s: load feed down (%s): routed on this router's own counts", load.name, error)
        elif before is LoadFeedState.DOWN:
            log.info("backend %s: load feed up again (%s): the engine's report is merged", load.name,
                     load.report.source if load.report else "")
        else:
            log.info("backend %s: load feed up (%s)", load.name, load.report.source if load.report else "")

    def feed_state(self, backend_id: int) -> LoadFeedState:
        return self.get(backend_id).feed

    # ---- the merged view --------------------------------------------------------------------------
    def view(self, backend_id: int, now: float) -> LoadView:
        """The merge rule of the module docstring: what policies see."""
        load = self.get(backend_id)
        report = load.report
        if load.unseen:
            self._age_unseen(load, now)
        unseen, unseen_tokens = len(load.unseen), load.unseen_tokens
        if report is None or now - load.report_at > self.stale_after:
            return LoadView(load.in_flight + unseen, load.pending_prefill_tokens + unseen_tokens,
                            load.running_decode, unseen)
        base_in_flight, base_prefill, base_decode = load.base
        pending = report.pending_prefill_tokens
        if pending is None:
            mean = load.dispatched_uncached_tokens / load.dispatched if load.dispatched else 0.0
            pending = round(report.waiting * mean)
        decode = report.decode_batch if report.decode_batch is not None else report.running
        return LoadView(
            max(load.in_flight, report.running + report.waiting + load.in_flight - base_in_flight) + unseen,
            max(load.pending_prefill_tokens, pending + load.pending_prefill_tokens - base_prefill) + unseen_tokens,
            max(load.running_decode, decode + load.running_decode - base_decode),
            unseen,
        )

    def debug(self, backend_id: int, now: float) -> dict[str, Any]:
        """For /debug/backends: the feed's state, the engine's last report, the local counts, the merged view."""
        load = self.get(backend_id)
        report = load.report
        merged = self.view(backend_id, now)
        return {
            "feed": load.feed.value, "error": load.feed_error,
            "report_age_s": None if report is None else round(now - load.report_at, 3),
            "engine": None if report is None else {
                "source": report.source, "running": report.running, "waiting": report.waiting,
                "pending_prefill_tokens": report.pending_prefill_tokens, "decode_batch": report.decode_batch,
                "kv_usage": report.kv_usage},
            "local": dict(zip(("in_flight", "pending_prefill_tokens", "running_decode"), load.local())),
            "merged": {"in_flight": merged.in_flight, "pending_prefill_tokens": merged.pending_prefill_tokens,
                       "running_decode": merged.running_decode, "unseen_dispatches": merged.unseen_dispatches},
        }
