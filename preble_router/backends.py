"""The backends the router forwards to: identity, health, and what they told us about themselves.

Health is active (a probe every interval: /health, then /v1/models and /metrics for the block size and the
KV-cache capacity) and passive (a transport failure marks a backend down at once; the next good probe
brings it back). Block size and capacity are learned, never assumed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

_CACHE_CONFIG = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_GAUGE = re.compile(r"^(vllm:num_requests_running|vllm:num_requests_waiting)\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)
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
    load_source: str | None = None
    # --kv-events auto: where its events come from is read from the engine (GET /kv_event_sources) once it answers.
    kv_auto: bool = False
    kv_problem: str | None = None  # why its events cannot be followed, or what is wrong with them
    last_error: str | None = None


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
                        timeout: float | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT) -> None:
    """One active health check; updates backend in place. Each of its requests waits `timeout` seconds at most
    (by default the client's timeout: the proxy probes through a client with its own short one)."""
    try:
        r = await client.get(f"{backend.url}/health", timeout=timeout)
        r.raise_for_status()
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
        await _probe_engine_load(client, backend, metrics.text if metrics.status_code == 200 else "", timeout)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        if backend.healthy:
            log.warning("backend %s is down: %s", backend.url, exc)
        backend.healthy = False
        backend.last_error = str(exc) or type(exc).__name__
    else:
        if not backend.healthy:
            log.info("backend %s is up (block size %s, %s blocks)", backend.url, backend.block_size,
                     backend.capacity_blocks)
        backend.healthy = True


def parse_engine_gauges(metrics_text: str) -> tuple[int | None, int | None]:
    """(running, waiting) requests from vLLM's gauges, summed over engines."""
    found: dict[str, float] = {}
    for name, value in _GAUGE.findall(metrics_text):
        found[name] = found.get(name, 0.0) + float(value)
    running, waiting = found.get("vllm:num_requests_running"), found.get("vllm:num_requests_waiting")
    return (None if running is None else int(running)), (None if waiting is None else int(waiting))


async def _probe_engine_load(client: httpx.AsyncClient, backend: Backend, metrics_text: str,
                             timeout: float | httpx._client.UseClientDefault) -> None:
    """Prefer the plugin's load report (exact pending prefill tokens); fall back to vLLM's gauges."""
    if backend.load_source != "metrics":  # once a replica is known not to run the plugin, stop asking
        try:
            r = await client.get(f"{backend.url}/preble/load", timeout=timeout)
            if r.status_code == 200:
                report = r.json()
                backend.engine_running = int(report["running"])
                backend.engine_waiting = int(report["waiting"])
                backend.engine_pending_prefill_tokens = int(report["pending_prefill_tokens"])
                backend.load_source = "preble"
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
    backend.engine_running, backend.engine_waiting = parse_engine_gauges(metrics_text)
    backend.engine_pending_prefill_tokens = None
    backend.load_source = "metrics" if backend.engine_running is not None else None


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
