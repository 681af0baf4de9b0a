"""POST /v1/messages and /v1/responses through the proxy in front of FAKE backends (testkit/fake_backend.py):
prefix routing, streaming relay, the Responses id store (previous_response_id, GET, cancel) and bad input."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router

SYSTEM = " ".join(f"rule{i}" for i in range(300))


@pytest.fixture
def fakes():
    started = [run_fake_backend_in_thread(model="tiny") for _ in range(2)]
    yield started
    for _, stop in started:
        stop()


@pytest.fixture
def router(fakes, tiny_model):
    with serve_router(["--backends", *[url for url, _ in fakes], "--model", str(tiny_model),
                       "--served-model-name", "tiny", "--policy", "cache_aware", "--max-body-bytes", "100000",
                       "--request-timeout", "5", "--health-interval", "0.2", "--admin-open"]) as (url, proxy):
        yield url, proxy


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=20, **kw)


def sse_events(r: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a vLLM-style Messages/Responses stream."""
    events, name = [], None
    for line in r.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def message_body(user: str, **extra) -> dict:
    return {"model": "tiny", "max_tokens": 4, "system": SYSTEM, "messages": [{"role": "user", "content": user}],
            **extra}


def response_body(user: str, **extra) -> dict:
    return {"model": "tiny", "max_output_tokens": 4, "instructions": SYSTEM, "input": user, **extra}


@pytest.mark.parametrize(("path", "make"), [("/v1/messages", message_body), ("/v1/responses", response_body)])
def test_shared_prefix_sticks_and_counts(router, path, make):
    url, proxy = router
    first = post(url, path, make("first question"))
    assert first.status_code == 200, first.text
    assert int(first.headers["x-preble-matched-tokens"]) == 0
    again = post(url, path, make("another question"))
    assert again.headers["x-preble-backend"] == first.headers["x-preble-backend"]
    assert int(again.headers["x-preble-matched-tokens"]) > 0
    assert again.headers["x-preble-decision"] == "cache_hit"
    metrics = httpx.get(url + "/metrics").text
    endpoint = path.rsplit("/", 1)[1]
    assert f'endpoint="{endpoint}"' in metrics
    # The usage's cached tokens (the fake reports 0) are compared with the prediction, as for chat.
    observed = [line for line in metrics.splitlines()
                if line.startswith("preble_cached_tokens_total") and 'source="observed"' in line]
    assert observed


def test_messages_stream_relayed_event_by_event(router):
    url, _ = router
    with httpx.stream("POST", url + "/v1/messages", json=message_body("hi", stream=True), timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_delta") == 4
    assert next(d for n, d in events if n == "message_delta")["usage"]["cache_read_input_tokens"] == 0


def test_responses_stream_id_learned_and_followed_up_on_its_holder(router):
    url, proxy = router
    with httpx.stream("POST", url + "/v1/responses", json=response_body("hello", stream=True), timeout=20) as r:
        assert r.status_code == 200
        holder = r.headers["x-preble-backend"]
        events = sse_events(r)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    response_id = events[0][1]["response"]["id"]
    assert proxy.responses.holder(response_id) == holder
    # Follow-ups with an unrelated prompt (the policy alone would spread them) land on the holder.
    for _ in range(3):
        follow = post(url, "/v1/responses", {"model": "tiny", "input": "other words " * 50,
                                             "previous_response_id": response_id})
        assert follow.status_code == 200, follow.text
        assert follow.headers["x-preble-backend"] == holder
        assert follow.headers["x-preble-decision"] == "previous_response"
        assert follow.headers["x-preble-matched-tokens"] == "0"  # the history is the backend's
        assert proxy.responses.holder(follow.json()["id"]) == holder


def test_whole_response_id_learned_get_and_cancel_go_to_holder(router):
    url, proxy = router
    created = post(url, "/v1/responses", response_body("hello"))
    assert created.status_code == 200
    response_id, holder = created.json()["id"], created.headers["x-preble-backend"]
    assert proxy.responses.holder(response_id) == holder
    got = httpx.get(f"{url}/v1/responses/{response_id}", timeout=10)
    assert got.status_code == 200 and got.json() == created.json()
    assert got.headers["x-preble-backend"] == holder
    cancel = httpx.post(f"{url}/v1/responses/{response_id}/cancel", timeout=10)
    assert cancel.status_code == 400  # a finished response: the holder's own answer, relayed
    assert cancel.json()["error"]["message"] == "Cannot cancel a synchronous response."


def test_unknown_response_ids_get_vllms_404(router):
    url, _ = router
    expected = {"error": {"message": "Response with id 'resp_nope' not found.", "type": "invalid_request_error",
                          "param": "response_id", "code": 404}}
    for r in (httpx.get(url + "/v1/responses/resp_nope", timeout=10),
              httpx.post(url + "/v1/responses/resp_nope/cancel", timeout=10),
              post(url, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": "resp_nope"})):
        assert r.status_code == 404 and r.json() == expected, r.text
    odd = httpx.get(url + "/v1/responses/a%20b%0D%0Ac", timeout=10)  # quoted again on the way to the backends
    assert odd.status_code == 404 and odd.json()["error"]["message"] == "Response with id 'a b\r\nc' not found."


def test_an_id_the_router_never_saw_is_found_on_its_backend(router, fakes):
    url, proxy = router
    direct = httpx.post(fakes[1][0] + "/v1/responses", json=response_body("made elsewhere"), timeout=10).json()
    assert direct["id"] not in proxy.responses  # another router's, say
    got = httpx.get(f"{url}/v1/responses/{direct['id']}", timeout=10)
    assert got.status_code == 200 and got.json()["id"] == direct["id"]
    assert got.headers["x-preble-backend"] == fakes[1][0]
    assert proxy.responses.holder(direct["id"]) == fakes[1][0]


def test_store_false_is_not_remembered(router):
    url, proxy = router
    r = post(url, "/v1/responses", response_body("hello", store=False))
    assert r.status_code == 200 and r.json()["id"] not in proxy.responses


def test_holder_down_is_a_clear_error_not_a_reroute(router, fakes):
    url, proxy = router
    created = post(url, "/v1/responses", response_body("hello"))
    holder = created.headers["x-preble-backend"]
    stop = next(stop for u, stop in fakes if u == holder)
    stop()
    deadline = time.monotonic() + 10
    while any(b.healthy for b in proxy.router.backends.values() if b.url == holder):
        assert time.monotonic() < deadline, "the stopped backend never went down"
        time.sleep(0.1)
    for r in (post(url, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": created.json()["id"]}),
              httpx.get(f"{url}/v1/responses/{created.json()['id']}", timeout=10)):
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "response_backend_unavailable" and holder in err["message"]


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1]", 400, "invalid_json"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}], "input": "x"}).encode(), 404,
     "model_not_found"),
    (json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}], "input": "x"}).encode(), 400,
     "invalid_type"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 200000}],
                 "input": "x" * 200000}).encode(), 413, "payload_too_large"),
]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
@pytest.mark.parametrize(("content", "status", "code"), BAD)
def test_bad_input_gets_openai_errors(router, path, content, status, code):
    url, _ = router
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"model": "tiny", "messages": "hi"}),
    ("/v1/messages", {"model": "tiny", "messages": []}),
    ("/v1/messages", {"model": "tiny", "system": 5, "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                      "tools": "no"}),
    ("/v1/responses", {"model": "tiny", "input": 5}),
    ("/v1/responses", {"model": "tiny", "input": [{"type": "nope"}]}),
    ("/v1/responses", {"model": "tiny", "input": "x", "instructions": ["a"]}),
])
def test_bad_prompts_get_400(router, path, body):
    url, _ = router
    r = post(url, path, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_prompt", r.text


def test_previous_response_id_must_be_a_string(router):
    url, _ = router
    r = post(url, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_type"


def test_debug_route_takes_the_endpoint(router):
    url, _ = router
    body = message_body("hi")
    chat = httpx.post(url + "/debug/route", json=body, timeout=10).json()
    messages = httpx.post(url + "/debug/route?endpoint=messages", json=body, timeout=10).json()
    assert messages["prompt_tokens"] > chat["prompt_tokens"] + 300  # Messages' system prompt is rendered too
    bad = httpx.post(url + "/debug/route?endpoint=nope", json=body, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_endpoint"


@pytest.mark.parametrize(("path", "make", "expected"), [
    ("/v1/messages", message_body, {"type": "error", "error": {"type": "api_error"}}),
    ("/v1/responses", response_body, {"type": "error", "code": "backend_failure"}),
])
def test_a_stream_cut_mid_way_ends_with_its_protocols_error_event(tiny_model, path, make, expected):
    url_fake, stop = run_fake_backend_in_thread(model="tiny", fail_mode="die_mid_stream")
    try:
        with serve_router(["--backends", url_fake, "--model", str(tiny_model), "--served-model-name", "tiny",
                           "--health-interval", "0.5"]) as (url, _):
            with httpx.stream("POST", url + path, json=make("hi", stream=True), timeout=20) as r:
                assert r.status_code == 200
                events = sse_events(r)
    finally:
        stop()
    name, data = events[-1]
    assert name == "error" and len(events) >= 2, events
    assert {k: (v if not isinstance(v, dict) else {"type": v["type"]}) for k, v in data.items()
            if k in expected} == expected
    assert "failed mid-stream" in (data.get("error") or data)["message"]
