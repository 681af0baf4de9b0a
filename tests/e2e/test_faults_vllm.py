"""Faults with real vLLM CPU replicas behind the real router: a replica killed under load, then restarted."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from benchmarks.faults import run_fault_scenario
from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router

pytestmark = pytest.mark.e2e


def test_killed_replica_loses_no_request_and_comes_back(tiny_model):
    result = run_fault_scenario(tiny_model, requests=40, rate=4.0, kill_at=3.0)
    summary = {k: v for k, v in result.items() if k != "records"}
    print(summary)
    assert result["lost"] == 0, result["records"]
    assert result["succeeded"] + result["failed_with_clear_error"] == result["sent"]
    # Non-streaming requests never reached the client before the failure: all of them are retried elsewhere.
    assert all(r["outcome"] == "ok" for r in result["records"] if not r["stream"]), result["records"]
    assert result["victim_marked_down"]
    assert result["recovery_s_after_restart_ready"] is not None
    assert result["restarted_replica_served"] >= 1 and result["restarted_replica_events_indexed"]


def _healthy(url: str) -> dict[str, bool]:
    return {b["url"]: b["healthy"] for b in httpx.get(url + "/debug/backends", timeout=10).json()["backends"]}


def _stream(url: str, prompt: list[int]) -> tuple[str, int, list[str]]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        return r.headers["x-preble-backend"], int(r.headers["x-preble-attempts"]), lines


def test_paused_replica_is_routed_around_and_comes_back(tiny_model):
    """SIGSTOP one replica (its sockets accept, nothing answers): streams sent to it move on after the first-byte
    limit, probes take it out within seconds, every request succeeds on the other, and SIGCONT brings it back."""
    with start_replicas(tiny_model, 2, block_size=32) as replicas:
        victim, other = replicas
        argv = router_argv(replicas, tiny_model, policy="round_robin",
                           extra=["--health-interval", "0.5", "--probe-timeout", "1", "--first-byte-timeout", "4",
                                  "--admin-open"])
        with start_router(argv) as url:
            _stream(url, [5] * 40)  # both replicas warm
            _stream(url, [6] * 40)
            victim.pause()
            try:
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(4) as pool:  # in flight as the replica hangs
                    results = list(pool.map(lambda i: _stream(url, [100 + i] * 40), range(4)))
                for backend, _, lines in results:
                    assert backend == other.url and lines[-1] == "data: [DONE]"
                    assert all("error" not in json.loads(x[6:]) for x in lines[:-1])
                assert any(attempts == 2 for _, attempts, _ in results)  # round robin sent some to the victim
                assert time.monotonic() - t0 < 20
                while _healthy(url)[victim.url]:
                    assert time.monotonic() - t0 < 10, "the paused replica is still taken as healthy"
                    time.sleep(0.2)
                for i in range(3):
                    r = httpx.post(url + "/v1/completions", timeout=60,
                                   json={"model": "tiny", "prompt": [200 + i] * 40, "max_tokens": 2})
                    assert r.status_code == 200 and r.headers["x-preble-backend"] == other.url
            finally:
                victim.resume()
            t0 = time.monotonic()
            while not _healthy(url)[victim.url]:
                assert time.monotonic() - t0 < 15, "the resumed replica did not come back"
                time.sleep(0.2)
