"""Two models behind one router, end to end: two real vLLM CPU replicas serving different model names (the tiny
model under two served names), the real router started with `--model-dir` for the second. Each model's requests
reach only its own replica, with its own block keys (its replica's KV events keyed with its name), and an
unknown model is a 404."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_models(tiny_model):
    with contextlib.ExitStack() as stack:
        (a,) = stack.enter_context(start_replicas(tiny_model, 1, block_size=32, served_model_name="tiny"))
        (b,) = stack.enter_context(start_replicas(tiny_model, 1, block_size=32, served_model_name="tiny-b"))
        argv = router_argv([a, b], tiny_model, policy="preble",
                           extra=["--model-dir", f"tiny-b={tiny_model}", "--health-interval", "0.5"])
        url = stack.enter_context(start_router(argv))
        yield url, a, b


def _complete(url: str, model: str, prompt: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": 2, "ignore_eos": True})


def test_each_model_reaches_only_its_own_replica(two_models):
    url, a, b = two_models
    ids = {m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}
    assert {"tiny", "tiny-b"} <= ids
    document = " ".join(f"word{i % 89} item{i % 13}" for i in range(300))
    for model, replica in (("tiny", a), ("tiny-b", b)):
        seen = []
        for i in range(3):
            r = _complete(url, model, document + f" question {i}")
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            seen.append((r.headers["x-preble-backend"], int(r.headers["x-preble-matched-tokens"]),
                         r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
            time.sleep(0.5)  # the engine's events land, as between real requests
        assert {backend for backend, _, _ in seen} == {replica.url}, seen
        # the second model's keys chain from its own name, in the router and in its replica's events alike
        assert all(predicted == observed for _, predicted, observed in seen), seen
        assert seen[-1][2] > 0, seen


def test_unknown_model_is_a_404(two_models):
    url, _, _ = two_models
    r = _complete(url, "no-such-model", "hello")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
