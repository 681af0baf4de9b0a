"""vLLM plugin entry points: the per-replica load report, ``GET /preble/load`` and ``preble:*`` gauges.

The scheduler (in the EngineCore process) writes a small JSON snapshot of its queue to a file; the API
server (another process) serves it. Two entry points, both named ``preble`` (``VLLM_PLUGINS=preble``):

- ``vllm.general_plugins``: ``register()``. vLLM calls it in every process (API server first, then EngineCore
  and workers, which inherit the environment). It fixes ``PREBLE_LOAD_FILE`` once, in the first process, so
  the writer and the reader agree on the path. Idempotent.
- ``vllm.endpoint_plugins``: ``endpoint_plugin()``. Adds ``GET /preble/load`` (the snapshot plus its age) and
  a Prometheus collector that exports the snapshot as ``preble:*`` gauges on vLLM's ``/metrics``. vLLM 0.32
  loads endpoint plugins only when ``VLLM_PLUGINS`` names them.

Without ``register()`` (no entry point), both sides fall back to a path derived from the API server's pid
(EngineCore is its child), which holds for the usual single-API-server launch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

LOAD_FILE_ENV = "PREBLE_LOAD_FILE"
PLUGIN_NAME = "preble"


def _default_load_file(api_server_pid: int) -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"preble-vllm-load-{api_server_pid}.json")


def load_file_for_engine() -> str:
    """Where the scheduler writes (EngineCore: its parent is the API server)."""
    return os.environ.get(LOAD_FILE_ENV) or _default_load_file(os.getppid())


def load_file_for_server() -> str:
    """Where the API server reads."""
    return os.environ.get(LOAD_FILE_ENV) or _default_load_file(os.getpid())


def remove_stale_load_files() -> None:
    """Delete snapshots left by API servers that are gone (a SIGKILLed replica cannot clean up)."""
    base = os.path.dirname(_default_load_file(0))
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name.removeprefix("preble-vllm-load-").split(".")[0]
        if name.startswith("preble-vllm-load-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(base, name))
            except OSError:
                pass


def register() -> None:
    """``vllm.general_plugins`` entry point; runs in every vLLM process, any number of times."""
    os.environ.setdefault(LOAD_FILE_ENV, _default_load_file(os.getpid()))


def read_load(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    data["age_s"] = round(max(0.0, time.time() - data.get("time", 0.0)), 4)
    return data


class _LoadCollector:
    """prometheus_client collector: the latest snapshot as gauges, read at scrape time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        data = read_load(self.path)
        if data is None:
            return
        by_group = GaugeMetricFamily("preble:num_requests_waiting_by_group",
                                     "Waiting requests per Preble cache-hit group (0: no hit .. 9: >90% hit)",
                                     labels=["group"])
        for group, n in enumerate(data.get("groups", [])):
            by_group.add_metric([str(group)], n)
        yield by_group
        for key, help_ in (("aged", "Waiting requests past the age bound (served first)"),
                           ("pending_prefill_tokens", "Prompt tokens still to prefill (waiting + running)"),
                           ("decode_batch", "Running requests past their prefill"),
                           ("prefill_batch", "Running requests still prefilling"),
                           ("age_s", "Seconds since the scheduler wrote this snapshot")):
            yield GaugeMetricFamily(f"preble:{key}", help_, value=data.get(key, 0))


_collector_registered = False


class PrebleEndpointPlugin:
    """``vllm.endpoint_plugins`` object: ``GET /preble/load`` and the ``preble:*`` gauges."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter
        from fastapi.responses import JSONResponse

        path = load_file_for_server()
        router = APIRouter()

        @router.get("/preble/load")
        async def preble_load() -> JSONResponse:
            data = read_load(path)
            if data is None:
                return JSONResponse({"error": "no load snapshot yet: is the replica running "
                                              "--scheduler-cls vllm_patches.scheduler.PrebleScheduler?",
                                     "path": path}, status_code=503)
            return JSONResponse(data)

        app.include_router(router)
        global _collector_registered
        if not _collector_registered and os.getenv("PROMETHEUS_MULTIPROC_DIR") is None:
            from prometheus_client import REGISTRY

            REGISTRY.register(_LoadCollector(path))
            _collector_registered = True

    async def init_state(self, engine_client, state, args) -> None:
        return None


def endpoint_plugin() -> PrebleEndpointPlugin:
    """``vllm.endpoint_plugins`` entry point (a zero-argument factory)."""
    return PrebleEndpointPlugin()
