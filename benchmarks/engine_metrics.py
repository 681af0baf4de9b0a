"""What vLLM replicas say about themselves: counters and histogram sums from each one's `/metrics`.

Benchmarks read these beside their client-side records: where the engines say requests ran (peers do not say
which backend they chose), and how long the engines themselves took (time queued in the engine, prefill,
decode, whole request), which separates what a router does to a request on its way from what the machine's
contention does to the engines. One scrape before a run and one after it; `EngineCounters.since` gives the
run's own share, as every value here only grows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# vLLM's histograms, by the name a summary gives their per-request mean
ENGINE_TIMES = {"queue": "vllm:request_queue_time_seconds", "prefill": "vllm:request_prefill_time_seconds",
                "decode": "vllm:request_decode_time_seconds", "e2e": "vllm:e2e_request_latency_seconds",
                "ttft": "vllm:time_to_first_token_seconds"}
SUCCESS = "vllm:request_success_total"  # finished requests, all finish reasons


@dataclass(slots=True)
class EngineCounters:
    """Per replica URL: finished requests, and each ENGINE_TIMES histogram's (sum, count)."""

    requests: dict[str, float] = field(default_factory=dict)
    times: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def since(self, before: EngineCounters) -> EngineCounters:
        """What happened between the scrape `before` and this one."""
        times = {}
        for url, per in self.times.items():
            old = before.times.get(url, {})
            times[url] = {k: (s - old.get(k, (0.0, 0.0))[0], c - old.get(k, (0.0, 0.0))[1])
                          for k, (s, c) in per.items()}
        return EngineCounters({u: n - before.requests.get(u, 0.0) for u, n in self.requests.items()}, times)

    def mean_times(self) -> dict[str, float | None]:
        """Per-request means over all replicas, as `engine_<name>_avg_s`."""
        out: dict[str, float | None] = {}
        for key in ENGINE_TIMES:
            s = sum(per.get(key, (0.0, 0.0))[0] for per in self.times.values())
            c = sum(per.get(key, (0.0, 0.0))[1] for per in self.times.values())
            out[f"engine_{key}_avg_s"] = round(s / c, 4) if c else None
        return out


def parse(text: str) -> tuple[float, dict[str, tuple[float, float]]]:
    """One replica's /metrics text: (finished requests, {time name: (sum, count)}), summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {f"{metric}{kind}": (key, i) for key, metric in ENGINE_TIMES.items()
              for i, kind in enumerate(("_sum", "_count"))}
    requests = 0.0
    acc: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == SUCCESS:
                requests += sample.value
            elif (hit := wanted.get(sample.name)) is not None:
                acc.setdefault(hit[0], [0.0, 0.0])[hit[1]] += sample.value
    return requests, {k: (v[0], v[1]) for k, v in acc.items()}


def scrape(replicas: Iterable[Any], timeout: float = 10.0) -> EngineCounters:
    """Every replica's counters now (replicas: anything with a .url)."""
    import httpx

    out = EngineCounters()
    for rep in replicas:
        out.requests[rep.url], out.times[rep.url] = parse(httpx.get(rep.url + "/metrics", timeout=timeout).text)
    return out
