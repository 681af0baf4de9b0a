"""Prometheus metrics of the router (its own registry, so several routers can live in one test process).

With `--workers N` prometheus_client runs in multiprocess mode ($PROMETHEUS_MULTIPROC_DIR): counters and
histograms add up across the worker processes, and the state gauges (read from each worker's router) are
published by every worker and combined as STATE_GAUGES says (in-flight work sums, shared views take the max).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from preble_router.kv_events import FeedState
from preble_router.load import LoadFeedState

if TYPE_CHECKING:
    from preble_router.router import Router

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# name -> (help, labels, counter?, how workers combine). Counters stay counters in one process; across workers
# they are per-worker views of one stream (each worker follows the same KV events), so the max is the total;
# their gauges keep the counters' `_total` names.
STATE_GAUGES: dict[str, tuple[str, tuple[str, ...], bool, str]] = {
    "preble_backend_healthy": ("1 if the backend is taking requests", ("backend",), False, "livemax"),
    "preble_backend_in_flight": ("Requests in flight", ("backend",), False, "livesum"),
    "preble_backend_pending_prefill_tokens": ("Uncached prompt tokens before first token", ("backend",), False,
                                              "livesum"),
    "preble_cache_index_blocks": ("Blocks the index records per backend", ("backend",), False, "livemax"),
    "preble_cache_index_orphan_blocks": ("Stored blocks with an unknown parent", ("backend",), False, "livemax"),
    "preble_backend_engine_waiting": ("Requests waiting in the engine, as it reports (Preble plugin's /preble/load, "
                                      "else vLLM gauges)", ("backend", "source"), False, "livemax"),
    "preble_backend_engine_running": ("Requests running in the engine, as it reports", ("backend", "source"), False,
                                      "livemax"),
    "preble_backend_engine_pending_prefill_tokens": ("Prompt tokens still to prefill in the engine (Preble plugin)",
                                                     ("backend",), False, "livemax"),
    "preble_backend_engine_kv_usage": ("Fraction of the engine's KV cache in use, as it reports", ("backend",),
                                       False, "livemax"),
    "preble_load_feed_up": ("1 if the backend's load feed is merged, 0 if it failed or went stale (local counts)",
                            ("backend",), False, "livemin"),
    "preble_backend_load_in_flight": ("Requests in flight in the merged load view policies see (engine report + "
                                      "own requests since)", ("backend",), False, "livemax"),
    "preble_backend_load_pending_prefill_tokens": ("Pending prefill tokens in the merged load view", ("backend",),
                                                   False, "livemax"),
    "preble_backend_load_running_decode": ("Decoding requests in the merged load view", ("backend",), False,
                                           "livemax"),
    "preble_kv_events": ("KV events applied", ("backend",), True, "livemax"),
    "preble_kv_event_gaps": ("Sequence gaps in a KV-event stream", ("backend",), True, "livemax"),
    "preble_kv_event_resets": ("Index resets (engine restart / unrepairable gap)", ("backend",), True, "livemax"),
    "preble_kv_event_silences": ("Times a backend's KV events went silent while requests needed them",
                                 ("backend",), True, "livemax"),
    "preble_kv_event_feed": ("1 for the state of a backend's KV-event feed (connecting, flowing, silent)",
                             ("backend", "state"), False, "livemax"),
    "preble_cache_index_estimated": ("1 if the backend is routed on the estimated index (no or silent KV events)",
                                     ("backend",), False, "livemax"),
    "preble_peer_routers": ("Peer routers heard from within the silence limit (peer sync)", (), False, "livemax"),
    "preble_peer_events": ("Peer routers' events applied (their dispatches, first tokens, ends, heartbeats)", (),
                           True, "livesum"),
    "preble_peer_events_lost": ("Peer routers' events missing from their numbering", (), True, "livesum"),
    "preble_peer_requests_in_flight": ("Peer routers' requests in flight, counted in this router's load view", (),
                                       False, "livemax"),
}


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def state_values(router: Router) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(metric, label values, value) for each state gauge, read from the router now."""
    peer_load = router.peer_load()
    for b in router.backends.values():
        load = router.load.get(b.backend_id)
        # This router's own requests (summed over --workers): its peers' are in its load counts too.
        peer_in_flight, peer_prefill = peer_load.get(b.backend_id, (0, 0))
        yield "preble_backend_healthy", (b.url,), 1.0 if b.healthy else 0.0
        yield "preble_backend_in_flight", (b.url,), load.in_flight - peer_in_flight
        yield "preble_backend_pending_prefill_tokens", (b.url,), load.pending_prefill_tokens - peer_prefill
        yield "preble_cache_index_blocks", (b.url,), router.index.blocks_held(b.backend_id)
        yield "preble_cache_index_orphan_blocks", (b.url,), router.index.orphan_blocks(b.backend_id)
        if b.engine_waiting is not None:
            yield "preble_backend_engine_waiting", (b.url, b.load_source or ""), b.engine_waiting
        if b.engine_running is not None:
            yield "preble_backend_engine_running", (b.url, b.load_source or ""), b.engine_running
        if b.engine_pending_prefill_tokens is not None:
            yield "preble_backend_engine_pending_prefill_tokens", (b.url,), b.engine_pending_prefill_tokens
        if b.engine_kv_usage is not None:
            yield "preble_backend_engine_kv_usage", (b.url,), b.engine_kv_usage
        feed = router.load.feed_state(b.backend_id)
        if feed is not LoadFeedState.OFF:
            yield "preble_load_feed_up", (b.url,), 1.0 if feed is LoadFeedState.UP else 0.0
        merged = router.load.view(b.backend_id, router.clock())
        yield "preble_backend_load_in_flight", (b.url,), merged.in_flight
        yield "preble_backend_load_pending_prefill_tokens", (b.url,), merged.pending_prefill_tokens
        yield "preble_backend_load_running_decode", (b.url,), merged.running_decode
        yield "preble_cache_index_estimated", (b.url,), 1.0 if router.index.is_estimated(b.backend_id) else 0.0
        sub = router.subscriber(b.backend_id)
        if sub is not None:
            yield "preble_kv_events", (b.url,), sub.stats.events
            yield "preble_kv_event_gaps", (b.url,), sub.stats.gaps
            yield "preble_kv_event_resets", (b.url,), sub.stats.resets
            yield "preble_kv_event_silences", (b.url,), sub.stats.silences
            for state in FeedState:
                yield "preble_kv_event_feed", (b.url, state.value), 1.0 if sub.state is state else 0.0
    if router.peers is not None:
        peers = router.peer_states.values()
        yield "preble_peer_routers", (), len(peers)
        yield "preble_peer_events", (), sum(p.events for p in peers) + router.peer_events_forgotten
        yield "preble_peer_events_lost", (), sum(p.lost for p in peers) + router.peer_lost_forgotten
        yield "preble_peer_requests_in_flight", (), sum(len(p.flights) for p in peers)


class RouterMetrics:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("preble_requests", "Requests finished, by backend, endpoint and status code",
                                ["backend", "endpoint", "status"], registry=r)
        self.errors = Counter("preble_request_errors", "Backend failures seen by the router, by kind",
                              ["backend", "kind"], registry=r)
        self.rejected = Counter("preble_rejected", "Requests refused with 429 because the queue was full",
                                registry=r)
        self.retries = Counter("preble_retries", "Requests re-sent to another backend before the first byte",
                               registry=r)
        self.decisions = Counter("preble_routing_decisions", "Routing decisions by policy and reason",
                                 ["policy", "reason"], registry=r)
        self.matched_tokens = Histogram("preble_matched_prefix_tokens", "Predicted cached prompt tokens per request",
                                        buckets=(0, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.cached_tokens = Counter("preble_cached_tokens", "Cached prompt tokens: the router's prediction and "
                                     "the engine's report (usage.prompt_tokens_details.cached_tokens)",
                                     ["backend", "source"], registry=r)
        self.prompt_tokens = Counter("preble_prompt_tokens", "Prompt tokens routed", ["backend"], registry=r)
        self.overhead = Histogram("preble_router_overhead_seconds", "Time from request received to backend send "
                                  "(parse, tokenize, hash, match, decide)", buckets=_LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram("preble_event_loop_lag_seconds", "How much later than asked the router's event "
                                  "loop woke from a 0.1 s sleep (every request, stream and KV event waits on it)",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("preble_time_to_first_byte_seconds", "Backend time to first response byte",
                              ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        self._shared: dict[str, Gauge] | None = None
        if multiprocess_mode():
            # Written by this worker (publish_state), read back with every worker's by MultiProcessCollector.
            self._shared = {name: Gauge(f"{name}_total" if counter else name, help_, list(labels),
                                        multiprocess_mode=mode, registry=None)
                            for name, (help_, labels, counter, mode) in STATE_GAUGES.items()}
        else:
            r.register(_StateCollector(router))

    def child(self, metric: Counter | Histogram, *labels: str):  # noqa: ANN201 (prometheus_client's child types)
        """metric.labels(*labels), cached: labels() validates its arguments and takes a lock on every call, about
        three times what the update itself costs on the request path."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= 4096:  # backends come and go (discovery): never grow without bound
                self._children.clear()
            found = self._children[key] = metric.labels(*labels)
        return found

    def publish_state(self) -> None:
        """Multiprocess mode: write this worker's state gauges where the other workers' scrapes read them."""
        if self._shared is not None:
            for name, labels, value in state_values(self.router):
                gauge = self._shared[name]
                (gauge.labels(*labels) if labels else gauge).set(value)

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        self.publish_state()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """A worker that exits drops out of the live-* gauges."""
        if self._shared is not None:
            multiprocess.mark_process_dead(os.getpid())


class _StateCollector:
    """Gauges read from the router's state at scrape time (no bookkeeping on the request path)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):  # noqa: ANN201 (prometheus_client collector protocol)
        families = {name: (CounterMetricFamily if counter else GaugeMetricFamily)(name, help_, labels=list(labels))
                    for name, (help_, labels, counter, _) in STATE_GAUGES.items()}
        for name, labels, value in state_values(self.router):
            families[name].add_metric(list(labels), value)
        yield from families.values()
