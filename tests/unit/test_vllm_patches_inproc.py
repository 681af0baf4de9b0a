"""vllm_patches.scheduler inside vLLM's real Scheduler / AsyncScheduler, in process (no server, no model run):
vLLM's schedule() and KV-cache manager, a fake model output per step. ~10 s, mostly importing vLLM."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

PREFIX = list(range(100, 612))  # 16 blocks of 32


@pytest.fixture(scope="module")
def vllm_bits(tiny_model):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    init_none_hash(sha256)
    hasher = get_request_block_hasher(32, sha256)

    def make(cls, num_blocks: int = 200, max_num_seqs: int = 1):
        model = ModelConfig(model=str(tiny_model), max_model_len=4096, dtype="float32", skip_tokenizer_init=True)
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, max_model_len=4096,
                                is_encoder_decoder=False)
        cache = CacheConfig(block_size=32, cache_dtype="auto", enable_prefix_caching=True)
        config = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache)
        cache.num_gpu_blocks = num_blocks
        spec = FullAttentionSpec(block_size=32, num_kv_heads=1, head_size=16, dtype=torch.float32)
        kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        return cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
                   block_size=32, log_stats=True)

    def request(rid: str, tokens: list[int], max_tokens: int = 2):
        return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None, block_hasher=hasher)

    def step(s, vllm_cached: dict[str, int]) -> list[str]:
        """One engine step with a fake model output (token 7 for everyone); records vLLM's cached counts."""
        out = s.schedule()
        new = [r.req_id for r in out.scheduled_new_reqs]
        for rid in new:
            vllm_cached[rid] = s.requests[rid].prefill_stats.num_cached_tokens
        ids = new + list(out.scheduled_cached_reqs.req_ids)
        s.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                                    sampled_token_ids=[[7] for _ in ids]))
        return new

    return make, request, step


@pytest.mark.parametrize("cls_name", ["PrebleScheduler", "PrebleAsyncScheduler"])
def test_real_scheduler_orders_by_hit_group_and_counts_like_vllm(vllm_bits, cls_name, tmp_path, monkeypatch):
    import vllm_patches.scheduler as mod
    from vllm.v1.core.sched.request_queue import RequestQueue
    from vllm_patches.plugin import read_load

    monkeypatch.setenv("PREBLE_LOAD_FILE", str(tmp_path / "load.json"))
    make, request, step = vllm_bits
    s = make(getattr(mod, cls_name))
    assert isinstance(s.waiting, RequestQueue) and isinstance(s.kv_holding_waiting, RequestQueue)
    assert read_load(tmp_path / "load.json")["running"] == 0  # an idle snapshot from the start

    vllm_cached: dict[str, int] = {}
    order = []
    s.add_request(request("warm", PREFIX + [5] * 32))
    while s.has_requests():
        order += step(s, vllm_cached)

    # The lookup is read-only: no refcount, no LRU (free-queue) change.
    pool = s.kv_cache_manager.block_pool
    free_before = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    refs_before = [b.ref_cnt for b in pool.blocks]
    probe = request("probe", PREFIX + [6] * 32)
    assert s._preble_cached_tokens(probe) == 512
    assert [b.block_id for b in pool.free_block_queue.get_all_free_blocks()] == free_before
    assert [b.ref_cnt for b in pool.blocks] == refs_before

    # Fresh prompts arrive first, prefix-sharing ones after; --max-num-seqs 1 admits one at a time.
    for i in range(3):
        s.add_request(request(f"L{i}", [9 + i] * 544))
    for i in range(3):
        s.add_request(request(f"H{i}", PREFIX + [20 + i] * 32))
    snap = s.preble_load()  # (the file is rewritten at most every PREBLE_LOAD_INTERVAL_S while busy)
    assert snap["waiting"] == 6 and snap["groups"][0] == 3 and snap["groups"][9] == 3
    assert snap["pending_prefill_tokens"] == 3 * 544 + 3 * 32
    while s.has_requests():
        order += step(s, vllm_cached)
    assert order == ["warm", "H0", "H1", "H2", "L0", "L1", "L2"]
    assert vllm_cached == {"warm": 0, "H0": 512, "H1": 512, "H2": 512, "L0": 0, "L1": 0, "L2": 0}

    load = s.preble_load()
    assert load["admitted_by_group"] == [4, 0, 0, 0, 0, 0, 0, 0, 0, 3] and load["admitted_aged"] == 0
    assert load["admitted_cached_tokens"] == sum(vllm_cached.values())  # the scheduler's count = vLLM's
    assert load["admitted_prompt_tokens"] == 544 * 7
    assert load["running"] == load["waiting"] == 0
    assert json.loads((tmp_path / "load.json").read_text())["admitted_cached_tokens"] == 3 * 512
    s.shutdown()
    assert not (tmp_path / "load.json").exists()


def test_settings_from_env_and_additional_config(monkeypatch):
    from types import SimpleNamespace

    from vllm_patches.scheduler import preble_settings

    monkeypatch.setenv("PREBLE_MAX_WAIT_S", "3")
    monkeypatch.setenv("PREBLE_REFRESH_S", "0.2")
    cfg = SimpleNamespace(additional_config={"preble": {"max_wait_s": 5}})
    settings = preble_settings(cfg)
    assert settings["max_wait_s"] == 5.0 and settings["refresh_s"] == 0.2 and settings["load_interval_s"] == 0.05
    assert preble_settings(SimpleNamespace(additional_config={}))["max_wait_s"] == 3.0
