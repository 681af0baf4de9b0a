"""The open-loop load generator against the fake OpenAI backend (and a mock transport for router headers)."""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.arrivals import poisson
from benchmarks.cli import main
from benchmarks.loadgen import live_summary, run_load
from benchmarks.workloads import Request, generate, with_arrivals
from testkit.fake_backend import run_fake_backend_in_thread
from testkit.ports import free_port


@pytest.fixture
def fake():
    started = []

    def start(**kw):
        url, stop = run_fake_backend_in_thread(**kw)
        started.append(stop)
        return url

    yield start
    for stop in started:
        stop()


def small(n=12, rate=200.0, name="tool_use", **kw):
    return with_arrivals(generate(name, n, seed=1, scale=0.02, vocab=1024, **kw), poisson(n, rate, 1))


async def test_streams_record_ttft_tokens_usage_and_keep_order(fake):
    url = fake(tokens_per_response=6)
    reqs = small()
    recs = await run_load(reqs, url, progress=False)
    assert [r["id"] for r in recs] == [r.id for r in reqs]
    for q, r in zip(reqs, recs):
        assert r["error"] is None and r["status"] == 200
        n = min(6, q.output_tokens)
        assert r["output_tokens"] == n and len(r["token_times"]) == n
        assert 0 < r["ttft"] <= r["token_times"][-1] <= r["latency"]
        assert r["prompt_tokens"] == q.prompt_tokens  # token-id prompt: the fake counts ids
        assert r["cached_tokens"] == 0
        assert r["start"] >= q.arrival - 0.05  # open loop: not before its arrival time
    s = live_summary(recs)
    assert s["errors"] == 0 and s["hit_rate"] == 0.0 and s["throughput_rps"] > 0
    assert s["latency_p99"] >= s["latency_p50"] > 0


async def test_chat_requests_go_to_chat_completions_and_the_role_chunk_is_no_token(fake):
    url = fake(tokens_per_response=5)
    reqs = small(4)
    for q in reqs:
        q.messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {q.id}"}]
    recs = await run_load(reqs, url, progress=False)
    for q, r in zip(reqs, recs):
        assert r["error"] is None and r["status"] == 200
        n = min(5, q.output_tokens)
        # the opening chunk carries the assistant role and no content: the first token is the next one
        assert r["output_tokens"] == n and len(r["token_times"]) == n
        assert r["prompt_tokens"] > 0


async def test_dependent_requests_wait_for_their_predecessor(fake):
    url = fake(tokens_per_response=2, delay_s=0.05)
    reqs = small(10, rate=1000.0, name="embodied_agent", concurrent=2)
    recs = {r["id"]: r for r in await run_load(reqs, url, progress=False)}
    chained = [q for q in reqs if q.depends_on]
    assert chained
    for q in chained:
        assert recs[q.id]["start"] >= recs[q.depends_on]["end"] - 1e-6


@pytest.mark.parametrize("mode, expect", [("500", "HTTP 500"), ("die_mid_stream", ""), ("hang", "timeout")])
async def test_errors_are_recorded_never_lost(fake, mode, expect):
    url = fake(fail_mode=mode, tokens_per_response=4)
    reqs = small(4)
    recs = await run_load(reqs, url, model="tiny", progress=False, timeout=0.5)
    assert len(recs) == 4
    for r in recs:
        assert r["error"] and expect in r["error"]
        assert r["latency"] is None and r["end"] is None
    s = live_summary(recs)
    assert s["errors"] == 4 and s["ok"] == 0 and s["latency_avg"] is None


async def test_unreachable_server_is_an_error_per_request():
    port = free_port()
    recs = await run_load(small(3), f"http://127.0.0.1:{port}", model="m", progress=False, timeout=2)
    assert [bool(r["error"]) for r in recs] == [True] * 3


async def test_router_headers_and_cached_tokens_are_recorded():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        n = body["max_tokens"]
        chunks = [{"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                                "prompt_tokens_details": {"cached_tokens": 32}}})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={
            "content-type": "text/event-stream", "x-preble-backend": "http://b1",
            "x-preble-matched-tokens": "32", "x-preble-decision": "exploit"})

    reqs = [Request(id="r0", segments=(), output_tokens=3, token_ids=list(range(20, 84)))]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        recs = await run_load(reqs, "http://router", model="m", client=client, progress=False)
    r = recs[0]
    assert (r["backend"], r["matched_tokens"], r["decision"]) == ("http://b1", 32, "exploit")
    assert (r["prompt_tokens"], r["cached_tokens"], r["output_tokens"]) == (64, 32, 3)
    summary = live_summary(recs)
    assert summary["hit_rate"] == 0.5
    assert (summary["over_predicted_tokens"], summary["under_predicted_tokens"]) == (0, 0)  # matched 32, cached 32
    body = seen[0]
    assert body["prompt"] == list(range(20, 84)) and body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_cli_live_against_the_fake(fake, tmp_path, capsys):
    url = fake(tokens_per_response=3)
    out = tmp_path / "live.jsonl"
    assert main(["live", "--url", url, "-w", "doc", "--rate", "100", "-n", "8", "--scale", "0.01",
                 "--out", str(out), "--no-progress"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x)["error"] is None for x in lines)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["ok"] == 8 and summary["errors"] == 0


def test_cli_compare_live_two_targets(fake, tmp_path):
    a, b = fake(tokens_per_response=2), fake(tokens_per_response=2, delay_s=0.02)
    out = tmp_path / "cmp"
    assert main(["compare", "--mode", "live", "--targets", f"fast={a},slow={b}", "-w", "tool", "-n", "6",
                 "--rates", "200", "--scale", "0.02", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in rows] == ["fast", "slow"] and all(r["ok"] == 6 for r in rows)
    assert rows[1]["ttft_avg"] > rows[0]["ttft_avg"]
    assert (out / "latency_cdf.png").exists() and (out / "records_slow_rate200.jsonl").exists()


def test_compare_routers_reports_medians_over_rounds():
    from benchmarks.compare_routers import _median_summaries

    rounds = [
        {"preble": {"label": "preble", "latency_avg": 1.0, "latency_p99": 9.0, "errors": 0, "hit_rate": 0.6},
         "smg": {"label": "smg", "latency_avg": 2.0, "latency_p99": 12.0, "errors": 1}},
        {"preble": {"label": "preble", "latency_avg": 3.0, "latency_p99": 7.0, "errors": 0, "hit_rate": 0.7}},
        {"preble": {"label": "preble", "latency_avg": 2.0, "latency_p99": 8.0, "errors": 2, "hit_rate": 0.5},
         "smg": {"label": "smg", "latency_avg": 4.0, "latency_p99": 10.0, "errors": 0}},
    ]
    med = _median_summaries(rounds, ["preble", "smg", "vllm-router"])
    assert med["preble"] == {"label": "preble", "rounds": 3, "latency_avg": 2.0, "latency_p99": 8.0, "errors": 2,
                             "hit_rate": 0.6}
    assert med["smg"]["latency_avg"] == 3.0 and med["smg"]["rounds"] == 2 and med["smg"]["errors"] == 1
    assert "vllm-router" not in med


def test_overhead_rounds_pair_each_router_with_smg_of_the_same_round():
    from benchmarks.overhead import summarize_rounds

    def rec(target: str, rnd: int, rps: float, p50: float) -> dict:
        return {"target": target, "concurrency": 32, "round": rnd, "router_cpu_ms_per_req": 0.4,
                "metrics": {"rps": rps, "p50_ms": p50}}

    results = [{"target": "direct", "concurrency": 32, "metrics": {"rps": 9000.0, "p50_ms": 3.0}},
               rec("ours", 1, 2000.0, 16.0), rec("smg", 1, 5000.0, 8.0),
               rec("smg", 2, 4000.0, 5.0), rec("ours", 2, 2400.0, 10.0),
               rec("ours", 3, 1000.0, 30.0), {"target": "smg", "skipped": "failed: boom"}]
    rows = summarize_rounds(results, ["ours", "smg"], [32])
    assert rows["ours@32"]["rps"] == 2000.0 and rows["ours@32"]["p50_ms"] == 16.0
    # round 3 has no smg figure: it counts in ours' medians, not in the ratios
    assert rows["ours@32"]["rps_vs_smg"] == [0.4, 0.6] and rows["ours@32"]["p50_vs_smg"] == [2.0, 2.0]
    assert "rps_vs_smg" not in rows["smg@32"]
