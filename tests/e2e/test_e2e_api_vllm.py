"""End to end, Anthropic Messages and OpenAI Responses: two real vLLM CPU replicas (tiny model, KV events, the
Responses store on) behind the real `preble-router` process. The router's predicted cached tokens equal what
vLLM reports, streams come through, and stored responses are served by the replica that holds them."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from benchmarks.vllm_replicas import start_replicas
from tests.e2e.test_e2e_vllm import text
from testkit.router_process import router_argv, start_router

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tiny_model):
    with start_replicas(tiny_model, 2, block_size=32, max_model_len=2048,
                        env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"}) as replicas:
        argv = router_argv(replicas, tiny_model, policy="cache_aware", extra=["--health-interval", "0.5"])
        with start_router(argv) as url:
            yield url, replicas


def sse(r: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in r.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and line != "data: [DONE]":
            events.append((name, json.loads(line[6:])))
    return events


def send(url: str, path: str, body: dict) -> tuple[httpx.Response, dict]:
    """The reply and its usage, streamed (usage from message_delta / response.completed) or whole."""
    if not body.get("stream"):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r, r.json()
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse(r)
    names = [n for n, _ in events]
    if path == "/v1/messages":
        assert names[0] == "message_start" and names[-1] == "message_stop", names
        return r, {"usage": next(d for n, d in events if n == "message_delta")["usage"]}
    assert names[0] == "response.created" and names[-1] == "response.completed", names
    return r, events[-1][1]["response"]


def cached(path: str, usage: dict) -> int:
    if path == "/v1/messages":
        return usage.get("cache_read_input_tokens") or 0
    return usage["input_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
def test_predicted_cached_tokens_equal_vllm_whole_and_streamed(cluster, path):
    url, _ = cluster
    system = text(11 if path == "/v1/messages" else 12, 300)
    pairs = []
    for i, stream in enumerate([False, False, True]):
        question = f"ask {i} " + text(400 + i, 8)
        if path == "/v1/messages":
            body = {"model": "tiny", "max_tokens": 3, "system": system,
                    "messages": [{"role": "user", "content": question}]}
        else:
            body = {"model": "tiny", "max_output_tokens": 3, "instructions": system, "input": question,
                    "store": False}
        r, reply = send(url, path, {**body, "stream": stream})
        pairs.append((int(r.headers["x-preble-matched-tokens"]), cached(path, reply["usage"])))
        time.sleep(0.3)  # the engine's KV events land, as between real requests
    assert pairs[0] == (0, 0), pairs
    assert all(p == o > 0 for p, o in pairs[1:]), pairs


def test_previous_response_id_follows_its_replica_and_get_mirrors_it(cluster):
    url, replicas = cluster
    created = httpx.post(url + "/v1/responses", json={"model": "tiny", "max_output_tokens": 3,
                                                       "input": "remember " + text(5, 20)}, timeout=60)
    assert created.status_code == 200, created.text
    response_id, holder = created.json()["id"], created.headers["x-preble-backend"]
    other = next(r.url for r in replicas if r.url != holder)
    assert httpx.get(f"{other}/v1/responses/{response_id}", timeout=10).status_code == 404  # only the holder has it
    for i in range(3):  # unrelated inputs: the policy alone would spread them over both replicas
        follow = httpx.post(url + "/v1/responses", json={
            "model": "tiny", "max_output_tokens": 3, "input": f"next {i} " + text(600 + i * 17, 30),
            "previous_response_id": response_id, "stream": i == 2}, timeout=60)
        assert follow.status_code == 200, follow.text
        assert follow.headers["x-preble-backend"] == holder
    through = httpx.get(f"{url}/v1/responses/{response_id}", timeout=10)
    direct = httpx.get(f"{holder}/v1/responses/{response_id}", timeout=10)
    assert through.status_code == direct.status_code == 200
    assert through.json() == direct.json()
    cancel = httpx.post(f"{url}/v1/responses/{response_id}/cancel", timeout=10)
    assert cancel.status_code == 400 and cancel.json() == httpx.post(
        f"{holder}/v1/responses/{response_id}/cancel", timeout=10).json()


def test_unknown_response_id_answers_as_vllm(cluster):
    url, replicas = cluster
    missing = "resp_0123456789abcdef0123456789abcdef"
    engine = httpx.get(f"{replicas[0].url}/v1/responses/{missing}", timeout=10)
    assert engine.status_code == 404
    for r in (httpx.get(f"{url}/v1/responses/{missing}", timeout=10),
              httpx.post(f"{url}/v1/responses/{missing}/cancel", timeout=10),
              httpx.post(url + "/v1/responses", json={"model": "tiny", "input": "x", "max_output_tokens": 2,
                                                       "previous_response_id": missing}, timeout=30)):
        assert r.status_code == 404 and r.json() == engine.json(), r.text
