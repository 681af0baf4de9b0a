"""End to end, real vLLM CPU replicas: a KV-event publisher nobody can reach is reported and routed around (the
estimated index), and routing switches back to events once a working publisher appears. (`--kv-events auto` is
tested in test_e2e_vllm.py, on its replicas.)"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router
from tests.e2e.test_e2e_vllm import observed_cached, text, wait_for

pytestmark = pytest.mark.e2e

SILENCE = 1.0


def backends_view(url: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(url + "/debug/backends").json()["backends"]}


def workload() -> list[str]:
    """Six documents, each asked about four times, interleaved: a prefix-sharing mix (~75% of it cacheable)."""
    docs = [text(40 + d, 220) for d in range(6)]
    return [f"{docs[d]} question {r}: " + text(500 + 10 * r + d, 12) for r in range(4) for d in range(6)]


def run_workload(url: str) -> float:
    """Sends the workload one request at a time; the hit rate as vLLM itself reports it (cached / prompt)."""
    cached = prompt = 0
    for p in workload():
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 4,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        cached += observed_cached(usage)
        prompt += usage["prompt_tokens"]
        time.sleep(0.05)
    return cached / prompt


def reset_caches(replicas) -> None:
    for rep in replicas:
        assert httpx.post(rep.url + "/reset_prefix_cache", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def misconfigured(tiny_model):
    """Two replicas whose publishers connect to tcp://127.0.0.1:PORT (no '*'), the way users get it wrong."""
    with start_replicas(tiny_model, 2, block_size=32, max_model_len=4096, kv_transport="tcp-connect") as replicas:
        yield replicas


def test_unreachable_publisher_is_reported_and_routed_on_the_estimate(misconfigured, tiny_model, tmp_path):
    replicas = misconfigured
    log = tmp_path / "router-a.log"
    argv = router_argv(replicas, tiny_model, policy="preble",
                       extra=["--health-interval", "0.5", "--kv-events-silence", str(SILENCE), "--admin-open"])
    with start_router(argv, log_path=log) as url:
        hit_silent = run_workload(url)
        # Sequential requests may all go to one replica: every replica that was sent work noticed the silence.
        used = {u: v for u, v in backends_view(url).items() if v["kv_events"]["routed_since_event"]}
        assert used and all(v["kv_events"]["state"] == "silent" and v["index"] == "estimated"
                            for v in used.values()), used
        metrics = httpx.get(url + "/metrics").text
        assert all(f'preble_kv_event_feed{{backend="{u}",state="silent"}} 1.0' in metrics for u in used)
        assert all(f'preble_cache_index_estimated{{backend="{u}"}} 1.0' in metrics for u in used)
        text_log = log.read_text()
        assert "nothing accepts connections" in text_log and "tcp://*:5557" in text_log, text_log[-3000:]
        assert "routing it on the estimated index" in text_log

        # The same workload through a router that was never told about events: the hit rate to match.
        reset_caches(replicas)
        with start_router(router_argv(replicas, tiny_model, policy="preble", kv_events=False,
                                      extra=["--health-interval", "0.5"])) as plain:
            hit_estimated = run_workload(plain)
        assert abs(hit_silent - hit_estimated) <= 0.03, (hit_silent, hit_estimated)
        assert hit_estimated > 0.5

        # The operator fixes replica 0's flag (an endpoint with '*') and restarts it: its events now reach the
        # router, which resyncs and routes that backend on events again.
        rep = next(r for r in replicas if r.url in used)
        port = rep.kv_endpoint.rsplit(":", 1)[1]
        i = rep.cmd.index("--kv-events-config")
        cfg = json.loads(rep.cmd[i + 1])
        rep.cmd[i + 1] = json.dumps({**cfg, "endpoint": f"tcp://*:{port}"})
        rep.restart()
        prompt = text(900, 300)
        sent = iter(range(1000))

        def flowing_after_traffic() -> bool:
            # Traffic goes on, as it would: events published before the router's SUB socket reconnected to the
            # new publisher are lost (a ZMQ PUB drops what no subscriber takes); later ones arrive.
            httpx.post(rep.url + "/v1/completions", json={"model": "tiny", "prompt": f"{next(sent)} " + prompt,
                                                          "max_tokens": 1}, timeout=60)
            return backends_view(url)[rep.url]["kv_events"]["state"] == "flowing"

        wait_for(flowing_after_traffic, timeout=60, what="events flowing again")
        httpx.post(rep.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=60)
        wait_for(lambda: backends_view(url)[rep.url]["indexed_blocks"] > 0, what="blocks indexed from events")
        view = backends_view(url)[rep.url]
        assert view["index"] == "events", view
        assert "events flow again" in log.read_text()

        def routed_there() -> dict:
            route = httpx.post(url + "/debug/route", json={"model": "tiny", "prompt": prompt + " more"}).json()
            return route if route["backend"] == rep.url and route["matched_tokens"] > 0 else {}

        wait_for(routed_there, what="the fixed replica's blocks routed on")
