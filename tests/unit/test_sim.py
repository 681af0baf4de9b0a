"""The cluster simulator: time model, prefix-cache accounting, LRU eviction, KV events into the router's index,
dependencies, every registered policy, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.arrivals import poisson
from benchmarks.cli import main
from benchmarks.sim import SimConfig, Simulator, TimeProfile, parse_profile, simulate
from benchmarks.workloads import Request, generate, with_arrivals
from preble_router.policies import POLICIES

PROF = TimeProfile()


def explicit(rid: str, tokens: list[int], out: int, at: float, dep: str | None = None) -> Request:
    return Request(id=rid, segments=(), output_tokens=out, arrival=at, token_ids=tokens, depends_on=dep)


def run(reqs, policy="round_robin", **cfg):
    sim = Simulator(reqs, policy, SimConfig(**cfg))
    res = sim.run()
    return sim, res, {r["id"]: r for r in res.records}


def check_all(sim: Simulator) -> None:
    """Engine block accounting holds, and the router's index agrees with every engine's cache."""
    for eng in sim.engines:
        eng.check_invariants()
        assert sim.router.index.blocks_held(eng.backend_id) == len(eng.cache)


def test_step_time_model_gives_ttft_and_latency():
    prompt = list(range(100, 3100))  # 3000 tokens: chunks of 2048 and 952
    _, _, recs = run([explicit("a", prompt, 3, 0.0)], gpus=1)
    t1 = PROF.step_time(2048, 2048 * (0 + 2049 / 2), 0, 0)
    t2 = PROF.step_time(952, 952 * (2048 + 953 / 2), 0, 0)
    t3 = PROF.step_time(0, 0, 3001, 1)  # decode: context = prompt + the first token
    t4 = PROF.step_time(0, 0, 3002, 1)
    r = recs["a"]
    assert r["ttft"] == pytest.approx(t1 + t2)
    assert r["latency"] == pytest.approx(t1 + t2 + t3 + t4)
    assert r["cached_tokens"] == 0 and r["output_tokens"] == 3


def test_repeated_prompt_hits_all_full_blocks_but_the_last_token():
    prompt = list(range(16, 1016))  # 1000 tokens = 62 full blocks + 8
    short = list(range(5000, 5032))  # exactly 2 blocks: the last token is recomputed, so 1 block hits
    reqs = [explicit("a", prompt, 4, 0.0), explicit("b", prompt, 4, 5.0),
            explicit("s1", short, 2, 10.0), explicit("s2", short, 2, 15.0)]
    sim, res, recs = run(reqs, gpus=1)
    assert recs["a"]["cached_tokens"] == 0
    assert recs["b"]["cached_tokens"] == 992
    assert recs["b"]["ttft"] < recs["a"]["ttft"] / 3
    assert recs["s2"]["cached_tokens"] == 16
    assert res.summary["hit_rate"] == pytest.approx((992 + 16) / (2000 + 64))
    check_all(sim)


def test_lru_eviction_under_small_capacity_reported_to_the_router():
    a, b, c = (list(range(s, s + 128)) for s in (1000, 2000, 3000))  # 8 blocks each
    reqs = [explicit("a", a, 1, 0.0), explicit("b", b, 1, 1.0), explicit("c", c, 1, 2.0),
            explicit("a2", a, 1, 3.0)]
    # 20 blocks: a and b fit (8 + 8 cached); c takes the 4 never-used blocks and evicts a's 4 least recent
    # ones (its single output token is sampled by the prefill step: vLLM never allocates a block for it).
    # A request's blocks are freed tail first, so a keeps its leading 4 blocks.
    sim, res, recs = run(reqs, gpus=1, capacity_blocks=20, predicted_ttl=0.0)
    assert recs["a2"]["cached_tokens"] == 4 * 16
    assert res.summary["evicted_blocks"] >= 4
    check_all(sim)
    keys_b = sim.router.prepare_tokens(b).keys_by_block_size[16]
    eng = sim.engines[0]
    held_b = next((i for i, k in enumerate(keys_b) if k not in eng.cache), len(keys_b))
    assert sim.router.index.match(keys_b, [0], sim.now + 1)[0] == held_b


def test_cache_aware_beats_round_robin_on_a_prefix_heavy_workload():
    reqs = with_arrivals(generate("tool_use", 800, seed=3, scale=0.5), poisson(800, 60.0, 3))
    cfg = dict(gpus=4, capacity_blocks=2500)  # each GPU holds ~1/3 of the tools' docs
    rr = simulate(reqs, "round_robin", SimConfig(**cfg)).summary
    ca = simulate(reqs, "cache_aware", SimConfig(**cfg)).summary
    assert rr["errors"] == ca["errors"] == 0
    assert ca["hit_rate"] > rr["hit_rate"] + 0.05
    assert rr["gpu_requests"] == [200, 200, 200, 200]
    assert rr["imbalance"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_registered_policy_runs(policy):
    reqs = with_arrivals(generate("tool_use", 150, seed=1, scale=0.3), poisson(150, 80.0, 1))
    sim, res, _ = run(reqs, policy, gpus=3, capacity_blocks=1500)
    s = res.summary
    assert s["ok"] == 150 and s["errors"] == 0
    assert s["latency_avg"] > 0 and s["ttft_p99"] >= s["ttft_avg"] > 0
    assert 0 <= s["hit_rate"] <= 1 and s["imbalance"] >= 1
    check_all(sim)
    for eng in sim.engines:  # everything finished: all blocks unreferenced
        assert eng.n_dec == 0 and not eng.prefilling and eng.free + len(eng.lru) == eng.capacity


def test_dependencies_wait_for_the_previous_step():
    reqs = with_arrivals(generate("embodied_agent", 200, seed=2, scale=0.2, concurrent=8), poisson(200, 500.0, 2))
    _, res, recs = run(reqs, "cache_aware", gpus=2)
    assert res.summary["errors"] == 0
    waited = 0
    for r in reqs:
        if r.depends_on:
            assert recs[r.id]["start"] >= recs[r.depends_on]["end"] - 1e-12
            waited += recs[r.id]["start"] > r.arrival
    assert waited > 50  # at 500 req/s, most steps were held back by their predecessor
    assert res.summary["hit_rate"] > 0.8  # each step reuses its episode's history on the same GPU


def test_preble_local_scheduler_and_oversized_prompt():
    reqs = with_arrivals(generate("tool_use", 200, seed=4, scale=0.3), poisson(200, 150.0, 4))
    reqs.append(explicit("huge", list(range(20, 20 + 16 * 250)), 4, reqs[-1].arrival))
    sim, res, recs = run(reqs, "least_load", gpus=2, capacity_blocks=200, local_scheduler="preble")
    assert recs["huge"]["error"] and recs["huge"]["latency"] is None
    assert res.summary["errors"] == 1 and res.summary["ok"] == 200
    check_all(sim)


def test_parse_profile():
    assert parse_profile(None) == TimeProfile()
    p = parse_profile("llama3-8b-h100:a=0.01,capacity_blocks=100")
    assert p.a == 0.01 and p.capacity_blocks == 100 and p.b == TimeProfile().b
    assert parse_profile("b=1e-4").b == 1e-4
    with pytest.raises(ValueError):
        parse_profile("nope")


def test_cli_sim_and_compare_write_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["sim", "-w", "tool", "-n", "60", "-g", "2", "--rate", "30", "--scale", "0.2",
                 "--policies", "round_robin,cache_aware", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["label"] for s in summary] == ["round_robin", "cache_aware"]
    assert (out / "latency_cdf.png").stat().st_size > 1000
    assert len((out / "records_cache_aware_rate30.jsonl").read_text().splitlines()) == 60
    assert "cache_aware" in capsys.readouterr().out
    cmp_dir = tmp_path / "cmp"
    assert main(["compare", "--mode", "sim", "-w", "agent", "-n", "40", "-g", "2", "--rates", "10,40",
                 "--scale", "0.1", "--policies", "round_robin,least_load", "--out", str(cmp_dir),
                 "--no-progress"]) == 0
    assert (cmp_dir / "latency_vs_rate.png").exists() and (cmp_dir / "latency_cdf_rate40.png").exists()
    rows = json.loads((cmp_dir / "summary.json").read_text())
    assert sorted({r["rate"] for r in rows}) == [10, 40] and all(np.isfinite(r["latency_avg"]) for r in rows)


# ---- vLLM v1 block allocation: per scheduled chunk / token, preemption by recompute, the free queue's order ----
def keys_of(sim: Simulator, tokens: list[int]) -> list[int]:
    return sim.router.prepare_tokens(tokens).keys_by_block_size[16]


def index_content(sim: Simulator, backend_id: int) -> set[int]:
    """The keys the router's index holds for a backend (from the KV events the engines sent it)."""
    keys, masks = sim.router.index._holders[backend_id >> 6].items()
    bit = np.uint64(1 << (backend_id & 63))
    return {int(k) for k, m in zip(keys, masks) if m & bit}


def test_blocks_are_allocated_per_step_not_reserved_at_admission():
    a = list(range(100, 164))  # 4 blocks; 60 output tokens: 8 blocks by its last decode step
    b = list(range(1000, 1128))  # 8 blocks; one output token (sampled by the prefill step: no block for it)
    reqs = [explicit("a", a, 60, 0.0), explicit("b", b, 1, 0.02)]
    # 13 blocks. At 0.02 s a holds 5 (prompt + its first decode tokens): 8 are left, enough for b's prompt, not
    # for b's prompt + output (9 blocks): a whole-request reservation (8 for a) would leave b waiting for a.
    sim, res, recs = run(reqs, gpus=1, capacity_blocks=13)
    assert recs["b"]["admitted"] < 0.03  # at the first step boundary after it arrived
    assert recs["b"]["end"] < recs["a"]["start"] + 0.1 < recs["a"]["end"]
    assert recs["b"]["cached_tokens"] == 0 and res.summary["preemptions"] == 0
    # a grew from 5 to 8 blocks after b finished: its 3 new blocks evicted b's 3 last blocks (freed tail first)
    eng = sim.engines[0]
    kb = keys_of(sim, b)
    assert res.summary["evicted_blocks"] == 3
    assert [k in eng.cache for k in kb] == [True] * 5 + [False] * 3
    assert set(eng.cache) == set(keys_of(sim, a)) | set(kb[:5])
    check_all(sim)
    assert index_content(sim, eng.backend_id) == set(eng.cache)


def test_preemption_recomputes_the_newest_request_and_readmits_it_from_its_cached_blocks():
    a = list(range(100, 164))  # 4 blocks, 60 outputs: wants a 6th block at context 81 (its 17th decode step)
    b = list(range(1000, 1128))  # 8 blocks, 30 outputs: takes the 14th block at its first decode step
    reqs = [explicit("a", a, 60, 0.0), explicit("b", b, 30, 0.02)]
    sim, res, recs = run(reqs, gpus=1, capacity_blocks=14)
    eng = sim.engines[0]
    ka, kb = keys_of(sim, a), keys_of(sim, b)
    # When a needs its 6th block nothing is free: b (the newest) is preempted: its partial block goes to the
    # head of the free queue, its 8 cached ones to the end; a takes the partial one, then evicts b's 8th and
    # 7th blocks for its 7th and 8th. b cannot come back before a finishes (6 hits + 3 blocks > the 6 left), then
    # prefills its prompt and the tokens it had generated again from its 6 surviving blocks.
    assert res.summary["preemptions"] == 1 and recs["b"]["preemptions"] == 1 and recs["a"]["preemptions"] == 0
    assert recs["a"]["end"] < recs["b"]["end"]
    assert recs["b"]["first_token"] < recs["a"]["end"]  # its first token came before the preemption
    assert recs["b"]["cached_tokens"] == 0 and recs["b"]["output_tokens"] == 30  # as vLLM: the first admission's
    assert res.summary["evicted_blocks"] == 2
    assert res.summary["stored_blocks"] == 4 + 8 + 2  # a's prompt, b's, then b's 2 evicted blocks again
    assert set(eng.cache) == set(ka) | set(kb)
    check_all(sim)
    assert index_content(sim, eng.backend_id) == set(eng.cache)
    # the re-admission's prefill was short: 6 blocks hit, 2 prompt blocks + the generated tokens recomputed
    alone = run([explicit("b", b, 30, 0.0)], gpus=1, capacity_blocks=14)[2]["b"]
    assert recs["b"]["end"] - recs["a"]["end"] < alone["latency"]


def test_free_queue_order_unhashed_first_then_freed_full_blocks_oldest_first():
    a = list(range(100, 172))  # 4 full blocks + a partial one
    b = list(range(1000, 1064))  # 4 blocks
    c = list(range(5000, 5000 + 18 * 16))  # 18 blocks
    reqs = [explicit("a", a, 1, 0.0), explicit("b", b, 1, 1.0), explicit("a2", a, 1, 2.0), explicit("c", c, 1, 3.0)]
    # 24 blocks: a takes 5, b 4, a2 (4 hits, touched out of the queue) 1 more. As vLLM >= 0.24, a freed block
    # without a hash (a's and a2's partial block) goes to the head of the free queue, full ones tail first to
    # its end: before c, 16 blocks at the head, then b's 4 blocks (tail first), then a's 4 (freed again by a2).
    # c takes the 16 and evicts b's 2 last blocks.
    sim, res, recs = run(reqs, gpus=1, capacity_blocks=24, predicted_ttl=0.0)
    eng = sim.engines[0]
    ka, kb, kc = keys_of(sim, a), keys_of(sim, b), keys_of(sim, c)
    assert recs["a2"]["cached_tokens"] == 64
    assert res.summary["evicted_blocks"] == 2
    assert [k in eng.cache for k in kb] == [True, True, False, False]
    assert list(eng.lru) == kb[:2][::-1] + ka[::-1] + kc[::-1]  # the whole queue after c, oldest first
    assert eng.free == 0
    check_all(sim)
    assert index_content(sim, eng.backend_id) == set(eng.cache)
    assert sim.router.index.match(kb, [0], sim.now + 1)[0] == 2


def test_router_index_follows_the_simulated_caches_through_evictions_and_preemptions(monkeypatch):
    from benchmarks.sim import SimEngine

    reqs = with_arrivals(generate("tool_use", 300, seed=5, scale=0.3), poisson(300, 200.0, 5))
    checked = []
    step_end = SimEngine.step_end

    def checking_step_end(self, now):
        step_end(self, now)
        if self.steps % 7 == 0:
            self.check_invariants()
            assert index_content(self.sim, self.backend_id) == set(self.cache)
            checked.append(self.steps)

    monkeypatch.setattr(SimEngine, "step_end", checking_step_end)
    sim, res, _ = run(reqs, "cache_aware", gpus=2, capacity_blocks=400)
    s = res.summary
    assert s["ok"] == 300 and s["errors"] == 0
    assert s["preemptions"] > 0 and s["evicted_blocks"] > 0 and len(checked) > 20
    check_all(sim)
    for eng in sim.engines:
        assert index_content(sim, eng.backend_id) == set(eng.cache)
        assert not eng.running and eng.free + len(eng.lru) == eng.capacity


def test_prediction_outlives_a_queue_longer_than_the_grace():
    # Four long cold prompts fill both engines' queues for seconds (the slow profile). A new prefix's first request
    # waits behind them; its second request comes 3 s later, long after the 0.5 s grace, while the first has not
    # reached the engine's prefill yet (so no BlockStored event): the prediction lives with the request, so the
    # second one still finds the prefix there and follows it.
    slow = parse_profile("a=0.001,b=0.001,e=0,c=0,d=0")
    cold = [explicit(f"cold{i}", list(range(10_000 * (i + 1), 10_000 * (i + 1) + 3000)), 2, 0.01 * i)
            for i in range(4)]
    shared = list(range(500, 1500))
    first = explicit("first", shared + list(range(90_000, 90_050)), 2, 0.1)
    second = explicit("second", shared + list(range(91_000, 91_050)), 2, 3.1)
    sim, _, recs = run([*cold, first, second], "cache_aware", gpus=2, profile=slow, predicted_ttl=0.5)
    assert recs["first"]["admitted"] > recs["second"]["start"]  # still queued when the second was routed
    assert recs["second"]["decision"] == "cache_hit" and recs["second"]["matched_tokens"] >= 960
    assert recs["second"]["gpu"] == recs["first"]["gpu"]
    check_all(sim)


@pytest.mark.parametrize("local_scheduler", ["fcfs", "preble"])
def test_several_routers_run_in_front_of_one_fleet(local_scheduler):
    """#16: requests spread round robin over the routers; each merges the engines' load reports."""
    from benchmarks import workloads as wl
    from benchmarks.sim import SimConfig, Simulator

    reqs = wl.generate("tool_use", 200, seed=1)
    wl.with_arrivals(reqs, [i * 0.01 for i in range(len(reqs))])
    sim = Simulator(reqs, "least_load", SimConfig(gpus=4, routers=3, local_scheduler=local_scheduler,
                                                  load_poll_interval=0.25))
    res = sim.run()
    assert res.summary["routers"] == 3 and res.summary["errors"] == 0
    assert all(r.load.feed_state(0).value == "up" for r in sim.routers)
    sent = [sum(ld.dispatched for ld in (r.load.get(b) for b in r.backends)) for r in sim.routers]
    assert sent == [67, 67, 66]
    for e in sim.engines:
        e.check_invariants()
