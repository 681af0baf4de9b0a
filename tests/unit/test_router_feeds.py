"""How the router knows a backend's blocks: KV events, advertised by the engine (--kv-events auto), or its own
estimate while events are missing or silent. Unit level: fake HTTP answers, no engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from preble_router.kv_events import FeedState
from preble_router.policies import make_policy
from preble_router.router import Router

BS = 4
pytestmark = pytest.mark.timeout(20)


def _sources(advertised):
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/kv_event_sources"
        return httpx.Response(200, json=advertised) if advertised is not None else httpx.Response(404)
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_auto_subscribes_to_the_advertised_endpoint_with_the_backends_host(tmp_path):
    router = Router(model="m", tokenizer=None, policy=make_policy("round_robin"), kv_events_auto=True)
    backend = router.add_backend("http://127.0.0.1:8001")
    backend.healthy = True
    assert router.subscriber(backend.backend_id) is None and router.index.is_estimated(backend.backend_id)
    assert backend.kv_auto
    async with _sources({"0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
                               "replay_endpoint": "tcp://*:5558", "topic": "kv"}}) as client:
        await router.discover_kv_events(client, backend)
    sub = router.subscriber(backend.backend_id)
    try:
        assert sub is not None and (sub.endpoint, sub.replay_endpoint) == ("tcp://127.0.0.1:5557",
                                                                           "tcp://127.0.0.1:5558")
        assert sub.topic == b"kv" and not backend.kv_auto
        assert sub.state is FeedState.CONNECTING and router.index.is_estimated(backend.backend_id)
    finally:
        await router.stop()


@pytest.mark.parametrize("advertised", [{}, {"0": {"enable_kv_cache_events": True, "endpoint": "tcp://h:5557"}}])
async def test_auto_without_usable_events_stays_estimated_and_says_why(advertised):
    router = Router(model="m", tokenizer=None, policy=make_policy("round_robin"), kv_events_auto=True)
    backend = router.add_backend("http://127.0.0.1:8001")
    async with _sources(advertised) as client:
        await router.discover_kv_events(client, backend)
    assert router.subscriber(backend.backend_id) is None and router.index.is_estimated(backend.backend_id)
    assert backend.kv_problem and not backend.kv_auto


async def test_a_silent_feed_routes_on_the_estimate_and_flowing_switches_back():
    router = Router(model="m", tokenizer=None, policy=make_policy("cache_aware"), events_silence=0.05)
    backend = router.add_backend("http://127.0.0.1:8001", "tcp://127.0.0.1:1", None)  # nothing there
    backend.healthy, backend.block_size = True, BS
    router.index.set_capacity(backend.backend_id, 1000)
    sub = router.subscriber(backend.backend_id)
    router._feed_changed(backend.backend_id, True)  # as the subscriber does once the engine answers
    sub.state = FeedState.FLOWING
    prepared = router.prepare_tokens(list(range(4 * BS)))
    inflight = router.dispatch(prepared, router.decide(prepared))
    assert inflight.predicted is not None  # events mode: a prediction until its events come
    await asyncio.sleep(0.1)
    router.check_event_feeds()
    assert sub.state is FeedState.FLOWING  # still in flight: nothing is due yet
    done = router.prepare_tokens(list(range(2 * BS)) + list(range(500, 500 + 2 * BS)))
    finished = router.dispatch(done, router.decide(done))
    router.finish(done, finished, ok=True, output_tokens=1, cached_tokens=2 * BS)  # stored 2 new blocks
    await asyncio.sleep(0.1)
    router.check_event_feeds()
    assert sub.state is FeedState.SILENT
    assert router.index.is_estimated(backend.backend_id)
    assert router.index.blocks_held(backend.backend_id) == 6  # the predictions became the estimate
    router.finish(prepared, inflight, ok=True, output_tokens=1)
    assert router.index.blocks_held(backend.backend_id) == 6
    again = router.prepare_tokens(list(range(4 * BS)) + list(range(100, 100 + BS)))
    assert router.decide(again).matched_tokens == 4 * BS  # routed on the estimate
    router._feed_changed(backend.backend_id, True)
    assert not router.index.is_estimated(backend.backend_id) and router.index.blocks_held(backend.backend_id) == 0
    await router.stop()


def test_a_request_the_engine_had_all_cached_expects_no_event():
    router = Router(model="m", tokenizer=None, policy=make_policy("cache_aware"), events_silence=0.0)
    backend = router.add_backend("http://127.0.0.1:8001", "tcp://127.0.0.1:1", None)
    backend.healthy, backend.block_size = True, BS
    sub = router.subscriber(backend.backend_id)
    sub.state = FeedState.FLOWING
    prepared = router.prepare_tokens(list(range(4 * BS)))  # 4 full blocks, vLLM reports at most 3 cached
    inflight = router.dispatch(prepared, router.decide(prepared))
    router.finish(prepared, inflight, ok=True, output_tokens=1, cached_tokens=3 * BS)
    failed = router.prepare_tokens(list(range(900, 900 + 4 * BS)))
    router.finish(failed, router.dispatch(failed, router.decide(failed)), ok=False, output_tokens=None)
    router.check_event_feeds()
    assert sub.state is FeedState.FLOWING and sub.stats.routed_since_event == 0
