"""The rest of vLLM's API through the proxy, in front of FAKE backends: balanced forwarding (least-loaded choice,
model filter, retry, streamed uploads, errors) and the LoRA fan-out (preble_router/passthrough.py)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import httpx
import pytest

from preble_router.passthrough import ENDPOINTS, JSON
from testkit.fake_backend import FAKE_VERSION, run_fake_backend_in_thread
from testkit.in_thread import serve_router

ROUTER_ARGS = ["--policy", "cache_aware", "--max-body-bytes", "100000", "--request-timeout", "5",
               "--admin-open"]


@pytest.fixture
def fakes(request):
    specs = getattr(request, "param", ((None, "tiny"), (None, "tiny")))
    started = [run_fake_backend_in_thread(model=model, fail_mode=mode) for mode, model in specs]
    yield [url for url, _ in started], [stop for _, stop in started]
    for _, stop in started:
        stop()


def router_for(fakes, tiny_model, *extra):
    urls, _ = fakes
    return serve_router(["--backends", *urls, "--model", str(tiny_model), "--served-model-name", "tiny",
                         *ROUTER_ARGS, "--health-interval", "0.5", *extra])


@pytest.fixture
def router(fakes, tiny_model):
    with router_for(fakes, tiny_model) as (url, proxy):
        yield url, proxy


def stats(url):
    return httpx.get(url + "/_fake/stats").json()["by_endpoint"]


@pytest.mark.parametrize("path", [e.path for e in ENDPOINTS if e.body == JSON and e.path != "/tokenize"])
def test_json_endpoints_forwarded_as_the_backend_answers(router, fakes, path):
    url, _ = router
    r = httpx.post(url + path, json={"model": "tiny", "input": ["a", "b"]}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-preble-backend"] in fakes[0]
    got = r.json()
    assert got["path"] == path and got["body"] == {"model": "tiny", "input": ["a", "b"]}


def test_tokenize_and_version(router, fakes):
    url, _ = router
    r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "a b c"}, timeout=10)
    direct = httpx.post(fakes[0][0] + "/tokenize", json={"model": "tiny", "prompt": "a b c"}, timeout=10)
    assert r.status_code == 200 and r.json() == direct.json()
    v = httpx.get(url + "/version", timeout=10)
    assert v.status_code == 200 and v.json() == {"version": FAKE_VERSION}


def test_least_loaded_backend_chosen_and_counted_in_flight(router, fakes):
    url, proxy = router
    results = {}

    def slow():
        results["slow"] = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "x", "fake_sleep_s": 1.5},
                                     timeout=10)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 5
    busy = None
    while busy is None and time.monotonic() < deadline:  # the slow one counts in the load tracker while in flight
        busy = next((b for b in proxy.router.backends.values()
                     if proxy.router.load.get(b.backend_id).in_flight == 1), None)
        time.sleep(0.01)
    assert busy is not None
    quick = [httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "y"}, timeout=10) for _ in range(3)]
    thread.join()
    assert results["slow"].headers["x-preble-backend"] == busy.url
    assert {r.headers["x-preble-backend"] for r in quick} == set(fakes[0]) - {busy.url}
    assert all(proxy.router.load.get(b).in_flight == 0 for b in proxy.router.backends)


@pytest.mark.parametrize("fakes", [((None, "tiny"), (None, "other"))], indirect=True)
def test_model_filter(router, fakes):
    url, _ = router
    urls, _ = fakes
    for _ in range(3):
        r = httpx.post(url + "/v1/embeddings", json={"model": "other", "input": "x"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-preble-backend"] == urls[1]


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [(b"{not json", 400, "invalid_json"), (b"[1, 2]", 400, "invalid_json"),
     (json.dumps({"model": 3, "input": "x"}).encode(), 400, "invalid_type"),
     (json.dumps({"model": "nope", "input": "x"}).encode(), 404, "model_not_found"),
     (json.dumps({"model": "tiny", "input": "x" * 200000}).encode(), 413, "payload_too_large")],
)
def test_bad_json_gets_openai_errors(router, fakes, content, status, code):
    url, _ = router
    for path in ("/v1/embeddings", "/score", "/tokenize"):
        r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"]
    assert not any(k.startswith("/") for k in stats(fakes[0][0])) and not stats(fakes[0][1])


@pytest.mark.parametrize("fakes", [(("500", "tiny"), (None, "tiny"))], indirect=True)
def test_backend_5xx_retried_on_another(router, fakes):
    url, _ = router
    r = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "x"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-preble-backend"] == fakes[0][1]
    assert r.headers["x-preble-attempts"] == "2"


def test_dead_backend_retried_on_another(fakes, tiny_model):
    urls, stops = fakes
    with router_for(fakes, tiny_model, "--health-interval", "60") as (url, proxy):  # no probe notices the death
        stops[0]()  # backend 0 (first on ties) goes away while the router still counts it healthy
        r = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "x"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-preble-backend"] == urls[1]
        assert r.headers["x-preble-attempts"] == "2"
        assert not proxy.router.backends[0].healthy


def _multipart(size: int) -> tuple[bytes, str]:
    audio = os.urandom(size)
    boundary = "fakeboundary1234"
    body = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n"
            f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"content-type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_upload_streamed_to_the_backend_intact(router, path):
    url, _ = router
    body, ctype = _multipart(90_000)
    r = httpx.post(url + path, content=body, headers={"content-type": ctype}, timeout=10)  # with Content-Length
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["bytes"] == len(body) and got["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["content_type"] == ctype and not got["chunked"]

    def pieces():  # no Content-Length: chunked, both ways
        for i in range(0, len(body), 7000):
            yield body[i:i + 7000]

    r = httpx.post(url + path, content=pieces(), headers={"content-type": ctype}, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["bytes"] == len(body) and got["sha256"] == hashlib.sha256(body).hexdigest() and got["chunked"]


def test_oversize_upload_413(router, fakes):
    url, proxy = router
    body, ctype = _multipart(150_000)
    r = httpx.post(url + "/v1/audio/transcriptions", content=body, headers={"content-type": ctype}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def pieces():  # no Content-Length: stopped by the running count
        for i in range(0, len(body), 10000):
            yield body[i:i + 10000]

    r = httpx.post(url + "/v1/audio/transcriptions", content=pieces(), headers={"content-type": ctype}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert all(proxy.router.load.get(b).in_flight == 0 for b in proxy.router.backends)
    # The router still serves (no connection left stuck).
    ok, _ = _multipart(1000)
    assert httpx.post(url + "/v1/audio/transcriptions", content=ok, headers={"content-type": ctype},
                      timeout=10).status_code == 200


def test_lora_fan_out_reaches_every_backend_and_models_follow(router, fakes):
    url, proxy = router
    urls, _ = fakes
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "/x"}, timeout=10)
    assert r.status_code == 200, r.text
    per = r.json()["backends"]
    assert set(per) == set(urls)
    assert all(v["status"] == 200 and "ad1" in v["body"] for v in per.values())
    assert all(stats(u)["/v1/load_lora_adapter"] == 1 for u in urls)
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert "ad1" in ids
    assert all("ad1" in b.lora_models for b in proxy.router.backends.values())
    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "/x"}, timeout=10)
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "fan_out_failed"
    assert all(v["status"] == 400 for v in again.json()["backends"].values())
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ad1"}, timeout=10)
    assert gone.status_code == 200
    assert all(not b.lora_models for b in proxy.router.backends.values())


@pytest.mark.parametrize("fakes", [((None, "tiny"), ("500", "tiny"))], indirect=True)
def test_lora_fan_out_reports_each_backend(router, fakes):
    url, _ = router
    urls, _ = fakes
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "/x"}, timeout=10)
    assert r.status_code == 500
    per = r.json()["backends"]
    assert per[urls[0]]["status"] == 200 and per[urls[1]]["status"] == 500
    assert per[urls[1]]["body"]["error"]["message"]
    assert r.json()["error"]["code"] == "fan_out_failed"


def test_lora_behind_the_api_key(fakes, tiny_model):
    with router_for(fakes, tiny_model, "--api-key", "k") as (url, _):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "/x"}, timeout=10)
        assert r.status_code == 401
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "/x"}, timeout=10,
                       headers={"authorization": "Bearer k"})
        assert r.status_code == 200


def test_client_leaving_mid_upload_ends_the_request(router):
    import socket
    from urllib.parse import urlsplit

    url, proxy = router
    parts = urlsplit(url)
    body, ctype = _multipart(50_000)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body[:20_000])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                proxy.router.load.get(b).in_flight for b in proxy.router.backends):
            time.sleep(0.01)
        assert any(proxy.router.load.get(b).in_flight for b in proxy.router.backends)  # counted while uploading
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(proxy.router.load.get(b).in_flight for b in proxy.router.backends):
        time.sleep(0.01)
    assert not any(proxy.router.load.get(b).in_flight for b in proxy.router.backends)
    ok, _ = _multipart(1000)
    assert httpx.post(url + "/v1/audio/transcriptions", content=ok, headers={"content-type": ctype},
                      timeout=10).status_code == 200
