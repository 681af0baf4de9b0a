"""Quick tests of the FAKE vLLM backend (testkit/fake_backend.py) that router tests and benchmarks use."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from testkit.fake_backend import make_fake_backend_app, run_fake_backend_in_thread
from testkit.ports import free_port
from testkit.router_process import answers_health, server_process

REPO = Path(__file__).resolve().parents[2]
PROMPT = "the quick brown fox jumps over the lazy dog " * 10  # 90 words


# One client for the module: httpx.get/post build a new client (and SSL context) per call, ~50 ms each.
HTTP = httpx.Client(timeout=5.0, trust_env=False)


@pytest.fixture(scope="module")
def fake():
    url, stop = run_fake_backend_in_thread(model="tiny", tokens_per_response=8)
    yield url
    stop()


def sse_events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_completion_non_stream(fake):
    r = HTTP.post(fake + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200
    port = fake.rsplit(":", 1)[1]
    assert r.headers["x-fake-backend"] == port
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["system_fingerprint"] == f"fake-backend:{port}"
    assert body["choices"][0]["text"] == " t0 t1 t2 t3" and body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 90 and usage["completion_tokens"] == 4 and usage["total_tokens"] == 94
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_chat_non_stream_and_default_length(fake):
    r = HTTP.post(fake + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hello there"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] == 4


def test_completion_stream(fake):
    with HTTP.stream("POST", fake + "/v1/completions",
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw.decode().split("\n"))
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" t0", " t1", " t2"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)


def test_chat_stream_with_usage(fake):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with HTTP.stream("POST", fake + "/v1/chat/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == " t0 t1"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_info_endpoints(fake):
    assert HTTP.get(fake + "/health").status_code == 200
    assert HTTP.get(fake + "/v1/models").json()["data"][0]["id"] == "tiny"
    tok = HTTP.post(fake + "/tokenize", json={"model": "tiny", "prompt": "a b c a"}).json()
    assert tok["count"] == 4 and tok["tokens"][0] == tok["tokens"][3] and tok["max_model_len"] > 0
    assert HTTP.post(fake + "/v1/completions", content=b"{nope").status_code == 400


def _parse_metrics(text: str) -> dict[str, tuple[dict[str, str], float]]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = dict(p.split("=", 1) for p in labels.rstrip("}").split(",")) if labels else {}
        out[name] = ({k: v.strip('"') for k, v in pairs.items()}, float(value))
    return out


def test_metrics_format(fake):
    text = HTTP.get(fake + "/metrics").text
    m = _parse_metrics(text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        labels, _ = m[name]
        assert labels == {"engine": "0", "model_name": "tiny"}
    info, value = m["vllm:cache_config_info"]
    assert value == 1.0
    assert info["block_size"] == "32" and info["num_gpu_blocks"] == "4096"
    assert info["enable_prefix_caching"] == "True"
    assert "# TYPE vllm:cache_config_info gauge" in text
    assert "# TYPE vllm:prefix_cache_hits_total counter" in text
    try:  # the real parser, where installed (prometheus_client is a project dependency)
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vllm:num_requests_running", "vllm:cache_config_info", "vllm:prefix_cache_hits"} <= names


def test_running_gauge_counts_in_flight_requests():
    url, stop = run_fake_backend_in_thread(delay_s=0.4, block_size=16, num_gpu_blocks=100)
    try:
        t = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                             kwargs={"json": {"prompt": "w " * 64}, "timeout": 5})
        t.start()
        deadline = time.monotonic() + 2
        while True:
            m = _parse_metrics(HTTP.get(url + "/metrics").text)
            if m["vllm:num_requests_running"][1] == 1.0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert m["vllm:num_requests_running"][1] == 1.0
        assert m["vllm:kv_cache_usage_perc"][1] == pytest.approx(4 / 100)
        assert m["vllm:cache_config_info"][0]["block_size"] == "16"
        t.join()
        m = _parse_metrics(HTTP.get(url + "/metrics").text)
        assert m["vllm:num_requests_running"][1] == 0.0 and m["vllm:prompt_tokens_total"][1] == 64
    finally:
        stop()


def test_fail_mode_500():
    url, stop = run_fake_backend_in_thread(fail_mode="500")
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = HTTP.post(url + path, json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 500 and r.json()["error"]["code"] == 500
        assert HTTP.get(url + "/health").status_code == 200  # the engine is "up", it just fails
    finally:
        stop()


def test_fail_mode_die_mid_stream():
    url, stop = run_fake_backend_in_thread(fail_mode="die_mid_stream")
    try:
        got = []
        body = {"prompt": "x", "stream": True, "max_tokens": 50}
        with pytest.raises(httpx.RemoteProtocolError), HTTP.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got.extend(line for line in r.iter_lines() if line.startswith("data: "))
        assert len(got) == 2 and "[DONE]" not in "".join(got)
        with pytest.raises(httpx.RemoteProtocolError):  # non-streaming: half a body, then the drop
            HTTP.post(url + "/v1/completions", json={"prompt": "x"})
        assert HTTP.get(url + "/health").status_code == 200
    finally:
        stop()


def test_fail_mode_hang_and_runtime_switch():
    url, stop = run_fake_backend_in_thread(fail_mode="hang")
    try:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            HTTP.post(url + "/v1/completions", json={"prompt": "x"}, timeout=0.3)
        assert time.monotonic() - t0 < 2
        assert HTTP.get(url + "/health").status_code == 200
        stats = HTTP.post(url + "/_fake/config", json={"fail_mode": None}).json()
        assert stats["fail_mode"] is None
        assert HTTP.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 200
    finally:
        t0 = time.monotonic()
        stop()
        assert time.monotonic() - t0 < 3


def test_bad_fail_mode_rejected():
    with pytest.raises(ValueError):
        make_fake_backend_app(fail_mode="explode")


def test_cli_serves():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "testkit.fake_backend", "--port", str(port), "--model", "m1"]
    with server_process(cmd, url, answers_health, ready_timeout=10, env=env, cwd=REPO):
        r = HTTP.post(url + "/v1/completions", json={"model": "m1", "prompt": "hi"})
        assert r.status_code == 200 and r.headers["x-fake-backend"] == str(port)
        assert HTTP.get(url + "/v1/models").json()["data"][0]["id"] == "m1"
