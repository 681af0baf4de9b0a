"""Prometheus metrics of the router (its own registry, so several routers can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from preble_router.router import Router

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self, router: Router) -> None:
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
        self.ttft = Histogram("preble_time_to_first_byte_seconds", "Backend time to first response byte",
                              ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read from the router's state at scrape time (no bookkeeping on the request path)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):  # noqa: ANN201 (prometheus_client collector protocol)
        healthy = GaugeMetricFamily("preble_backend_healthy", "1 if the backend is taking requests", labels=["backend"])
        in_flight = GaugeMetricFamily("preble_backend_in_flight", "Requests in flight", labels=["backend"])
        prefill = GaugeMetricFamily("preble_backend_pending_prefill_tokens", "Uncached prompt tokens before first token",
                                    labels=["backend"])
        blocks = GaugeMetricFamily("preble_cache_index_blocks", "Blocks the index records per backend", labels=["backend"])
        orphans = GaugeMetricFamily("preble_cache_index_orphan_blocks", "Stored blocks with an unknown parent",
                                    labels=["backend"])
        engine_waiting = GaugeMetricFamily("preble_backend_engine_waiting", "Requests waiting in the engine, as it "
                                           "reports (Preble plugin's /preble/load, else vLLM gauges)",
                                           labels=["backend", "source"])
        events = CounterMetricFamily("preble_kv_events", "KV events applied", labels=["backend"])
        gaps = CounterMetricFamily("preble_kv_event_gaps", "Sequence gaps in a KV-event stream", labels=["backend"])
        resets = CounterMetricFamily("preble_kv_event_resets", "Index resets (engine restart / unrepairable gap)",
                                     labels=["backend"])
        for b in self.router.backends.values():
            load = self.router.load.get(b.backend_id)
            healthy.add_metric([b.url], 1.0 if b.healthy else 0.0)
            in_flight.add_metric([b.url], load.in_flight)
            prefill.add_metric([b.url], load.pending_prefill_tokens)
            blocks.add_metric([b.url], self.router.index.blocks_held(b.backend_id))
            orphans.add_metric([b.url], self.router.index.orphan_blocks(b.backend_id))
            if b.engine_waiting is not None:
                engine_waiting.add_metric([b.url, b.load_source or ""], b.engine_waiting)
            sub = self.router.subscriber(b.backend_id)
            if sub is not None:
                events.add_metric([b.url], sub.stats.events)
                gaps.add_metric([b.url], sub.stats.gaps)
                resets.add_metric([b.url], sub.stats.resets)
        yield from (healthy, in_flight, prefill, blocks, orphans, engine_waiting, events, gaps, resets)
