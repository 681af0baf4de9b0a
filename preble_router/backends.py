"""The backends the router forwards to: identity, health, and what they told us about themselves.

Health is active (GET /health every interval; /v1/models and /metrics, for the served models, the block size,
the KV-cache capacity and the engine's gauges, on the first probe, when a backend comes back up, and every
metadata interval) and passive (a transport failure marks a backend down at once; the next good probe brings
it back). Block size and capacity are learned, never assumed.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx

from preble_router.load import EngineReport
from preble_router.upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

_CACHE_CONFIG = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_GAUGE = re.compile(r"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)\{[^}]*\} "
                    r"([0-9.eE+-]+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(slots=True)
class Backend:
    backend_id: int  # small int: the bit of this backend in the cache index's holder masks
    url: str
    kv_endpoint: str | None = None
    replay_endpoint: str | None = None
    healthy: bool = False
    block_size: int | None = None
    capacity_blocks: int | None = None
    models: tuple[str, ...] = ()
    lora_models: frozenset[str] = frozenset()  # entries of /v1/models with a parent: LoRA adapters
    # What the engine says it is doing: from the Preble plugin's GET /preble/load when the replica runs it
    # (load_source "preble"), else from vLLM's own gauges in /metrics (load_source "metrics").
    engine_running: int | None = None
    engine_waiting: int | None = None
    engine_pending_prefill_tokens: int | None = None
    engine_decode_batch: int | None = None  # the plugin's only
    engine_kv_usage: float | None = None
    load_source: str | None = None
    # --kv-events auto: where its events come from is read from the engine (GET /kv_event_sources) once it answers.
    kv_auto: bool = False
    kv_problem: str | None = None  # why its events cannot be followed, or what is wrong with them
    last_error: str | None = None
    metadata_at: float | None = None  # time.monotonic() of the last read of its /v1/models and /metrics

    def metadata_due(self, now: float, interval: float) -> bool:
        """Whether a probe at `now` (time.monotonic()) should read /v1/models and /metrics again."""
        return self.metadata_at is None or now - self.metadata_at >= interval


def parse_cache_config(metrics_text: str) -> tuple[int | None, int | None]:
    """(block_size, num_gpu_blocks) from vLLM's `vllm:cache_config_info` info gauge."""
    m = _CACHE_CONFIG.search(metrics_text)
    if not m:
        return None, None
    labels = dict(_LABEL.findall(m.group(1)))

    def as_int(name: str) -> int | None:
        try:
            return int(labels.get(name, ""))
        except ValueError:
            return None

    return as_int("block_size"), as_int("num_gpu_blocks")


async def probe_backend(client: httpx.AsyncClient, backend: Backend,
                        timeout: float | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT, *,
                        metadata: bool = True, liveness: UpstreamPool | None = None) -> None:
    """One active health check; updates backend in place. Each of its requests waits `timeout` seconds at most
    (by default the client's timeout: the proxy probes through a client with its own short one).

    metadata: after /health, also read /v1/models and /metrics (models, block size, capacity, gauges). A backend
    that was down always gets them: it may have come back as another engine. Without, the probe is one GET:
    vLLM renders /metrics on the CPU its engine runs beside, and the router parses it, so reading it at every
    health interval costs both for figures that rarely change.

    liveness: a pool (the proxy's own lean HTTP client, with the probe timeout as its whole-reply limit) for that
    one GET when no metadata is read: httpx costs a few milliseconds of CPU a request, the pool a fraction."""
    if liveness is not None and not metadata and backend.healthy:
        try:
            resp = await liveness.request("GET", backend.url, "/health", (), b"")
            await resp.read()
            if resp.status >= 400:
                raise UpstreamError(f"/health answered {resp.status}")
        except (UpstreamError, TimeoutError) as exc:
            _probe_failed(backend, exc)
        return
    try:
        r = await client.get(f"{backend.url}/health", timeout=timeout)
        r.raise_for_status()
        if not metadata and backend.healthy:
            return
        models = await client.get(f"{backend.url}/v1/models", timeout=timeout)
        models.raise_for_status()
        data = models.json().get("data", [])
        backend.models = tuple(m["id"] for m in data)
        backend.lora_models = frozenset(m["id"] for m in data if m.get("parent"))
        metrics = await client.get(f"{backend.url}/metrics", timeout=timeout)
        if metrics.status_code == 200:
            block_size, capacity = parse_cache_config(metrics.text)
            backend.block_size = block_size or backend.block_size
            backend.capacity_blocks = capacity or backend.capacity_blocks
        await fetch_engine_load(client, backend, timeout, metrics.text if metrics.status_code == 200 else "")
        backend.metadata_at = time.monotonic()
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        _probe_failed(backend, exc)
    else:
        if not backend.healthy:
            log.info("backend %s is up (block size %s, %s blocks)", backend.url, backend.block_size,
                     backend.capacity_blocks)
        backend.healthy = True


def _probe_failed(backend: Backend, exc: BaseException) -> None:
    """A probe's request failed: the backend is down until a probe succeeds (logged once, as it goes down)."""
    if backend.healthy:
        log.warning("backend %s is down: %s", backend.url, exc)
    backend.healthy = False
    backend.last_error = str(exc) or type(exc).__name__


def _engine_gauges(metrics_text: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for name, value in _GAUGE.findall(metrics_text):
        found.setdefault(name, []).append(float(value))
    return found


def parse_engine_gauges(metrics_text: str) -> tuple[int | None, int | None]:
    """(running, waiting) requests from vLLM's gauges, summed over engines."""
    report = parse_engine_load(metrics_text)
    return (None, None) if report is None else (report.running, report.waiting)


def parse_engine_load(metrics_text: str) -> EngineReport | None:
    """The engine's load from vLLM's gauges: requests summed over engines, KV usage their mean; None without
    vllm:num_requests_running."""
    found = _engine_gauges(metrics_text)
    if "vllm:num_requests_running" not in found:
        return None
    usage = found.get("vllm:kv_cache_usage_perc")
    return EngineReport(int(sum(found["vllm:num_requests_running"])),
                        int(sum(found.get("vllm:num_requests_waiting", ()))),
                        kv_usage=sum(usage) / len(usage) if usage else None, source="metrics")


def parse_plugin_load(report: Any) -> EngineReport:
    """The Preble plugin's GET /preble/load body (raises KeyError, TypeError or ValueError on another)."""
    decode = report.get("decode_batch")
    usage = report.get("kv_cache_usage")
    return EngineReport(int(report["running"]), int(report["waiting"]), int(report["pending_prefill_tokens"]),
                        None if decode is None else int(decode), None if usage is None else float(usage),
                        source="preble")


async def fetch_engine_load(client: httpx.AsyncClient, backend: Backend,
                            timeout: float | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
                            metrics_text: str | None = None) -> EngineReport | None:
    """What the engine says it is doing, recorded on `backend` too (engine_* fields, load_source).

    The plugin's report when the replica serves it (exact pending prefill tokens), else vLLM's gauges: from
    `metrics_text` when the caller has it (a health probe), else one GET /metrics. Once a replica is known not to
    run the plugin it is not asked again. None: no figures; raises httpx.HTTPError when /metrics cannot be read."""
    report = None
    if backend.load_source != "metrics":
        try:
            r = await client.get(f"{backend.url}/preble/load", timeout=timeout)
            if r.status_code == 200:
                report = parse_plugin_load(r.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            pass
    if report is None:
        if metrics_text is None:
            r = await client.get(f"{backend.url}/metrics", timeout=timeout)
            r.raise_for_status()
            metrics_text = r.text
        report = parse_engine_load(metrics_text)
    if report is None:
        backend.engine_running = backend.engine_waiting = backend.engine_pending_prefill_tokens = None
        backend.engine_decode_batch = backend.engine_kv_usage = backend.load_source = None
        return None
    backend.engine_running, backend.engine_waiting = report.running, report.waiting
    backend.engine_pending_prefill_tokens, backend.engine_decode_batch = (report.pending_prefill_tokens,
                                                                          report.decode_batch)
    backend.engine_kv_usage, backend.load_source = report.kv_usage, report.source
    return report


def mark_failure(backend: Backend, error: str) -> None:
    """A request to the backend failed in transport: stop sending there until a probe says otherwise."""
    backend.last_error = error
    if backend.healthy:
        log.warning("backend %s marked down after a request failed: %s", backend.url, error)
    backend.healthy = False


async def fetch_kv_event_sources(client: httpx.AsyncClient, backend: Backend,
                                 timeout: float | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT) -> Any:
    """The engine's KV-event publisher config per DP rank (vLLM >= 0.32's GET /kv_event_sources); {} when the
    server does not serve it (older vLLM, another server), None when the backend did not answer. Waits as long as
    a probe (the client's timeout), by default."""
    try:
        r = await client.get(f"{backend.url}/kv_event_sources", timeout=timeout)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return {}
    try:
        return r.json()
    except ValueError:
        return {}
