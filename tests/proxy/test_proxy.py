"""The proxy over real HTTP in front of FAKE backends (testkit/fake_backend.py): routing, relaying, errors."""

from __future__ import annotations

import json

import time

import httpx
import pytest

from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router

LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture
def fakes(request):
    modes = getattr(request, "param", (None, None))
    started = [run_fake_backend_in_thread(model="tiny", fail_mode=m) for m in modes]
    yield [url for url, _ in started]
    for _, stop in started:
        stop()


@pytest.fixture
def router(fakes, tiny_model):
    with serve_router(["--backends", *fakes, "--model", str(tiny_model), "--served-model-name", "tiny",
                       "--policy", "cache_aware", "--max-body-bytes", "100000", "--request-timeout", "3",
                       "--health-interval", "0.5", "--admin-open"]) as (url, proxy):
        yield url


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=20, **kw)


def test_completion_routes_and_names_backend(router, fakes):
    r = post(router, "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.headers["x-preble-backend"] in fakes
    assert r.json()["choices"]
    assert r.headers["x-fake-backend"] in r.headers["x-preble-backend"]


def test_shared_prefix_sticks_and_new_prefix_spreads(router):
    first = post(router, "/v1/completions", {"model": "tiny", "prompt": LONG + " tail one"})
    again = post(router, "/v1/completions", {"model": "tiny", "prompt": LONG + " another tail"})
    assert again.headers["x-preble-backend"] == first.headers["x-preble-backend"]
    assert int(again.headers["x-preble-matched-tokens"]) > 0
    assert again.headers["x-preble-decision"] == "cache_hit"
    other = post(router, "/v1/completions", {"model": "tiny", "prompt": "completely different " * 100})
    assert other.headers["x-preble-backend"] != first.headers["x-preble-backend"]


def test_chat_and_streaming_relay(router):
    body = {"model": "tiny", "messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}],
            "stream": True, "max_tokens": 5}
    with httpx.stream("POST", router + "/v1/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:]).get("choices") is not None for e in events[:-1])


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [(b"{not json", 400, "invalid_json"), (b"[1, 2]", 400, "invalid_json"),
     (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
     (json.dumps({"model": "tiny", "prompt": {"a": 1}}).encode(), 400, "invalid_prompt"),
     (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, "invalid_prompt"),
     (json.dumps({"model": "tiny", "prompt": "x" * 200000}).encode(), 413, "payload_too_large")],
)
def test_bad_input_gets_openai_errors(router, content, status, code):
    path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
    r = httpx.post(router + path, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


DEEP = b'{"model": "tiny", "prompt": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"  # within the fixture's 100 kB limit


@pytest.mark.parametrize(
    ("path", "content", "code"),
    [("/v1/completions", DEEP, "invalid_json"), ("/v1/chat/completions", DEEP, "invalid_json"),
     ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 65 + b"]" * 65 + b"}", "invalid_json"),
     ("/debug/route", DEEP, "invalid_json"),
     ("/v1/completions", json.dumps({"model": ["tiny"], "prompt": "x"}).encode(), "invalid_type"),
     ("/v1/chat/completions", json.dumps({"model": {}, "messages": [{"role": "user", "content": "x"}]}).encode(),
      "invalid_type"),
     ("/debug/route", json.dumps({"model": ["tiny"], "prompt": "x"}).encode(), "invalid_type"),
     ("/v1/completions", json.dumps({"model": "tiny", "prompt": [2**32] * 64}).encode(), "invalid_prompt"),
     ("/v1/completions", json.dumps({"model": "tiny", "prompt": [-1] * 64}).encode(), "invalid_prompt"),
     ("/v1/completions", json.dumps({"model": "tiny", "prompt": [10**30]}).encode(), "invalid_prompt"),
     ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                          "chat_template_kwargs": "ab"}).encode(), "invalid_prompt"),
     ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                          "chat_template_kwargs": 5}).encode(), "invalid_prompt"),
     ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "invalid_json"),
     ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', "invalid_json")],
)
def test_hostile_bodies_get_400_not_500(router, path, content, code):
    """Bodies that once reached a TypeError, OverflowError or RecursionError in the router (a 500) are the client's
    errors: 400, in the OpenAI format."""
    r = httpx.post(router + path, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert post(router, "/v1/completions", {"model": "tiny", "prompt": "still fine"}).status_code == 200


@pytest.mark.parametrize(("method", "path", "status", "code"),
                         [("GET", "/v1/completions", 405, "method_not_allowed"),
                          ("PUT", "/v1/chat/completions", 405, "method_not_allowed"),
                          ("POST", "/v1/models", 405, "method_not_allowed"),
                          ("GET", "/nope", 404, "not_found"), ("POST", "/v1/files", 404, "not_found"),
                          ("GET", "/v1/embeddings", 405, "method_not_allowed"),
                          ("POST", "/v1/embeddings", 400, "invalid_json"),  # served now (passthrough.py)
                          ("GET", "/v1/%ff%fe", 404, "not_found")])
def test_unknown_paths_and_methods_get_json_errors(router, method, path, status, code):
    r = httpx.request(method, router + path, timeout=10)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    if status == 405:
        assert r.headers["allow"]


@pytest.mark.parametrize("fakes", [("500", None)], indirect=True)
def test_failure_before_first_byte_is_retried_elsewhere(router, fakes):
    for _ in range(3):
        r = post(router, "/v1/completions", {"model": "tiny", "prompt": LONG})
        assert r.status_code == 200
        assert r.headers["x-preble-backend"] == fakes[1]


@pytest.mark.parametrize("fakes", [("die_mid_stream", "die_mid_stream")], indirect=True)
def test_backend_dying_mid_stream_ends_stream_with_error(router):
    body = {"model": "tiny", "prompt": LONG, "stream": True, "max_tokens": 50}
    with httpx.stream("POST", router + "/v1/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "backend_failure"


@pytest.mark.parametrize("fakes", [("hang", "hang")], indirect=True)
def test_hanging_backends_time_out_with_an_error(router):
    r = post(router, "/v1/completions", {"model": "tiny", "prompt": "hello"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "backend_failure"


def test_no_healthy_backend_is_503(tiny_model):
    with serve_router(["--backends", "http://127.0.0.1:9", "--model", str(tiny_model), "--startup-wait", "0"]) as (url, _):
        r = post(url, "/v1/completions", {"prompt": "hello"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"
        assert httpx.get(url + "/health").status_code == 503


def test_models_health_metrics_debug(router, fakes):
    assert [m["id"] for m in httpx.get(router + "/v1/models").json()["data"]] == ["tiny"]
    assert httpx.get(router + "/health").status_code == 200
    post(router, "/v1/completions", {"model": "tiny", "prompt": LONG})
    text = httpx.get(router + "/metrics").text
    for name in ("preble_requests_total", "preble_routing_decisions_total", "preble_router_overhead_seconds",
                 "preble_backend_healthy", "preble_cache_index_blocks", "preble_matched_prefix_tokens",
                 "preble_event_loop_lag_seconds"):
        assert name in text
    route = post(router, "/debug/route", {"model": "tiny", "prompt": LONG})
    assert route.status_code == 200 and route.json()["backend"] in fakes
    debug = httpx.get(router + "/debug/backends").json()
    backends = debug["backends"]
    assert {b["url"] for b in backends} == set(fakes) and all(b["block_size"] == 32 for b in backends)
    assert {"last_s", "worst_s", "stalls"} <= debug["event_loop"].keys()


def test_a_backend_cookie_never_reaches_another_client(fakes, tiny_model):
    """One connection pool forwards every client's requests: a cookie one response sets must not be stored and
    sent on with the next request (the client gets its Set-Cookie, the backend sees only the client's own).
    Backends named by host name: a client library's cookie jar may ignore cookies from IP addresses only."""
    named = [u.replace("127.0.0.1", "localhost") for u in fakes]
    with serve_router(["--backends", *named, "--model", str(tiny_model), "--served-model-name", "tiny",
                       "--policy", "round_robin"]) as (router, _):
        _no_cookie_crosses(router)


def _no_cookie_crosses(router: str) -> None:
    body = {"model": "tiny", "prompt": "cookie"}
    first = post(router, "/v1/completions", body, headers={"x-fake-set-cookie": "1"})
    assert first.status_code == 200 and "fake-session=secret" in first.headers["set-cookie"]
    for _ in range(4):  # whichever backend and pooled connection they take
        again = post(router, "/v1/completions", body, headers={"x-fake-set-cookie": "1"})
        assert again.headers["x-fake-got-cookie"] == ""
    mine = post(router, "/v1/completions", body, headers={"x-fake-set-cookie": "1", "cookie": "mine=1"})
    assert mine.headers["x-fake-got-cookie"] == "mine=1"


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_workers_share_the_port_and_their_counters(fakes, tiny_model):
    """`preble-router --workers 2` (a real subprocess, its own CLI): two router processes on one port; /metrics
    adds up the counters of both, whichever worker answers the scrape."""
    from testkit.router_process import start_router

    argv = ["--backends", *fakes, "--model", str(tiny_model), "--served-model-name", "tiny", "--policy", "preble",
            "--workers", "2", "--health-interval", "0.5"]
    with start_router(argv, ready_timeout=120) as url:
        n = 24
        for i in range(n):  # a new connection each time, so the kernel spreads them over the workers
            with httpx.Client(timeout=20) as client:
                r = client.post(url + "/v1/completions", json={"model": "tiny", "prompt": f"{LONG} {i}"})
                assert r.status_code == 200 and r.headers["x-preble-backend"] in fakes
        bad = httpx.post(url + "/v1/completions", content=b"{not json", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        for _ in range(4):  # every scrape, from either worker, sees all of them
            text = httpx.get(url + "/metrics", timeout=10).text
            assert _metric_sum(text, "preble_requests_total") == n
            assert _metric_sum(text, "preble_routing_decisions_total") == n
            assert _metric_sum(text, "preble_backend_healthy") == 2  # each backend, max over the workers
            assert "preble_backend_in_flight" in text


def test_workers_tell_each_other_what_they_dispatch(fakes, tiny_model):
    """`--workers 2`: each worker replays the other's dispatches (peer sync over ipc sockets in a directory the
    parent made), so /debug/backends of either shows one peer, and the peer events add up to every request's
    dispatch and end; in-flight gauges count each request once."""
    from testkit.router_process import start_router

    argv = ["--backends", *fakes, "--model", str(tiny_model), "--served-model-name", "tiny", "--policy", "preble",
            "--workers", "2", "--health-interval", "0.5", "--admin-open"]
    with start_router(argv, ready_timeout=120) as url:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both workers heard from each other (heartbeats every second)
            views = [httpx.get(url + "/debug/backends", timeout=10).json()["peer_sync"] for _ in range(6)]
            if all(v and len(v["peers"]) == 1 for v in views) and len({v["router_id"] for v in views}) == 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the workers never saw each other: {views}")
        n = 24
        for i in range(n):  # a new connection each time, so the kernel spreads them over the workers
            with httpx.Client(timeout=20) as client:
                r = client.post(url + "/v1/completions", json={"model": "tiny", "prompt": f"{LONG} {i}"})
                assert r.status_code == 200
        time.sleep(1.0)
        text = httpx.get(url + "/metrics", timeout=10).text
        assert _metric_sum(text, "preble_requests_total") == n
        assert _metric_sum(text, "preble_peer_routers") == 1
        assert _metric_sum(text, "preble_peer_events_total") >= 2 * n  # dispatched + finished, each seen once
        assert _metric_sum(text, "preble_peer_events_lost_total") == 0
        assert _metric_sum(text, "preble_backend_in_flight") == 0
