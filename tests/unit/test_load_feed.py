"""The load feed (#16): the engine's report merged with this router's own counts (load.py's one rule), and
requests another router sent, seen only in the engine's report, steering this router as its own would."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from preble_router.load import EngineReport, LoadFeedState, LoadTracker
from preble_router.policies import make_policy
from preble_router.router import BlockSource, Router


def view(t: LoadTracker, now: float = 0.0) -> tuple[int, int, int]:
    v = t.view(0, now)
    return v.in_flight, v.pending_prefill_tokens, v.running_decode


def tracker() -> LoadTracker:
    t = LoadTracker(stale_after=1.0)
    t.add_backend(0, "http://a")
    return t


def test_without_report_the_view_is_the_local_count():
    t = tracker()
    r = t.begin(0, 100, 0.0)
    assert view(t) == (1, 100, 0) and t.feed_state(0) is LoadFeedState.OFF
    t.first_token(r, 0.1)
    assert view(t) == (1, 0, 1)


def test_burst_between_polls_counts_once_and_finishes_leave():
    t = tracker()
    t.apply_report(0, EngineReport(running=2, waiting=3, pending_prefill_tokens=500, decode_batch=2,
                                   source="preble"), t.mark(0), 0.0)
    assert view(t) == (5, 500, 2)
    burst = [t.begin(0, 100, 0.1) for _ in range(4)]  # after the report: on top of it
    assert view(t, 0.1) == (9, 900, 2)
    t.first_token(burst[0], 0.2)
    t.finish(burst[1], 0.2, ok=True)
    assert view(t, 0.2) == (8, 700, 3)
    # The next poll, asked now, includes the burst: counted once, not twice.
    mark = t.mark(0)
    t.apply_report(0, EngineReport(running=3, waiting=5, pending_prefill_tokens=700, decode_batch=3,
                                   source="preble"), mark, 0.3)
    assert view(t, 0.3) == (8, 700, 3)
    for r in burst:
        t.finish(r, 0.4, ok=True)  # they end before the next report: they leave the view at once
    assert view(t, 0.4) == (5, 500, 2)


def test_own_requests_the_report_missed_still_count():
    t = tracker()
    for _ in range(3):
        t.begin(0, 50, 0.0)
    t.apply_report(0, EngineReport(running=0, waiting=1), t.mark(0), 0.0)  # still on the wire
    assert view(t)[0] == 3


def test_metrics_report_estimates_tokens_from_the_mean_uncached_prompt():
    t = tracker()
    t.finish(t.begin(0, 200, 0.0), 0.0, ok=True)
    t.apply_report(0, EngineReport(running=1, waiting=4), t.mark(0), 0.0)
    assert view(t) == (5, 800, 1)


def test_stale_report_and_failure_fall_back_loudly(caplog):
    t = tracker()
    t.begin(0, 10, 0.0)
    t.apply_report(0, EngineReport(running=9, waiting=9), t.mark(0), 0.0)
    assert view(t, 0.5)[0] == 18
    assert view(t, 1.5) == (1, 10, 0)  # stale: local counts at once
    with caplog.at_level(logging.INFO, logger="preble_router.load"):
        t.check(1.5)
        t.check(1.6)
        assert t.feed_state(0) is LoadFeedState.DOWN
        assert [r.levelname for r in caplog.records] == ["WARNING"]  # once per transition
        t.apply_report(0, EngineReport(running=9, waiting=9), t.mark(0), 2.0)
        assert t.feed_state(0) is LoadFeedState.UP and caplog.records[-1].levelname == "INFO"
        t.feed_failed(0, "connection refused")
        t.feed_failed(0, "connection refused")
        assert view(t, 2.0) == (1, 10, 0)
        assert [r.levelname for r in caplog.records] == ["WARNING", "INFO", "WARNING"]


def two_backend_router(policy: str) -> Router:
    router = Router(model="m", tokenizer=None, policy=make_policy(policy), clock=lambda: 0.0)
    for url in ("http://a", "http://b"):
        router.add_backend(url, blocks=BlockSource.EXTERNAL, block_size=4, capacity_blocks=1000, healthy=True)
    return router


@pytest.mark.parametrize("policy", ["least_load", "lmetric", "cache_aware", "preble"])
def test_another_routers_requests_steer_this_router_as_its_own_would(policy):
    """Router `own` sent 6 requests to backend 0 itself; router `fed` sent nothing, but backend 0's report shows
    the 6 requests another router sent. Both must see the same load and make the same next decision."""
    own, fed, other = two_backend_router(policy), two_backend_router(policy), two_backend_router(policy)
    prompts = [[1000 * i + j for j in range(64)] for i in range(6)]
    for p in prompts:
        prepared = own.prepare_tokens(p)
        decision = own.decide(prepared)
        own.dispatch(prepared, decision.__class__(0, decision.reason, 0, decision.costs))
        prepared = other.prepare_tokens(p)
        decision = other.decide(prepared)
        other.dispatch(prepared, decision.__class__(0, decision.reason, 0, decision.costs))
    engine = other.load.get(0)  # what the engine would report: every request of the other router, waiting
    fed.load.apply_report(0, EngineReport(running=0, waiting=engine.in_flight,
                                          pending_prefill_tokens=engine.pending_prefill_tokens, decode_batch=0,
                                          source="preble"), fed.load.mark(0), 0.0)
    fed.load.apply_report(1, EngineReport(running=0, waiting=0, pending_prefill_tokens=0, decode_batch=0,
                                          source="preble"), fed.load.mark(1), 0.0)
    new = [7] * 64
    p_own, p_fed = own.prepare_tokens(new), fed.prepare_tokens(new)
    d_own, d_fed = own.decide(p_own), fed.decide(p_fed)
    loads = [[(b.in_flight, b.pending_prefill_tokens, b.running_decode) for b in p.snapshot.backends]
             for p in (p_own, p_fed)]
    assert loads[0] == loads[1] == [(6, 6 * 64, 0), (0, 0, 0)]
    assert d_own.backend_id == d_fed.backend_id == 1


def fake_engine(state: dict) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if state.get("down"):
            raise httpx.ConnectError("refused")
        if request.url.path == "/preble/load":
            return httpx.Response(200, json={"running": 2, "waiting": 5, "pending_prefill_tokens": 3000,
                                             "decode_batch": 1, "kv_cache_usage": 0.5})
        return httpx.Response(404)

    return httpx.MockTransport(handle)


def test_router_polls_merges_and_falls_back_on_failure():
    router = two_backend_router("least_load")
    state: dict = {}

    async def go() -> None:
        async with httpx.AsyncClient(transport=fake_engine(state)) as client:
            await router.poll_loads(client)
            assert router.load.view(0, 0.0).in_flight == 7 and router.load.view(0, 0.0).pending_prefill_tokens == 3000
            assert router.load_debug(0)["feed"] == "up" and router.backends[0].engine_kv_usage == 0.5
            state["down"] = True
            await router.poll_loads(client)
            assert router.load.view(0, 0.0).in_flight == 0 and router.load_debug(0)["feed"] == "down"

    asyncio.run(go())
