"""End to end: two real vLLM CPU replicas (tiny random model built offline), KV events over ZMQ, and the
real `preble-router` process between them and the client, over HTTP."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router

pytestmark = pytest.mark.e2e

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def text(seed: int, n_words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] + str((seed * 31 + i) % 97) for i in range(n_words))


@pytest.fixture(scope="module")
def cluster(tiny_model):
    with start_replicas(tiny_model, 2, block_size=32, max_model_len=4096) as replicas:
        argv = router_argv(replicas, tiny_model, policy="cache_aware",
                           extra=["--max-body-bytes", "1000000", "--health-interval", "0.5", "--admin-open"])
        with start_router(argv) as url:
            yield url, replicas


def backends_view(url: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(url + "/debug/backends").json()["backends"]}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def completion(url: str, prompt, **extra) -> httpx.Response:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                  "ignore_eos": True, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def observed_cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_router_learns_block_size_and_events_flow(cluster):
    url, replicas = cluster
    view = backends_view(url)
    assert {v["block_size"] for v in view.values()} == {32}
    completion(url, text(1, 300))
    wait_for(lambda: sum(v["indexed_blocks"] for v in backends_view(url).values()) > 0, what="BlockStored events")


def test_predicted_cached_tokens_equal_vllm_usage(cluster):
    url, _ = cluster
    prefix = text(2, 400)
    pairs = []
    for i in range(4):
        r = completion(url, prefix + f" question {i} " + text(100 + i, 20))
        pairs.append((int(r.headers["x-preble-matched-tokens"]), observed_cached(r.json()["usage"])))
        time.sleep(0.3)  # let the engine's events land, as they would between real requests
    assert pairs[0] == (0, 0)
    assert all(p == o for p, o in pairs), pairs
    assert all(o > 0 for _, o in pairs[1:]), pairs


def test_chat_streaming_and_not_predicts_exactly(cluster):
    url, _ = cluster
    system = {"role": "system", "content": text(3, 350)}
    for i, stream in enumerate([False, False, True, True]):
        body = {"model": "tiny", "messages": [system, {"role": "user", "content": f"ask {i} " + text(200 + i, 10)}],
                "max_tokens": 4, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                predicted = int(r.headers["x-preble-matched-tokens"])
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            usage = json.loads(events[-2])["usage"]
        else:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            predicted, usage = int(r.headers["x-preble-matched-tokens"]), r.json()["usage"]
        assert predicted == observed_cached(usage), (i, predicted, usage)
        if i:
            assert predicted > 0
        time.sleep(0.3)


def test_token_id_prompts_and_prefix_affinity(cluster):
    url, _ = cluster
    placements: dict[int, set[str]] = {}
    for rnd in range(3):
        for group in range(4):
            prompt = [(group * 97 + j * 13) % 1000 + 3 for j in range(256)] + [rnd + 5] * 10
            r = completion(url, prompt)
            placements.setdefault(group, set()).add(r.headers["x-preble-backend"])
            if rnd:
                assert int(r.headers["x-preble-matched-tokens"]) == observed_cached(r.json()["usage"]) == 256
        time.sleep(0.3)
    assert all(len(b) == 1 for b in placements.values()), placements  # each prefix stays on its holder


def test_reset_prefix_cache_empties_that_backend(cluster):
    url, replicas = cluster
    prompt = [7] * 320
    holder = completion(url, prompt).headers["x-preble-backend"]
    wait_for(lambda: backends_view(url)[holder]["indexed_blocks"] > 0, what="blocks indexed")
    other = next(r.url for r in replicas if r.url != holder)
    others_blocks = backends_view(url)[other]["indexed_blocks"]
    assert httpx.post(holder + "/reset_prefix_cache", timeout=30).status_code == 200
    # vLLM publishes queued KV events after an engine step, so an idle engine's AllBlocksCleared waits for
    # its next request: send one too short to store a block, straight to the replica.
    httpx.post(holder + "/v1/completions", json={"model": "tiny", "prompt": [3, 4, 5], "max_tokens": 1}, timeout=30)
    wait_for(lambda: backends_view(url)[holder]["indexed_blocks"] == 0, what="AllBlocksCleared applied")
    assert backends_view(url)[other]["indexed_blocks"] == others_blocks
    time.sleep(3.2)  # predicted blocks outlive the reset by their TTL; after it, nothing is claimed
    route = httpx.post(url + "/debug/route", json={"model": "tiny", "prompt": prompt}).json()
    assert all(b["matched_tokens"] == 0 for b in route["backends"] if b["url"] == holder)


def test_router_reset_clears_index_at_once(cluster):
    url, replicas = cluster
    completion(url, [9] * 300)
    wait_for(lambda: sum(v["indexed_blocks"] for v in backends_view(url).values()) > 0, what="blocks indexed")
    r = httpx.post(url + "/reset_prefix_cache", timeout=30)
    assert r.status_code == 200 and set(r.json()["backends"]) == {rep.url for rep in replicas}
    assert all(v["indexed_blocks"] == 0 for v in backends_view(url).values())
    again = completion(url, [9] * 300)
    assert int(again.headers["x-preble-matched-tokens"]) == observed_cached(again.json()["usage"]) == 0


def test_bad_inputs_against_real_backends(cluster):
    url, _ = cluster
    r = httpx.post(url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", json={"model": "gpt-unknown", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 2_000_000})
    assert r.status_code == 413
    # Too long for the model: vLLM's own 400 is relayed as is, not retried elsewhere.
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5] * 5000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert r.headers["x-preble-attempts"] == "1"


def test_metrics_export_predicted_and_observed(cluster):
    url, _ = cluster
    text_ = httpx.get(url + "/metrics").text
    lines = [line for line in text_.splitlines() if line.startswith("preble_cached_tokens_total")]
    predicted = sum(float(line.split()[-1]) for line in lines if 'source="predicted"' in line)
    observed = sum(float(line.split()[-1]) for line in lines if 'source="observed"' in line)
    assert observed > 0 and predicted == observed


def test_two_routers_agree_from_the_same_events(cluster, tiny_model):
    """A second router that never saw the traffic builds the same index from the engines' KV events."""
    url, replicas = cluster
    argv = router_argv(replicas, tiny_model, policy="cache_aware", extra=["--health-interval", "0.5", "--admin-open"])
    with start_router(argv) as other:
        prompts = [[(g * 131 + j) % 800 + 7 for j in range(300)] for g in range(3)]
        for p in prompts:
            completion(url, p)  # through the first router only

        def agree():
            a, b = backends_view(url), backends_view(other)
            return all(a[u]["indexed_blocks"] == b[u]["indexed_blocks"] > 0 or a[u]["indexed_blocks"] ==
                       b[u]["indexed_blocks"] for u in a) and sum(b[u]["indexed_blocks"] for u in b) > 0

        try:
            wait_for(agree, what="both routers' indexes to match")
        except AssertionError:
            raise AssertionError(f"indexes differ: {backends_view(url)} vs {backends_view(other)}") from None
        time.sleep(3.2)  # let the first router's own predictions expire: only event-fed state remains
        for p in prompts:
            body = {"model": "tiny", "prompt": p + [3] * 10}
            mine = {b["url"]: b["matched_tokens"] for b in httpx.post(url + "/debug/route", json=body).json()["backends"]}
            theirs = {b["url"]: b["matched_tokens"] for b in httpx.post(other + "/debug/route", json=body).json()["backends"]}
            assert mine == theirs and max(mine.values()) >= 288


def test_kv_events_auto_follows_the_advertised_endpoints(cluster, tiny_model):
    """A router started with no event flags at all (the default, --kv-events auto) subscribes to what each engine
    advertises at /kv_event_sources, and predicts exactly what vLLM then reports as cached."""
    _, replicas = cluster
    argv = router_argv([r.url for r in replicas], tiny_model, policy="preble",
                       extra=["--health-interval", "0.5", "--admin-open"])
    assert "--kv-events" not in argv
    with start_router(argv) as url:
        wait_for(lambda: all((v["kv_events"] or {}).get("state") == "flowing" for v in backends_view(url).values()),
                 timeout=20, what="auto subscription")
        view = backends_view(url)
        assert {v["kv_events"]["endpoint"] for v in view.values()} == {r.kv_endpoint for r in replicas}, view
        prefix = text(7, 400)
        pairs = []
        for i in range(4):
            r = completion(url, prefix + f" q{i} " + text(300 + i, 20))
            pairs.append((int(r.headers["x-preble-matched-tokens"]), observed_cached(r.json()["usage"])))
            time.sleep(0.3)
        assert pairs[0] == (0, 0) and all(p == o for p, o in pairs) and all(o > 0 for _, o in pairs[1:]), pairs
