"""Backends that accept connections but stop answering, in front of FAKE backends (testkit/fake_backend.py):
the first-byte limit, the stream idle limit and the probes' own timeout."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router
from testkit.ports import free_port
from testkit.router_process import answers_health, server_process


def _argv(backends: list[str], tiny_model, *extra: str) -> list[str]:
    return ["--backends", *backends, "--model", str(tiny_model), "--served-model-name", "tiny",
            "--policy", "round_robin", "--health-interval", "0.5", "--admin-open", *extra]


def _stream(url: str, prompt: str) -> tuple[httpx.Response, list[str]]:
    body = {"model": "tiny", "prompt": prompt, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        return r, [line for line in r.iter_lines() if line.startswith("data: ")]


def _backends(url: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(url + "/debug/backends", timeout=10).json()["backends"]}


# "hang": the backend reads the request and never answers; delay_s: it sends a stream's head at once and its first
# chunk only after 30 s (what vLLM's server does while its engine is stuck).
@pytest.mark.parametrize("slow", [{"fail_mode": "hang"}, {"delay_s": 30.0}], ids=["no_head", "head_only"])
def test_a_stream_with_no_first_chunk_in_time_goes_to_another_backend(tiny_model, slow):
    started = [run_fake_backend_in_thread(model="tiny", **slow), run_fake_backend_in_thread(model="tiny")]
    hung, good = (url for url, _ in started)
    try:
        with serve_router(_argv([hung, good], tiny_model, "--first-byte-timeout", "1")) as (url, _):
            t0 = time.monotonic()
            attempts = []
            # Round robin: the first or second starts on the hung backend (which the next probe re-admits: its
            # server still answers /health).
            for i in range(2):
                r, lines = _stream(url, f"hello {i}")
                assert r.status_code == 200 and r.headers["x-preble-backend"] == good
                assert lines[-1] == "data: [DONE]" and all("error" not in json.loads(x[6:]) for x in lines[:-1])
                attempts.append(int(r.headers["x-preble-attempts"]))
            retried = attempts.count(2)
            assert retried >= 1 and retried + attempts.count(1) == 2 and time.monotonic() - t0 < 10
            text = httpx.get(url + "/metrics").text
            assert f'preble_request_errors_total{{backend="{hung}",kind="FirstByteTimeout"}} {retried}.0' in text
            assert f"preble_retries_total {retried}.0" in text
    finally:
        for _, stop in started:
            stop()


def test_a_whole_reply_is_not_cut_by_the_first_byte_limit(tiny_model):
    """A non-streamed reply's first byte comes only once it is generated: the first-byte limit is not for it."""
    url_b, stop = run_fake_backend_in_thread(model="tiny", delay_s=1.5)
    try:
        with serve_router(_argv([url_b], tiny_model, "--first-byte-timeout", "0.5")) as (url, _):
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello"}, timeout=30)
            assert r.status_code == 200 and r.headers["x-preble-attempts"] == "1"
    finally:
        stop()


def test_a_stream_that_stalls_midway_ends_with_an_error_event(tiny_model):
    url_b, stop = run_fake_backend_in_thread(model="tiny", fail_mode="stall_mid_stream")
    try:
        with serve_router(_argv([url_b], tiny_model, "--stream-idle-timeout", "1")) as (url, _):
            t0 = time.monotonic()
            r, lines = _stream(url, "hello")
            assert r.status_code == 200 and time.monotonic() - t0 < 10
            assert len(lines) == 3 and "choices" in json.loads(lines[0][6:])  # the chunk that came, then the end
            err = json.loads(lines[1][6:])["error"]
            assert err["code"] == "backend_timeout" and "stalled" in err["message"]
            assert lines[2] == "data: [DONE]"
            text = httpx.get(url + "/metrics").text
            assert f'preble_request_errors_total{{backend="{url_b}",kind="stream_stalled"}} 1.0' in text
            assert f'backend="{url_b}",endpoint="completions",status="504"' in text
            assert _backends(url)[url_b]["in_flight"] == 0
    finally:
        stop()


def test_a_paused_backend_leaves_the_healthy_set_within_seconds(tiny_model):
    """SIGSTOP a fake backend (a real process): its socket still accepts, nothing answers. The probes' own
    timeout takes it out in seconds, requests go to the other, and SIGCONT brings it back."""
    good, stop = run_fake_backend_in_thread(model="tiny")
    with _fake_process() as (paused, proc):
        try:
            argv = _argv([paused, good], tiny_model, "--probe-timeout", "1", "--first-byte-timeout", "2")
            with serve_router(argv) as (url, _):
                assert all(b["healthy"] for b in _backends(url).values())
                proc.send_signal(signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    while _backends(url)[paused]["healthy"]:
                        assert time.monotonic() - t0 < 5, "the paused backend is still taken as healthy"
                        time.sleep(0.1)
                    for i in range(4):
                        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": f"hi {i}"}, timeout=30)
                        assert r.status_code == 200 and r.headers["x-preble-backend"] == good
                        r, lines = _stream(url, f"hi {i}")
                        assert r.headers["x-preble-backend"] == good and lines[-1] == "data: [DONE]"
                finally:
                    proc.send_signal(signal.SIGCONT)
                t0 = time.monotonic()
                while not _backends(url)[paused]["healthy"]:
                    assert time.monotonic() - t0 < 5, "the resumed backend did not come back"
                    time.sleep(0.1)
        finally:
            stop()


def test_requests_waiting_on_a_backend_that_fails_its_probe_go_elsewhere(tiny_model):
    """Whole replies have no first-byte limit (theirs comes after generation): requests in flight on a backend
    that then fails its probe are retried elsewhere at once, not held for --request-timeout."""
    good, stop = run_fake_backend_in_thread(model="tiny")
    with _fake_process() as (paused, proc):
        try:
            argv = _argv([paused, good], tiny_model, "--probe-timeout", "1", "--request-timeout", "60")
            with serve_router(argv) as (url, _):
                proc.send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(2) as pool:  # round robin: one goes to the paused one
                    replies = list(pool.map(lambda i: httpx.post(url + "/v1/completions", timeout=60, json={
                        "model": "tiny", "prompt": f"hi {i}"}), range(2)))
                assert time.monotonic() - t0 < 8
                assert all(r.status_code == 200 and r.headers["x-preble-backend"] == good for r in replies)
                assert sorted(r.headers["x-preble-attempts"] for r in replies) == ["1", "2"]
                assert 'kind="BackendDown"' in httpx.get(url + "/metrics").text
        finally:
            stop()


@contextlib.contextmanager
def _fake_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """A fake backend in a process of its own (one that can be paused), once it answers /health."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "testkit.fake_backend", "--port", str(port), "--model", "tiny"]
    with server_process(cmd, url, answers_health, ready_timeout=30) as proc:
        try:
            yield url, proc
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
