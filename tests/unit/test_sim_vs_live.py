"""benchmarks.sim_vs_live: profile fitting from live records, the sim-vs-live table, parameter inference, and
the simulator's overhead / contention terms it fits. Synthetic records only (no vLLM)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.arrivals import poisson
from benchmarks.demo import demo_workload
from benchmarks.sim import SimConfig, Simulator, TimeProfile
from benchmarks.sim_vs_live import (RunParams, compare, fit_profile, infer_rate, main, prefill_samples, rebuild_workload,
                                    render, robust_nnls)
from benchmarks.workloads import Request

TRUE = dict(overhead=0.015, a=0.008, b=2.0e-4, e=2.5e-7, c=7e-7, contention=0.5)


def ttft_of(n: int, c: int, busy: float = 0.0, p: dict = TRUE) -> float:
    steps = math.ceil(n / 2048)
    t = p["overhead"] + p["a"] * steps + p["b"] * n + p["e"] * (n * c + n * (n + 1) / 2)
    return t * (1 + p["contention"] * busy)


def record(rid: str, backend: str, start: float, n: int, c: int, out: int, *, busy: float = 0.0,
           slow: float = 1.0) -> dict:
    ttft = ttft_of(n, c, busy) * slow
    gap = TRUE["a"] + TRUE["c"] * (n + c + out / 2)
    times = [ttft + i * gap for i in range(out)]
    return {"id": rid, "arrival": start, "start": start, "ttft": ttft, "latency": times[-1], "end": start + times[-1],
            "token_times": times, "prompt_tokens": n + c, "cached_tokens": c, "output_tokens": out,
            "backend": backend, "error": None}


def synthetic_runs(seed: int = 0, slow_every: int = 0) -> dict[str, list[dict]]:
    """Requests one at a time on backend A (quiet B), then some on A while a long one runs on B."""
    rng = np.random.default_rng(seed)
    recs, t = [], 0.0
    for i in range(60):
        n = int(rng.integers(50, 7000))
        c = int(rng.choice([0, 0, 32 * int(rng.integers(1, 150))]))
        slow = 1.8 if slow_every and i % slow_every == 0 else 1.0
        r = record(f"q{i}", "A", t, n, c, int(rng.integers(4, 30)), slow=slow)
        recs.append(r)
        t = r["end"] + 1.0
    # B computes over [t, t + 100]; A's requests in that span are slowed by 1 + contention
    recs.append({**record("long", "B", t, 10, 0, 3), "ttft": 50.0, "latency": 100.0, "end": t + 100.0,
                 "token_times": [50.0, 75.0, 100.0], "cached_tokens": None})
    for i in range(12):
        n = int(rng.integers(100, 2000))
        r = record(f"b{i}", "A", t + 1 + 8 * i, n, 0, 3, busy=1.0)
        r["token_times"] = r["token_times"][:2]  # too short for a decode sample (its decode ran while B computed)
        recs.append(r)
    return {"cache_aware": recs}


def test_fit_recovers_a_known_profile():
    fit = fit_profile(synthetic_runs(), max_batched_tokens=2048)
    p = fit.profile
    assert p.overhead == pytest.approx(TRUE["overhead"], rel=0.05)
    assert p.a == pytest.approx(TRUE["a"], rel=0.02) and p.c == pytest.approx(TRUE["c"], rel=0.05)
    assert p.b == pytest.approx(TRUE["b"], rel=0.02) and p.e == pytest.approx(TRUE["e"], rel=0.02)
    assert p.contention == pytest.approx(TRUE["contention"], rel=0.05)
    assert fit.prefill_median_rel_err < 0.01 and fit.contention_samples == 12
    text = fit.describe()
    assert "overhead = 15.0 ms" in text and "contention = 0.50" in text


def test_fit_ignores_a_few_slowed_requests():
    fit = fit_profile(synthetic_runs(seed=1, slow_every=7))  # every 7th quiet request took 1.8x as long
    assert fit.profile.b == pytest.approx(TRUE["b"], rel=0.1)
    assert fit.profile.e == pytest.approx(TRUE["e"], rel=0.1)


def test_prefill_samples_skip_requests_that_shared_their_replica():
    a = record("a", "A", 0.0, 1000, 0, 4)
    b = record("b", "A", 0.1, 1000, 0, 4)  # sent while a was prefilling on A: neither is isolated
    c = record("c", "B", 0.05, 500, 0, 4)  # alone on B (a and b are on A)
    d = record("d", "A", a["end"] + b["end"] + 5, 300, 0, 4)
    samples = prefill_samples({"x": [a, b, c, d]})
    assert sorted(s["n"] for s in samples) == [300, 500]
    by_n = {s["n"]: s for s in samples}
    assert by_n[500]["busy"] == pytest.approx(1.0)  # A had requests in flight during c's whole prefill
    assert by_n[300]["busy"] == 0.0


def test_robust_nnls_is_nonnegative_and_robust():
    x = np.linspace(1, 100, 50)
    y = 3.0 + 0.5 * x
    y[::10] *= 3  # outliers
    coef = robust_nnls(np.c_[np.ones_like(x), x], y)
    assert coef == pytest.approx([3.0, 0.5], rel=1e-3)
    coef = robust_nnls(np.c_[np.ones_like(x), x], 10.0 - 0.01 * x)  # a negative slope is dropped
    assert coef[1] == 0 and coef[0] > 0


def test_compare_table_and_orderings():
    sim = {"round_robin": {"hit_rate": 0.42, "latency_avg": 2.1, "latency_p99": 10.0, "ttft_avg": 1.9},
           "cache_aware": {"hit_rate": 0.82, "latency_avg": 0.33, "latency_p99": 5.0, "ttft_avg": 0.3},
           "preble": {"hit_rate": 0.81, "latency_avg": 0.31, "latency_p99": 4.9, "ttft_avg": 0.3}}
    live = {"round_robin": {"hit_rate": 0.43, "latency_avg": 2.0, "latency_p99": 10.1},
            "cache_aware": {"hit_rate": 0.80, "latency_avg": 0.46, "latency_p99": 4.0},
            "preble": {"hit_rate": 0.83, "latency_avg": 0.52, "latency_p99": 4.9}}
    res = compare(sim, live)
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["round_robin"]["hit_diff_points"] == pytest.approx(-1.0)
    assert rows["preble"]["hit_diff_points"] == pytest.approx(-2.0)
    assert res["max_abs_hit_diff_points"] == pytest.approx(2.0)
    lat = res["order_latency"]
    assert lat["sim"] == ["preble", "cache_aware", "round_robin"]
    assert lat["live"] == ["cache_aware", "preble", "round_robin"]
    assert not lat["agree"] and (lat["pairs_agree"], lat["pairs"]) == (2, 3)
    hit = res["order_hit_rate"]
    assert hit["sim"] == ["cache_aware", "preble", "round_robin"] and not hit["agree"]
    text = render(res)
    assert "| round_robin | 0.420   | 0.430    | -1.0" in text
    assert "order by avg latency: sim preble < cache_aware < round_robin; live cache_aware < preble < round_robin: " \
           "differ (2/3 pairs agree)" in text
    live["preble"]["latency_avg"] = 0.40
    assert compare(sim, live)["order_latency"]["agree"]


def test_infer_rate_from_arrivals():
    recs = [{"arrival": float(t)} for t in poisson(50, 1.5, 3)]
    assert infer_rate(recs, 3) == pytest.approx(1.5)
    assert infer_rate(recs, 0) is None  # another seed's arrivals are not a rescaling of these


class FakeTokenizer:
    """Decodes ids to words; encoding adds BOS (0) and splits every word 'wN' into two tokens."""

    bos_token_id = 0

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def __call__(self, text, add_special_tokens=True):
        ids = [0] if add_special_tokens else []
        for w in text.split():
            ids += [int(w[1:]), 5]
        return {"input_ids": ids}


def test_rebuild_workload_retokenizes_like_the_live_router_and_checks_the_run():
    params = RunParams(requests=8, rate=2.0, seed=0)
    base = demo_workload(8, 2.0, max_prompt=8192 - 200, seed=0)
    live = [{"id": r.id, "arrival": r.arrival, "prompt_tokens": 1 + 2 * r.prompt_tokens} for r in base]
    reqs, fmt = rebuild_workload(params, live, tokenizer=FakeTokenizer())
    assert fmt == "text"
    assert [r.prompt_tokens for r in reqs] == [x["prompt_tokens"] for x in live]
    assert reqs[0].tokens[:3] == [0, base[0].tokens[0], 5]
    ids_live = [{**x, "prompt_tokens": r.prompt_tokens} for x, r in zip(live, base)]
    _, fmt = rebuild_workload(params, ids_live, tokenizer=FakeTokenizer())
    assert fmt == "ids"
    with pytest.raises(SystemExit, match="arrival"):
        rebuild_workload(RunParams(requests=8, rate=2.5, seed=0), live, tokenizer=FakeTokenizer())


def explicit(rid: str, tokens: list[int], out: int, at: float) -> Request:
    return Request(id=rid, segments=(), output_tokens=out, arrival=at, token_ids=tokens)


def test_sim_overhead_delays_the_engine_and_contention_slows_steps():
    prof = TimeProfile(a=0.01, b=1e-4, e=0.0, c=0.0, d=0.0, overhead=0.05)
    one = Simulator([explicit("x", list(range(100, 600)), 1, 0.0)], "round_robin",
                    SimConfig(gpus=1, profile=prof)).run()
    assert one.records[0]["ttft"] == pytest.approx(0.05 + 0.01 + 500 * 1e-4)
    # two engines, both prefilling at once: each step takes 1.5x with contention 0.5
    reqs = [explicit("p", list(range(100, 600)), 1, 0.0), explicit("q", list(range(1000, 1500)), 1, 0.0)]
    quiet = Simulator(reqs, "round_robin", SimConfig(gpus=2, profile=TimeProfile(a=0.01, b=1e-4, e=0.0))).run()
    busy = Simulator(reqs, "round_robin",
                     SimConfig(gpus=2, profile=TimeProfile(a=0.01, b=1e-4, e=0.0, contention=0.5))).run()
    t_quiet = {r["id"]: r["ttft"] for r in quiet.records}
    t_busy = {r["id"]: r["ttft"] for r in busy.records}
    assert t_quiet["p"] == pytest.approx(0.06) and t_quiet["q"] == pytest.approx(0.06)
    assert t_busy["q"] == pytest.approx(0.09)  # p's engine was running when q's step started
    assert t_busy["p"] == pytest.approx(0.06)  # q's engine was idle when p's step started


def test_command_on_a_synthetic_live_run(tmp_path, capsys):
    """params.json + records for two policies: fits, simulates, prints the table, writes JSON."""
    reqs = demo_workload(16, 0.1, max_prompt=8192 - 200, seed=0)
    rng = np.random.default_rng(0)
    runs = {}
    for name in ("round_robin", "cache_aware"):
        recs = []
        for i, r in enumerate(reqs):
            rec = record(r.id, "AB"[i % 2], r.arrival, r.prompt_tokens, 0, int(r.output_tokens))
            rec["cached_tokens"] = int(rng.integers(0, r.prompt_tokens // 2)) if name == "cache_aware" else 0
            recs.append(rec)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
        from benchmarks.loadgen import live_summary

        runs[name] = live_summary(recs)
    (tmp_path / "summary.json").write_text(json.dumps(runs))
    (tmp_path / "params.json").write_text(json.dumps({"requests": 16, "rate": 0.1, "seed": 0, "model_size": "small",
                                                      "num_gpu_blocks": 384, "prompt_format": "ids"}))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fitted profile" in out and "| cache_aware" in out and "order by avg latency" in out
    doc = json.loads((tmp_path / "sim_vs_live.json").read_text())
    assert [r["policy"] for r in doc["rows"]] == ["round_robin", "cache_aware"]
    assert doc["params"]["rate"] == 0.1 and doc["sim_config"]["capacity_blocks"] == 383
    assert doc["sim"]["cache_aware"]["ok"] == 16
    from benchmarks.cli import main as bench_main

    assert bench_main(["sim-vs-live", str(tmp_path), "--policies", "cache_aware", "--apply-contention", "--override", "contention=0",
                       "--out", str(tmp_path / "cli.json")]) == 0
    doc = json.loads((tmp_path / "cli.json").read_text())
    assert [r["policy"] for r in doc["rows"]] == ["cache_aware"] and doc["profile_used"]["contention"] == 0
