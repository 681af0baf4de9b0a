"""The backends the router forwards to: identity, health, and what they told us about themselves.

Health is active (a probe every interval: /health, then /v1/models and /metrics for the block size and the
KV-cache capacity) and passive (a transport failure marks a backend down at once; the next good probe
brings it back). Block size and capacity are learned, never assumed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)

_CACHE_CONFIG = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
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
    consecutive_failures: int = 0
    last_error: str | None = None
    probed: asyncio.Event = field(default_factory=asyncio.Event)


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


async def probe_backend(client: httpx.AsyncClient, backend: Backend, timeout: float = 5.0) -> None:
    """One active health check; updates backend in place."""
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
        backend.consecutive_failures = 0
    finally:
        backend.probed.set()


def mark_failure(backend: Backend, error: str) -> None:
    """A request to the backend failed in transport: stop sending there until a probe says otherwise."""
    backend.consecutive_failures += 1
    backend.last_error = error
    if backend.healthy:
        log.warning("backend %s marked down after a request failed: %s", backend.url, error)
    backend.healthy = False
