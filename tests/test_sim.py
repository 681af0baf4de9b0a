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
    # 20 blocks: a and b fit (8 + 8 cached); c (9 blocks with its output) evicts a's 5 least recent blocks.
    # A request's blocks are freed tail first, so a keeps its leading 3 blocks.
    sim, res, recs = run(reqs, gpus=1, capacity_blocks=20, predicted_ttl=0.0)
    assert recs["a2"]["cached_tokens"] == 3 * 16
    assert res.summary["evicted_blocks"] >= 5
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
