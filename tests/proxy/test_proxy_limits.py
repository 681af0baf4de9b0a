"""Keys, admission control and graceful drain, in front of FAKE backends (testkit/fake_backend.py)."""

from __future__ import annotations

import concurrent.futures
import signal
import sys
import time

import httpx
import pytest

from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router
from testkit.ports import free_port
from testkit.router_process import answers_health, server_process


def test_api_and_admin_keys(tiny_model):
    url_b, stop = run_fake_backend_in_thread(model="tiny")
    try:
        argv = ["--backends", url_b, "--model", str(tiny_model), "--served-model-name", "tiny",
                "--api-key", "client-secret", "--admin-key", "admin-secret"]
        with serve_router(argv) as (url, _):
            body = {"model": "tiny", "prompt": "hello"}
            assert httpx.post(url + "/v1/completions", json=body).status_code == 401
            wrong = httpx.post(url + "/v1/completions", json=body, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            ok = httpx.post(url + "/v1/completions", json=body, headers={"authorization": "Bearer client-secret"})
            assert ok.status_code == 200
            assert httpx.get(url + "/debug/backends", headers={"authorization": "Bearer client-secret"}).status_code == 401
            assert httpx.get(url + "/debug/backends", headers={"authorization": "Bearer admin-secret"}).status_code == 200
            assert httpx.get(url + "/health").status_code == 200  # probes need no key
            assert httpx.get(url + "/metrics").status_code == 200
    finally:
        stop()


# The open status of /reset_prefix_cache is 502: the fake backend has no such endpoint, so the reset "fails".
@pytest.mark.parametrize(("method", "path", "open_status"),
                         [("GET", "/debug/backends", 200), ("POST", "/debug/route", 200),
                          ("POST", "/reset_prefix_cache", 502), ("GET", "/debug/backends/", 200)])
def test_admin_endpoints_are_locked_without_a_key(tiny_model, method, path, open_status):
    """No --admin-key, no --admin-open: 403 with an error saying how to open them, whatever key a client sends;
    with --admin-open they answer."""
    url_b, stop = run_fake_backend_in_thread(model="tiny")
    try:
        argv = ["--backends", url_b, "--model", str(tiny_model), "--served-model-name", "tiny"]
        body = {"model": "tiny", "prompt": "hello"}
        with serve_router(argv) as (url, _):
            for headers in ({}, {"authorization": "Bearer anything"}):
                r = httpx.request(method, url + path, json=body, headers=headers)
                assert r.status_code == 403
                err = r.json()["error"]
                assert err["code"] == "admin_locked" and "--admin-key" in err["message"]
                assert "--admin-open" in err["message"] and err["type"] == "permission_error"
            assert httpx.post(url + "/v1/completions", json=body).status_code == 200  # only admin is locked
        with serve_router([*argv, "--admin-open"]) as (url, _):
            r = httpx.request(method, url + path.rstrip("/"), json=body)
            assert r.status_code == open_status, r.text
            if open_status == 502:
                assert r.json()["error"]["code"] == "reset_failed" and r.json()["backends"] == {url_b: "HTTP 404"}
    finally:
        stop()


def test_admin_open_is_documented_as_unsafe():
    from preble_router.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--admin-open UNSAFE" in text


def test_a_bug_in_the_router_is_a_json_500(tiny_model, monkeypatch):
    """If the router's own code ever raises, the client still gets an OpenAI error body, on the hot path and on
    Starlette's routes alike (the fuzz test asserts this never happens for any input)."""
    url_b, stop = run_fake_backend_in_thread(model="tiny")
    try:
        argv = ["--backends", url_b, "--model", str(tiny_model), "--served-model-name", "tiny"]
        with serve_router(argv) as (url, proxy):
            def broken(*_: object, **__: object) -> None:
                raise RuntimeError("a bug")

            monkeypatch.setattr(proxy.router, "prepare", broken)
            monkeypatch.setattr(proxy.router, "healthy", broken)
            for r in (httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}),
                      httpx.get(url + "/health")):
                assert r.status_code == 500
                assert r.json()["error"]["code"] == "internal_error"
    finally:
        stop()


def test_full_queue_gets_429(tiny_model):
    url_b, stop = run_fake_backend_in_thread(model="tiny", delay_s=1.0)
    try:
        argv = ["--backends", url_b, "--model", str(tiny_model), "--served-model-name", "tiny",
                "--max-concurrency", "1", "--max-queue", "1"]
        with serve_router(argv) as (url, _):
            body = {"model": "tiny", "prompt": "hello"}
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=20) for _ in range(4)]
                codes = sorted(f.result().status_code for f in futures)
            assert codes.count(200) == 2 and codes.count(429) == 2, codes  # one running, one queued
            assert "preble_rejected_total 2.0" in httpx.get(url + "/metrics").text
    finally:
        stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_streams(tiny_model, workers):
    # The fake streams 20 tokens 0.1 s apart: the stream is still running when the router gets SIGTERM (with
    # --workers, the supervisor passes it on to the worker serving the stream).
    url_b, stop = run_fake_backend_in_thread(model="tiny", tokens_per_response=20, inter_token_delay_s=0.1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "preble_router.cli", "--backends", url_b, "--model", str(tiny_model),
           "--served-model-name", "tiny", "--drain-timeout", "20", "--port", str(port), "--workers", str(workers)]
    try:
        with server_process(cmd, url, answers_health) as proc:
            body = {"model": "tiny", "prompt": "hello", "stream": True, "max_tokens": 20}
            lines = []
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if len(lines) == 2:
                            proc.send_signal(signal.SIGTERM)
            assert lines[-1] == "data: [DONE]" and len(lines) >= 21  # every chunk arrived despite the SIGTERM
            assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        stop()


def test_client_leaving_mid_stream_frees_its_load_and_slot(tiny_model):
    url_b, stop = run_fake_backend_in_thread(model="tiny", tokens_per_response=50, inter_token_delay_s=0.05)
    try:
        argv = ["--backends", url_b, "--model", str(tiny_model), "--served-model-name", "tiny",
                "--max-concurrency", "1", "--max-queue", "0", "--admin-open"]
        with serve_router(argv) as (url, _):
            body = {"model": "tiny", "prompt": "hello", "stream": True, "max_tokens": 50}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 3:
                        break  # the client goes away mid-stream
            deadline = time.monotonic() + 10
            while httpx.get(url + "/debug/backends").json()["backends"][0]["in_flight"] != 0:
                assert time.monotonic() < deadline, "the abandoned stream still counts as load"
                time.sleep(0.1)
            ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "again"}, timeout=30)
            assert ok.status_code == 200  # the only slot was given back
            assert 'status="499"' in httpx.get(url + "/metrics").text
    finally:
        stop()


def test_gc_is_tuned_for_the_serving_loop():
    """The CLI freezes start-up objects and collects the young generation rarely (cli.tune_gc); run in a child so
    this test process keeps its own collector settings."""
    import subprocess
    import sys

    code = ("import gc; from preble_router.cli import tune_gc; before = gc.get_threshold(); tune_gc(); "
            "print(before[0] < gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["True", "True"]
