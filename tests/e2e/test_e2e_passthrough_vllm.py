"""End to end: the rest of vLLM's API through the real router in front of two real vLLM CPU replicas (tiny
generative model, LoRA enabled): balanced endpoints answer as a replica does directly, and a LoRA adapter (built
here, offline: zero B matrices on q_proj/v_proj) loaded through the router reaches both replicas."""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router

pytestmark = pytest.mark.e2e


def build_adapter(model_dir, out_dir, rank: int = 8):
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    outs = {"q_proj": hidden, "v_proj": kv_heads * (hidden // heads)}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(out, rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(outs), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": str(model_dir)}))
    return out_dir


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    adapter = build_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "ad1")
    with start_replicas(tiny_model, 2, block_size=32, max_model_len=2048, kv_events=False,
                        extra_args=["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"],
                        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as replicas:
        argv = router_argv(replicas, tiny_model, policy="cache_aware", kv_events=False,
                           extra=["--health-interval", "0.5", "--admin-open"])
        with start_router(argv) as url:
            yield url, [r.url for r in replicas], adapter


def same_answer(router: str, direct: str, method: str, path: str, **kw) -> httpx.Response:
    through = httpx.request(method, router + path, timeout=30, **kw)
    straight = httpx.request(method, direct + path, timeout=30, **kw)
    assert through.status_code == straight.status_code, (path, through.text, straight.text)
    return through, straight


def test_tokenize_detokenize_version_as_direct(cluster):
    url, replicas, _ = cluster
    through, straight = same_answer(url, replicas[0], "POST", "/tokenize", json={"model": "tiny", "prompt": "hi there"})
    assert through.status_code == 200 and through.json() == straight.json()
    tokens = through.json()["tokens"]
    through, straight = same_answer(url, replicas[1], "POST", "/detokenize", json={"model": "tiny", "tokens": tokens})
    assert through.status_code == 200 and through.json() == straight.json()
    through, straight = same_answer(url, replicas[0], "GET", "/version")
    assert through.status_code == 200 and through.json() == straight.json()
    assert through.headers["x-preble-backend"] in replicas


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/embeddings", {"model": "tiny", "input": "hello"}),
    ("/pooling", {"model": "tiny", "input": "hello"}),
    ("/score", {"model": "tiny", "text_1": "a", "text_2": "b"}),
    ("/rerank", {"model": "tiny", "query": "a", "documents": ["b", "c"]}),
])
def test_pooling_endpoints_on_a_generative_model_answer_as_direct(cluster, path, body):
    url, replicas, _ = cluster
    through, straight = same_answer(url, replicas[0], "POST", path, json=body)
    assert through.status_code in (400, 404), through.text
    if "error" in straight.json():  # the same OpenAI-style error, relayed
        assert set(through.json()["error"]) == set(straight.json()["error"])
    else:
        assert through.json().keys() == straight.json().keys()


def test_lora_load_reaches_both_replicas(cluster):
    url, replicas, adapter = cluster
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": str(adapter)}, timeout=60)
    assert r.status_code == 200, r.text
    assert set(r.json()["backends"]) == set(replicas)
    for replica in replicas:  # each replica lists it itself
        ids = [m["id"] for m in httpx.get(replica + "/v1/models", timeout=10).json()["data"]]
        assert "ad1" in ids
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert "ad1" in ids
    done = httpx.post(url + "/v1/completions", json={"model": "ad1", "prompt": "hello", "max_tokens": 2},
                      timeout=60)
    assert done.status_code == 200, done.text
    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": str(adapter)},
                       timeout=60)
    assert again.status_code == 400, again.text  # each replica's own refusal, relayed per backend
    assert {v["status"] for v in again.json()["backends"].values()} == {400}
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ad1"}, timeout=60)
    assert gone.status_code == 200, gone.text
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert "ad1" not in ids
