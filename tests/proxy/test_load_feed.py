"""The load feed over HTTP (#16): the router polls each FAKE backend's load (the plugin's /preble/load on one,
vLLM's /metrics gauges on the other), merges it, shows it in /debug/backends and /metrics, and degrades loudly."""

from __future__ import annotations

import time

import httpx

from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_load_feed_is_polled_merged_and_shown(tiny_model):
    started = [run_fake_backend_in_thread(model="tiny") for _ in range(2)]
    plugin, plain = (url for url, _ in started)
    try:
        httpx.post(plugin + "/_fake/config", json={"preble_load": True, "extra_waiting": 3,
                                                   "extra_pending_prefill_tokens": 900})
        httpx.post(plain + "/_fake/config", json={"extra_waiting": 2})
        with serve_router(["--backends", plugin, plain, "--model", str(tiny_model), "--served-model-name", "tiny",
                           "--policy", "least_load", "--health-interval", "0.5", "--load-poll-interval", "0.05",
                           "--admin-open"]) as (url, proxy):
            def view():
                out = {b["url"]: b["load"] for b in httpx.get(url + "/debug/backends").json()["backends"]}
                return out if all(v["feed"] == "up" for v in out.values()) else None

            loads = wait_for(view)
            assert loads, httpx.get(url + "/debug/backends").text
            assert loads[plugin]["engine"]["source"] == "preble" and loads[plain]["engine"]["source"] == "metrics"
            assert loads[plugin]["merged"] == {"in_flight": 3, "pending_prefill_tokens": 900, "running_decode": 0,
                                              "unseen_dispatches": 0}
            assert loads[plain]["merged"]["in_flight"] == 2
            # Another router's queue on both: a new request goes to the shorter one.
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello there", "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-preble-backend"] == plain
            text = httpx.get(url + "/metrics").text
            assert f'preble_load_feed_up{{backend="{plugin}"}} 1.0' in text
            assert f'preble_backend_load_in_flight{{backend="{plugin}"}} 3.0' in text
            assert f'preble_backend_engine_pending_prefill_tokens{{backend="{plugin}"}} 900.0' in text
            # The plain backend goes away: its feed is down (local counts), the metric says 0.
            started[1][1]()  # stop it: every poll fails
            down = wait_for(lambda: {b["url"]: b["load"] for b in httpx.get(url + "/debug/backends").json()
                                     ["backends"]}[plain]["feed"] == "down")
            assert down
            assert f'preble_load_feed_up{{backend="{plain}"}} 0.0' in httpx.get(url + "/metrics").text
    finally:
        for _, stop in started:
            stop()
