"""KvEventSubscriber against a fake vLLM publisher speaking the real wire format over ipc:// (and tcp://)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq.asyncio

from preble_router.kv_events import FeedState, KvEventSubscriber, advertised_feed
from testkit.fake_kv_publisher import EventBatch, FakeVllmKvPublisher
from testkit.ports import free_port

pytestmark = pytest.mark.timeout(10)

BID = 3


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def apply_stored(self, backend_id, block_hashes, parent_block_hash, token_ids, block_size, lora_name,
                     extra_keys) -> None:
        self.calls.append(("stored", backend_id, block_hashes, parent_block_hash, token_ids, block_size,
                           lora_name, extra_keys))

    def apply_removed(self, backend_id, block_hashes) -> None:
        self.calls.append(("removed", backend_id, block_hashes))

    def apply_cleared(self, backend_id) -> None:
        self.calls.append(("cleared", backend_id))

    def kinds(self) -> list[tuple]:
        """Compact view: ("stored", hashes) / ("removed", hashes) / ("cleared",)."""
        return [(c[0], c[2]) if c[0] != "cleared" else ("cleared",) for c in self.calls]


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def ctx():
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def publishers(tmp_path):
    made: list[FakeVllmKvPublisher] = []

    def make(**kw) -> FakeVllmKvPublisher:
        pub = FakeVllmKvPublisher(tmp_path, f"engine{len(made)}", **kw)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.destroy()


@pytest.fixture
async def subscribe(ctx):
    subs: list[KvEventSubscriber] = []

    async def make(pub: FakeVllmKvPublisher, sink: RecordingSink, *, wait: bool = True,
                   **kw) -> KvEventSubscriber:
        kw.setdefault("replay_endpoint", pub.replay_endpoint)
        kw.setdefault("replay_timeout", 0.5)
        sub = KvEventSubscriber(BID, pub.endpoint, sink, topic="kv", ctx=ctx, **kw)
        sub.start()
        subs.append(sub)
        if wait:
            await pub.wait_subscribed()
        return sub

    yield make
    for sub in subs:
        await asyncio.wait_for(sub.stop(), 2)


def block(pub: FakeVllmKvPublisher, h: int):
    """A one-block BlockStored whose hash is h (tokens derived from h so batches differ)."""
    return pub.stored([h], [h, h + 1, h + 2, h + 3], parent=h - 1 if h else None)


async def test_stored_removed_cleared_in_order(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink)
    big = (1 << 64) - 1
    pub.publish(pub.stored([big, b"\x01" * 32], list(range(8)), parent=7, lora_name="ada",
                           extra_keys=[["salt"], None]),
                pub.removed([big]))
    pub.publish(pub.cleared(), pub.stored([5], [1, 2, 3, 4]))
    await until(lambda: len(sink.calls) == 4)
    assert sink.calls == [
        ("stored", BID, [big, b"\x01" * 32], 7, list(range(8)), 4, "ada", [["salt"], None]),
        ("removed", BID, [big]),
        ("cleared", BID),
        ("stored", BID, [5], None, [1, 2, 3, 4], 4, None, None),
    ]
    s = sub.stats
    assert (s.batches, s.events, s.last_seq, s.gaps, s.resets, s.decode_errors) == (2, 4, 1, 0, 0, 0)
    assert s.connected and s.last_event_time is not None and s.last_batch_ts is not None


async def test_gap_repaired_by_replay(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0))
    pub.publish(block(pub, 1), drop=True)
    pub.publish(pub.removed([0]), drop=True)
    pub.publish(block(pub, 3))
    await until(lambda: sub.stats.last_seq == 3)
    assert sink.kinds() == [("stored", [0]), ("stored", [1]), ("removed", [0]), ("stored", [3])]
    s = sub.stats
    # Replays: the initial sync at start (nothing buffered yet) and the gap repair.
    assert (s.gaps, s.replays, s.replayed_batches, s.resets, s.batches) == (1, 2, 2, 0, 4)


async def test_gap_without_replay_clears(publishers, subscribe):
    pub, sink = publishers(replay=False), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0))
    pub.publish(block(pub, 1), drop=True)
    pub.publish(block(pub, 2))
    await until(lambda: sub.stats.last_seq == 2)
    assert sink.kinds() == [("stored", [0]), ("cleared",), ("stored", [2])]
    assert (sub.stats.gaps, sub.stats.resets, sub.stats.replays) == (1, 1, 0)


async def test_gap_replay_timeout_clears(publishers, subscribe, tmp_path):
    pub, sink = publishers(replay=False), RecordingSink()
    sub = await subscribe(pub, sink, replay_endpoint=f"ipc://{tmp_path}/nobody.replay", replay_timeout=0.2)
    pub.publish(block(pub, 0))
    pub.publish(block(pub, 1), drop=True)
    pub.publish(block(pub, 2))
    await until(lambda: sub.stats.last_seq == 2)
    assert sink.kinds() == [("stored", [0]), ("cleared",), ("stored", [2])]
    # Failures: the initial sync at start, then the gap's replay.
    assert (sub.stats.replay_failures, sub.stats.resets) == (2, 1)
    # The next gap gets a fresh replay socket (no stale state) and fails the same way.
    pub.publish(block(pub, 3), drop=True)
    pub.publish(block(pub, 4))
    await until(lambda: sub.stats.last_seq == 4)
    assert (sub.stats.replay_failures, sub.stats.resets) == (3, 2)


async def test_gap_longer_than_replay_buffer_clears_then_applies_tail(publishers, subscribe):
    pub, sink = publishers(buffer_steps=2), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0))
    for h in (1, 2, 3):
        pub.publish(block(pub, h), drop=True)
    pub.publish(block(pub, 4))  # buffer now holds seqs 3 and 4 only
    await until(lambda: sub.stats.last_seq == 4)
    assert sink.kinds() == [("stored", [0]), ("cleared",), ("stored", [3]), ("stored", [4])]
    assert (sub.stats.gaps, sub.stats.resets) == (1, 1)


async def test_restart_clears_then_applies(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 10))
    pub.publish(block(pub, 11))
    await until(lambda: sub.stats.last_seq == 1)
    pub.restart()
    await pub.wait_subscribed()
    pub.publish(block(pub, 20))
    await until(lambda: len(sink.calls) == 4)
    assert sink.kinds() == [("stored", [10]), ("stored", [11]), ("cleared",), ("stored", [20])]
    assert (sub.stats.restarts, sub.stats.resets, sub.stats.last_seq, sub.stats.gaps) == (1, 1, 0, 0)


async def test_restart_hidden_by_gap_is_detected(publishers, subscribe):
    """The engine restarts and its first batches are lost: seq looks like a plain gap, but the
    replayed batch at our last seq differs, so the old engine's blocks must go."""
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 10))
    pub.publish(block(pub, 11))
    await until(lambda: sub.stats.last_seq == 1)
    pub.restart()
    await pub.wait_subscribed()
    for h in (20, 21, 22):
        pub.publish(block(pub, h), drop=True)
    pub.publish(block(pub, 23))
    await until(lambda: sub.stats.last_seq == 3)
    assert sink.kinds() == [("stored", [10]), ("stored", [11]), ("cleared",),
                            ("stored", [21]), ("stored", [22]), ("stored", [23])]
    assert sub.stats.resets == 1


async def test_malformed_input_is_skipped(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0))
    pub.publish_raw(b"\xc1 not msgpack")  # seq 1
    pub.publish_raw(msgspec.msgpack.encode({"hello": "world"}))  # seq 2: decodes, not a batch
    pub.send_frames([b"kv", b"short"])  # bad frame count
    pub.send_frames([b"kv", b"\x00\x01", b"payload"])  # bad seq width
    pub.publish_raw(msgspec.msgpack.encode(EventBatch(ts=1.0, events=[  # seq 3
        {"type": "BlockStored", "block_hashes": [1]},  # missing fields
        {"type": "BlockRemoved", "block_hashes": "nope"},
        42,
        {"type": "SomethingNew", "x": 1},
        {"type": "BlockRemoved", "block_hashes": [9], "medium": "CPU"},  # offload tier: not ours
        {"type": "BlockRemoved", "block_hashes": [0], "medium": "GPU"},
    ])))
    pub.publish(block(pub, 4))
    await until(lambda: sub.stats.last_seq == 4)
    assert sink.kinds() == [("stored", [0]), ("removed", [0]), ("stored", [4])]
    s = sub.stats
    assert (s.decode_errors, s.bad_events, s.skipped_events) == (4, 3, 2)
    assert (s.gaps, s.resets, s.batches) == (0, 0, 3)


async def test_sink_errors_do_not_stop_the_stream(publishers, subscribe):
    class Flaky(RecordingSink):
        def apply_removed(self, backend_id, block_hashes) -> None:
            raise RuntimeError("boom")

    pub, sink = publishers(), Flaky()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0), pub.removed([0]), block(pub, 1))
    await until(lambda: len(sink.calls) == 2)
    assert sink.kinds() == [("stored", [0]), ("stored", [1])]
    assert (sub.stats.sink_errors, sub.stats.events) == (1, 2)


async def test_legacy_array_format_and_replay(publishers, subscribe):
    pub, sink = publishers(legacy=True), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(pub.stored([1, 2], list(range(8)), parent=b"\x00" * 32), pub.removed([1]))
    pub.publish(pub.cleared(), drop=True)  # repaired through the topic-less 0.11 replay frames
    pub.publish(pub.stored([3], [0, 1, 2, 3]))
    await until(lambda: sub.stats.last_seq == 2)
    assert sink.calls == [
        ("stored", BID, [1, 2], b"\x00" * 32, list(range(8)), 4, None, None),
        ("removed", BID, [1]),
        ("cleared", BID),
        ("stored", BID, [3], None, [0, 1, 2, 3], 4, None, None),
    ]
    assert (sub.stats.gaps, sub.stats.replayed_batches, sub.stats.resets) == (1, 1, 0)


async def test_first_batch_after_late_start_replays_from_zero(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    for h in (0, 1, 2):
        pub.publish(block(pub, h))  # nobody listening yet
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 3))
    await until(lambda: sub.stats.last_seq == 3)
    assert sink.kinds() == [("stored", [h]) for h in (0, 1, 2, 3)]
    s = sub.stats
    assert (s.replayed_batches, s.gaps, s.resets) == (3, 0, 0)


async def test_late_start_without_replay_just_applies(publishers, subscribe):
    pub, sink = publishers(replay=False), RecordingSink()
    pub.publish(block(pub, 0))
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 1))
    await until(lambda: sub.stats.last_seq == 1)
    assert sink.kinds() == [("stored", [1])]
    assert sub.stats.resets == 0


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_publisher_goes_away_and_comes_back(publishers, subscribe, transport):
    pub, sink = publishers(transport=transport), RecordingSink()
    sub = await subscribe(pub, sink)
    pub.publish(block(pub, 0))
    await until(lambda: sub.stats.last_seq == 0)
    await until(lambda: sub.stats.connected)
    pub.close()
    await until(lambda: not sub.stats.connected)
    await asyncio.sleep(0.3)  # several reconnect attempts against nothing
    pub.open()  # a new engine process on the same endpoint
    await pub.wait_subscribed()
    pub.publish(block(pub, 7))
    await until(lambda: len(sink.calls) == 3)
    assert sink.kinds() == [("stored", [0]), ("cleared",), ("stored", [7])]
    assert sub.stats.connected and sub.stats.disconnects >= 1 and sub.stats.restarts == 1


async def test_subscriber_started_before_publisher(publishers, subscribe, tmp_path):
    pub, sink = publishers(), RecordingSink()
    pub.close()  # engine not up yet when the router starts
    sub = await subscribe(pub, sink, wait=False)
    await asyncio.sleep(0.15)
    pub.open()
    await pub.wait_subscribed()
    pub.publish(block(pub, 0))
    await until(lambda: sub.stats.last_seq == 0)
    assert sink.kinds() == [("stored", [0])]


async def test_stop_closes_sockets(publishers, ctx):
    pub, sink = publishers(), RecordingSink()
    sub = KvEventSubscriber(BID, pub.endpoint, sink, replay_endpoint=pub.replay_endpoint, topic="kv", ctx=ctx)
    task = sub.start()
    await pub.wait_subscribed()
    pub.publish(block(pub, 0))
    await until(lambda: sub.stats.last_seq == 0)
    await asyncio.wait_for(sub.stop(), 2)
    assert task.done() and not sub.stats.connected and sub._dealer is None
    # With every socket closed, terminating the context returns at once.
    await asyncio.wait_for(asyncio.to_thread(ctx.term), 2)


async def test_late_subscriber_learns_an_idle_engine_from_replay(publishers, subscribe):
    """A router started after the engine stored blocks, with no new event coming, still knows them."""
    pub, sink = publishers(), RecordingSink()
    pub.publish(block(pub, 0), drop=True)  # nobody listening yet: only the replay buffer has these
    pub.publish(block(pub, 1), drop=True)
    sub = await subscribe(pub, sink)
    await until(lambda: sub.stats.last_seq == 1)
    assert sink.kinds() == [("stored", [0]), ("stored", [1])]
    pub.publish(block(pub, 2))  # live batches continue the sequence without a gap or a reset
    await until(lambda: sub.stats.last_seq == 2)
    assert (sub.stats.gaps, sub.stats.resets) == (0, 0)


# ---- feed health ---------------------------------------------------------------------------------------------
async def test_feed_goes_silent_then_resyncs_when_events_flow_again(publishers, subscribe, caplog):
    pub, sink, changes = publishers(), RecordingSink(), []
    sub = await subscribe(pub, sink, silence_after=0.2, on_feed_change=lambda b, flowing: changes.append(flowing))
    await until(lambda: sub.state is FeedState.FLOWING)  # the engine answered the initial replay
    assert changes == [True] and sub.stats.replay_ok
    pub.publish(block(pub, 0))
    await until(lambda: sub.stats.last_seq == 0)
    sub.note_routed(time.monotonic(), time.monotonic())  # a request that stored new blocks ended there...
    pub.publish(block(pub, 1), drop=True)  # ...and its events never arrive (a publisher cut off)
    assert sub.check(time.monotonic()) is FeedState.FLOWING  # not yet: silence_after has not passed
    await asyncio.sleep(0.25)
    assert sub.check(time.monotonic()) is FeedState.SILENT
    assert changes == [True, False] and sub.stats.silences == 1
    assert any("no event from" in r.message and r.levelname == "WARNING" for r in caplog.records)
    pub.publish(block(pub, 2))  # events flow again: the whole state comes back from the replay
    await until(lambda: sub.state is FeedState.FLOWING and sub.stats.last_seq == 2)
    assert changes == [True, False, True]
    assert sink.kinds()[-3:] == [("stored", [0]), ("stored", [1]), ("stored", [2])]
    assert sub.stats.routed_since_event == 0


async def test_requests_needing_no_new_blocks_never_make_a_feed_silent(publishers, subscribe):
    pub, sink = publishers(), RecordingSink()
    sub = await subscribe(pub, sink, silence_after=0.05)
    await until(lambda: sub.state is FeedState.FLOWING)
    await asyncio.sleep(0.1)  # idle engine, nothing routed that needs an event: all is well
    assert sub.check(time.monotonic()) is FeedState.FLOWING
    dispatched = time.monotonic()
    pub.publish(block(pub, 0))  # the request's events arrived before the request ended
    await until(lambda: sub.stats.last_seq == 0)
    sub.note_routed(time.monotonic(), dispatched)
    await asyncio.sleep(0.1)  # the engine is idle again: no event is due
    assert sub.check(time.monotonic()) is FeedState.FLOWING


async def test_unreachable_publisher_is_reported(tmp_path, ctx, caplog):
    # The engine was started with a connect-style endpoint (tcp://HOST:PORT, no '*'): nothing listens there.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = KvEventSubscriber(BID, endpoint, RecordingSink(), replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
                            ctx=ctx, replay_timeout=0.1, silence_after=0.1)
    sub.start()
    try:
        await asyncio.sleep(0.3)
        sub.note_routed(time.monotonic() - 1.0, time.monotonic() - 1.5)
        assert sub.check(time.monotonic()) is FeedState.SILENT
        assert sub.stats.replay_ok is False and not sub.stats.connected
        warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
        assert any("nothing accepts connections" in m and "tcp://*:5557" in m for m in warnings), warnings
    finally:
        await asyncio.wait_for(sub.stop(), 2)


@pytest.mark.parametrize("advertised, host, expect", [
    ({"0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
            "replay_endpoint": "tcp://*:5558", "topic": "kv"}}, "10.0.0.5",
     ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", "kv", None)),
    ({"0": {"enable_kv_cache_events": True, "endpoint": "ipc:///tmp/kv0", "replay_endpoint": None}}, "127.0.0.1",
     ("ipc:///tmp/kv0", None, "", None)),
    ({"0": {"enable_kv_cache_events": True, "endpoint": "tcp://[::]:5557"}}, "fd00::5",
     ("tcp://[fd00::5]:5557", None, "", None)),
])
def test_advertised_feed_is_subscribable(advertised, host, expect):
    feed = advertised_feed(advertised, host)
    assert (feed.endpoint, feed.replay_endpoint, feed.topic, feed.problem) == expect and feed.publishes


def test_advertised_connect_style_endpoint_says_how_to_fix_it():
    feed = advertised_feed({"0": {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:5557"}}, "127.0.0.1")
    assert feed.endpoint is None and feed.publishes
    assert "connects to tcp://127.0.0.1:5557" in feed.problem and '"endpoint": "tcp://*:5557"' in feed.problem


@pytest.mark.parametrize("advertised", [{}, {"0": {"enable_kv_cache_events": False}}, None, [1]])
def test_engine_without_events_is_a_choice(advertised):
    feed = advertised_feed(advertised, "h")
    assert feed.endpoint is None and not feed.publishes


def test_data_parallel_ranks_follow_rank_zero_and_say_so():
    cfg = {"enable_kv_cache_events": True, "endpoint": "tcp://*:5557"}
    feed = advertised_feed({"1": {**cfg, "endpoint": "tcp://*:5558"}, "0": cfg}, "h")
    assert feed.endpoint == "tcp://h:5557" and "2 data-parallel engines" in feed.problem
