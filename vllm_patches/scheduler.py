"""Preble's per-replica scheduler for vLLM V1: ``--scheduler-cls vllm_patches.scheduler.PrebleScheduler``.

vLLM's own ``schedule()`` runs unchanged; only its two waiting queues (``self.waiting`` and
``self.kv_holding_waiting``) are replaced by ``PrebleRequestQueue`` (see group_queue.py), whose hit ratios
come from the engine's prefix cache (a read-only lookup: no refcount, LRU or event side effects).

- ``PrebleScheduler`` subclasses ``Scheduler``: CPU (vLLM forces async scheduling off there).
- ``PrebleAsyncScheduler`` subclasses ``AsyncScheduler``: GPUs, where vLLM turns async scheduling on.

Settings: environment variables, overridden by ``--additional-config '{"preble": {...}}'`` keys of the same
name in lower case without the prefix (e.g. ``{"preble": {"max_wait_s": 5}}``):

- ``PREBLE_MAX_WAIT_S`` (10): a request waiting this long is served ahead of every group.
- ``PREBLE_REFRESH_S`` (0.05): re-read waiting requests' hit ratios at most this often.
- ``PREBLE_LOAD_INTERVAL_S`` (0.05): write the load snapshot (``GET /preble/load``) at most this often;
  a change between busy and idle, or a change while no step follows (paused), is written at once.
- ``PREBLE_LOG_ADMISSIONS`` (0): log every admission (group, cached/prompt tokens, wait) at INFO.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import vllm
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_patches import TESTED_VLLM_VERSIONS
from vllm_patches.group_queue import AGED, PrebleRequestQueue
from vllm_patches.plugin import load_file_for_engine, remove_stale_load_files

logger = init_logger("vllm.preble")  # under "vllm." so vLLM's log handler prints it

RequestQueue.register(PrebleRequestQueue)  # virtual subclass: isinstance checks pass

_DEFAULTS = {"max_wait_s": 10.0, "refresh_s": 0.05, "load_interval_s": 0.05, "log_admissions": 0.0}


def preble_settings(vllm_config) -> dict[str, float]:
    extra = getattr(vllm_config, "additional_config", None)
    extra = extra.get("preble", {}) if isinstance(extra, dict) else {}
    return {key: float(extra.get(key, os.environ.get(f"PREBLE_{key.upper()}", default)))
            for key, default in _DEFAULTS.items()}


class PrebleSchedulerMixin:
    """Queue swap, admission accounting and the load snapshot; mixed into vLLM's Scheduler classes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = preble_settings(self.vllm_config)
        self.preble_settings = settings

        def make_queue() -> PrebleRequestQueue:
            return PrebleRequestQueue(self._preble_cached_tokens, max_wait_s=settings["max_wait_s"],
                                      refresh_s=settings["refresh_s"])

        assert not self.waiting and not self.kv_holding_waiting
        self.waiting = make_queue()
        self.kv_holding_waiting = make_queue()
        n = self.waiting.num_groups
        # Admissions per lane (groups 0..P-1, then aged) and the cached / prompt tokens of those admissions.
        self._preble_admitted = [0] * (n + 1)
        self._preble_admitted_cached = 0
        self._preble_admitted_prompt = 0
        self._preble_max_waited_s = 0.0
        remove_stale_load_files()
        self._preble_load_path = load_file_for_engine()
        self._preble_load_written = -1e18
        self._preble_load_idle: bool | None = None
        logger.info("Preble scheduler: %d groups, max wait %.1fs, load file %s", n, settings["max_wait_s"],
                    self._preble_load_path)
        version = getattr(vllm, "__version__", "?")
        if not version.startswith(TESTED_VLLM_VERSIONS):
            logger.warning("vllm_patches was tested with vLLM %s, not %s: it subclasses vLLM's (non-public) "
                           "Scheduler", ", ".join(TESTED_VLLM_VERSIONS), version)
        self._preble_publish()  # an idle snapshot right away

    def _preble_cached_tokens(self, request) -> int:
        """Prompt tokens the prefix cache holds for this request now; the lookup vLLM's scheduler makes."""
        if request.num_computed_tokens > 0:  # resumed or KV-loaded: already has its blocks
            return request.num_computed_tokens
        manager = self.kv_cache_manager
        if not manager.prefix_cache_lookup_enabled(request):
            return 0
        # get_computed_blocks() minus its optional event emission; find_longest_cache_hit only reads.
        _, num_tokens, _ = manager.coordinator.find_longest_cache_hit(request.block_hashes,
                                                                      request.num_tokens - 1)
        return num_tokens

    # --- vLLM hooks ------------------------------------------------------------------------------------
    def schedule(self, *args: Any, **kwargs: Any):
        now = time.monotonic()
        self.waiting.begin_step(now)
        self.kv_holding_waiting.begin_step(now)
        output = super().schedule(*args, **kwargs)
        self._preble_account(output)
        self._preble_publish()
        return output

    def update_from_output(self, *args: Any, **kwargs: Any):
        outputs = super().update_from_output(*args, **kwargs)
        self._preble_publish()
        return outputs

    def add_request(self, request) -> None:
        super().add_request(request)
        self._preble_publish(force=not self.has_requests())  # no step will follow (paused): write now

    def finish_requests(self, *args: Any, **kwargs: Any):
        result = super().finish_requests(*args, **kwargs)
        self._preble_publish(force=not self.has_requests())  # idle or paused: no later step would write
        return result

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            try:
                os.unlink(self._preble_load_path)
            except OSError:
                pass

    # --- Preble accounting -------------------------------------------------------------------------------
    def _preble_account(self, output) -> None:
        popped = self.waiting.take_popped()
        popped.update(self.kv_holding_waiting.take_popped())
        if not popped:
            return
        log = self.preble_settings["log_admissions"]
        for new in output.scheduled_new_reqs:
            info = popped.get(new.req_id)
            if info is None:
                continue
            lane = len(self._preble_admitted) - 1 if info.lane == AGED else info.lane
            self._preble_admitted[lane] += 1
            self._preble_admitted_cached += info.cached
            self._preble_admitted_prompt += info.prompt
            self._preble_max_waited_s = max(self._preble_max_waited_s, info.waited_s)
            if log:
                logger.info("preble admit %s lane=%s cached=%d prompt=%d waited=%.3fs", new.req_id,
                            "aged" if info.lane == AGED else info.lane, info.cached, info.prompt, info.waited_s)

    def preble_load(self) -> dict[str, Any]:
        """The per-replica load report served at GET /preble/load."""
        queue = self.waiting.snapshot()
        held = self.kv_holding_waiting.snapshot()
        num_running, num_waiting = self.get_request_counts()
        decode = sum(1 for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens)
        prefill_left = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.running)
        return {
            "time": time.time(),
            "running": num_running,
            "waiting": num_waiting,
            "deferred": len(self.deferred_waiting),
            "decode_batch": decode,
            "prefill_batch": num_running - decode,
            "pending_prefill_tokens": queue["pending_prefill_tokens"] + held["pending_prefill_tokens"] + prefill_left,
            "groups": [a + b for a, b in zip(queue["groups"], held["groups"])],
            "aged": queue["aged"] + held["aged"],
            "front": queue["front"] + held["front"],
            "turn": queue["turn"],
            "kv_cache_usage": round(self.kv_cache_manager.usage, 6),
            "admitted_by_group": self._preble_admitted[:-1],
            "admitted_aged": self._preble_admitted[-1],
            "admitted_cached_tokens": self._preble_admitted_cached,
            "admitted_prompt_tokens": self._preble_admitted_prompt,
            "max_waited_s": round(self._preble_max_waited_s, 4),
            "max_wait_s": self.preble_settings["max_wait_s"],
        }

    def _preble_publish(self, force: bool = False) -> None:
        path = self._preble_load_path
        if not path:
            return
        now = time.monotonic()
        idle = not self.running and not self.waiting and not self.kv_holding_waiting
        if (not force and idle == self._preble_load_idle
                and now - self._preble_load_written < self.preble_settings["load_interval_s"]):
            return
        self._preble_load_written, self._preble_load_idle = now, idle
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.preble_load(), f)
            os.replace(tmp, path)  # atomic: the API server never reads half a file
        except Exception as exc:  # noqa: BLE001 - reporting must never stop the engine
            logger.warning("Preble: cannot write the load snapshot to %s (%s); load reporting is off", path, exc)
            self._preble_load_path = ""


class PrebleScheduler(PrebleSchedulerMixin, Scheduler):
    """For CPU replicas (async scheduling off) or ``--no-async-scheduling``."""


class PrebleAsyncScheduler(PrebleSchedulerMixin, AsyncScheduler):
    """For GPU replicas, where vLLM runs async scheduling."""
