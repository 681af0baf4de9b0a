"""benchmarks.live_suite without vLLM: the mixes as sent (text or chat, shared prefixes kept), the live targets on
synthetic numbers, and the simulator replay of synthetic live records."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from benchmarks import live_suite as ls
from benchmarks.loadgen import request_body, request_path


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_every_mix_builds_the_same_requests_for_a_seed(tokenizer):
    for name, mix in ls.MIXES.items():
        a = ls.build_mix(mix, 30, 1, tokenizer)
        b = ls.build_mix(mix, 30, 1, tokenizer)
        assert len(a) == 30, name
        assert [(r.id, r.arrival, r.text, r.messages) for r in a] == [(r.id, r.arrival, r.text, r.messages)
                                                                      for r in b]
        assert all(n <= ls.MAX_SEGMENT_TOKENS for r in a for _, n in r.segments)
        assert all(4 <= r.output_tokens <= ls.MAX_OUTPUT_TOKENS for r in a)
        ids = {r.id for r in a}
        assert all(r.depends_on is None or r.depends_on in ids for r in a), name
        assert ls.build_mix(mix, 30, 2, tokenizer)[0].arrival != a[0].arrival


def test_chat_sessions_resend_their_history_and_documents_stay_shared(tokenizer):
    reqs = {r.id: r for r in ls.build_mix(ls.MIXES["mixed"], 60, 0, tokenizer)}
    kinds = Counter(r.id.split("-")[0] for r in reqs.values())
    assert set(kinds) == {"tool", "docqa", "chat"}
    for r in reqs.values():
        if r.id.startswith("tool"):
            assert r.messages is None and r.text
            assert request_path(r) == "/v1/completions"
            continue
        assert r.text is None and request_path(r) == "/v1/chat/completions"
        assert request_body(r, "tiny")["messages"] == r.messages
        roles = [m["role"] for m in r.messages]
        assert roles[0] == "system" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles[1:], roles[2:]))  # user and assistant turns alternate
        if r.depends_on is not None:  # the next turn: the previous turn's messages, then more
            prev = reqs[r.depends_on].messages
            assert r.messages[:len(prev)] == prev and len(r.messages) == len(prev) + 2
    systems = Counter(r.messages[0]["content"] for r in reqs.values() if r.id.startswith("docqa"))
    assert len(systems) <= 3 and max(systems.values()) > 1  # questions about three shared documents


def _summary(avg: float, p99: float, hit: float, errors: int = 0) -> dict:
    return {"latency_avg": avg, "latency_p99": p99, "hit_rate": hit, "errors": errors}


def test_live_targets_pass_and_fail_on_synthetic_runs():
    runs = {"preble": {0: _summary(1.0, 2.0, 0.80), 1: _summary(1.2, 2.2, 0.82)},
            "smg": {0: _summary(1.1, 2.0, 0.80), 1: _summary(1.3, 2.2, 0.81)},
            "round_robin": {0: _summary(3.0, 6.0, 0.40), 1: _summary(3.0, 6.0, 0.40)}}
    t = ls.mix_stats(runs, "mixed")["targets"]
    assert t["hit"]["best"] == "smg" and t["hit"]["pass"]
    assert t["avg"]["policy"] == "smg" and t["avg"]["ratio"] < 1.0 and t["avg"]["pass"]
    assert t["p99"]["ratio"] == pytest.approx(1.0) and t["p99"]["pass"]
    assert t["spread"]["router"] == "smg" and t["spread"]["ratio"] == pytest.approx(1.2 / 1.3)
    assert t["pass"]
    # The same figures where prefix affinity must fail: within 0.8x of the best other is demanded.
    hard = ls.mix_stats(runs, "hot")["targets"]
    assert not hard["avg"]["pass"] and not hard["pass"]
    # An error fails the mix whatever the latencies.
    runs["preble"][1]["errors"] = 1
    assert not ls.mix_stats(runs, "mixed")["targets"]["pass"]


def test_the_table_says_which_target_failed():
    runs = {"preble": {0: _summary(2.0, 9.0, 0.5)}, "cache_aware": {0: _summary(1.0, 3.0, 0.8)}}
    cell = ls.mix_stats(runs, "tool")
    text = ls.mix_table("tool", cell, ["preble", "cache_aware"])
    assert "| preble | 2.000 [2.000-2.000]" in text
    assert "avg 2.000x of cache_aware (<= 1.0) FAIL" in text


def test_parse_rates_knows_the_mixes():
    assert ls.parse_rates("hot=2.5,tool=1") == {"hot": 2.5, "tool": 1.0}
    with pytest.raises(SystemExit):
        ls.parse_rates("nope=1")


def test_one_replica_is_shown_but_never_the_router_to_beat():
    runs = {"preble": {0: {**_summary(1.0, 2.0, 0.8), "replica_requests": {"a": 30, "b": 30}}},
            "smg": {0: {**_summary(1.2, 2.4, 0.8), "replica_requests": {"a": 57, "b": 3}}},
            "one_replica": {0: {**_summary(0.5, 1.0, 0.8), "replica_requests": {"a": 60, "b": 0}}}}
    cell = ls.mix_stats(runs, "tool")
    t = cell["targets"]
    assert t["avg"]["policy"] == "smg" and t["p99"]["policy"] == "smg" and t["spread"]["router"] == "smg"
    assert cell["ratios"]["one_replica"]["avg"] == pytest.approx(2.0)  # still shown beside the others
    assert cell["busiest_share"] == {"preble": 0.5, "smg": 0.95, "one_replica": 1.0}
    text = ls.mix_table("tool", cell, ["preble", "smg", "one_replica"])
    assert "| 95% |" in text and "| 100% |" in text
    # One replica is twice as fast as the best router on two (preble): this mix does not need both replicas.
    assert cell["one_replica"]["best"] == "preble" and cell["one_replica"]["ratio"] == pytest.approx(0.5)
    assert "one replica carries this mix" in text


def test_a_variant_of_preble_is_a_candidate_not_the_router_to_beat():
    """preble+flag=value runs beside the default to be compared with it, never as "the best other"; its CPU per
    request is shown like every router's."""
    runs = {"preble": {0: {**_summary(1.0, 2.0, 0.8), "router_cpu_ms_per_req": 6.5}},
            "preble+preble-decode-share=1": {0: _summary(0.5, 1.0, 0.8)},
            "smg": {0: {**_summary(1.2, 2.4, 0.8), "router_cpu_ms_per_req": 2.25}}}
    cell = ls.mix_stats(runs, "tool")
    t = cell["targets"]
    assert t["avg"]["policy"] == "smg" and t["p99"]["policy"] == "smg" and t["hit"]["best"] == "smg"
    assert t["spread"]["router"] == "smg"
    assert cell["ratios"]["preble+preble-decode-share=1"]["avg"] == pytest.approx(2.0)  # shown, compared
    assert cell["router_cpu"] == {"preble": 6.5, "smg": 2.25}
    text = ls.mix_table("tool", cell, list(runs))
    assert "| 6.50 |" in text and "| 2.25 |" in text and "router CPU ms/req" in text


def test_the_one_replica_baseline_is_the_one_compare_routers_runs():
    from benchmarks.compare_routers import ONE_REPLICA, OURS

    assert ls.ONE_REPLICA == ONE_REPLICA and ONE_REPLICA in OURS


def test_report_only_labels_come_from_the_stored_run(tmp_path):
    args = ls.build_parser().parse_args(["--report-only", "--out", str(tmp_path)])
    (tmp_path / "live_suite.json").write_text(json.dumps(
        {"requests": 90, "pin_replicas": False, "num_gpu_blocks": 512, "rates": {"hot": 9.0}}))
    got, rates = ls.stored_settings(ls.stored_run(tmp_path), args, {"hot": 6.0, "tool": 2.0})
    assert (got.requests, got.pin_replicas, got.num_gpu_blocks) == (90, False, 512)
    assert got.warmup is False  # a run stored before the warm-up pass existed had none
    assert rates == {"hot": 9.0, "tool": 2.0}
    assert got.report_only and args.requests != 90  # the given namespace is left as it was


def test_report_only_without_a_stored_run_keeps_the_flags(tmp_path, capsys):
    args = ls.build_parser().parse_args(["--report-only", "--out", str(tmp_path), "--requests", "30"])
    got, rates = ls.stored_settings(ls.stored_run(tmp_path), args, {"tool": 2.0})
    assert got.requests == 30 and rates == {"tool": 2.0}
    assert "not readable" in capsys.readouterr().out


def test_a_warmed_up_run_is_reported_as_one(tmp_path):
    args = ls.build_parser().parse_args(["--report-only", "--out", str(tmp_path)])
    assert args.warmup is True and ls.build_parser().parse_args(["--no-warmup"]).warmup is False
    (tmp_path / "live_suite.json").write_text(json.dumps({"requests": 60, "warmup": True}))
    got, _ = ls.stored_settings(ls.stored_run(tmp_path), args, {})
    assert got.warmup is True
