"""Consumer of vLLM's KV-cache events for one backend (ZMQ SUB + DEALER replay).

Wire format (docs/design.md, "KV events, as the router relies on them"):
  live:    SUB frames (topic, seq: 8 bytes big-endian, msgpack [ts, [events...], dp_rank]);
           seq starts at 0 when the engine process starts.
  replay:  DEALER sends (b"", start_seq8) to the engine's ROUTER and receives (b"", topic, seq8, payload)
           for every buffered batch with seq >= start, then (b"", b"", END_SEQ, b""). vLLM 0.11 has no
           topic frame. (The REQ socket of vLLM's example only ever gets the first reply.)
  events:  msgpack maps tagged "type" (vLLM >= 0.32) or positional arrays ["BlockStored", ...] (0.11).

The index fed by the sink must never claim blocks the engine no longer holds, so whenever the event
stream cannot be made whole (engine restart, unrepairable gap) we tell the sink to forget the backend;
under-knowledge only costs routing quality and predicted state rebuilds it.

Feed health (docs/design.md, "Event health"): a subscriber is CONNECTING until the engine answers (a replay
or a live batch), then FLOWING. It turns SILENT when a request that made the engine store new blocks (its prompt
was not all cached there, by vLLM's own count where the reply says) ended `silence_after` seconds ago and no live
batch came since its dispatch: the engine's publisher is unreachable or stopped. The router then routes that
backend on its estimate (what it sent there) and says so (a WARNING, a metric, /debug/backends); the next live
batch resyncs from the replay socket and switches back to events.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)

# Field order of the array_like events (vLLM 0.11 until the switch to maps); msgspec omits trailing
# defaults, so shorter arrays are fine.
_LEGACY_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}

_RCVHWM = 1_000_000  # the engine's PUB keeps 100k; losing batches to our own queue would force resets
_RECONNECT_IVL_MS = 100  # first retry soon after a replica comes back...
_RECONNECT_IVL_MAX_MS = 2_000  # ...then back off, but never give up
_HEARTBEAT_IVL_MS = 2_000  # ZMTP pings notice a vanished host (half-open TCP) and trigger a reconnect
_HEARTBEAT_TIMEOUT_MS = 6_000


class KvEventSink(Protocol):
    def apply_stored(self, backend_id: int, block_hashes: list[int | bytes], parent_block_hash: int | bytes | None,
                     token_ids: list[int], block_size: int, lora_name: str | None,
                     extra_keys: list | None) -> None: ...

    def apply_removed(self, backend_id: int, block_hashes: list[int | bytes]) -> None: ...

    def apply_cleared(self, backend_id: int) -> None: ...  # drop everything known for this backend


class FeedState(str, enum.Enum):
    CONNECTING = "connecting"  # nothing heard from the engine yet: the backend is routed on the estimate
    FLOWING = "flowing"  # the index follows the engine's events
    SILENT = "silent"  # events stopped while requests needed them: routed on the estimate until they resume


@dataclass
class KvEventStats:
    """Counters for one backend's event stream; plain attributes, updated in place by the subscriber."""

    batches: int = 0  # batches applied, live and replayed
    events: int = 0  # events handed to the sink
    gaps: int = 0  # live seq jumped past last_seq + 1
    replays: int = 0  # replay requests sent
    replay_failures: int = 0  # replay requests that timed out
    replayed_batches: int = 0  # batches applied from replay (subset of `batches`)
    resets: int = 0  # sink cleared because of an engine restart or an unrepairable gap
    restarts: int = 0  # engine restarts seen (seq went backwards)
    decode_errors: int = 0  # frames or payloads that could not be decoded
    bad_events: int = 0  # decoded events with missing or mistyped fields
    skipped_events: int = 0  # unknown event types, or tiers other than GPU when gpu_only
    sink_errors: int = 0  # exceptions raised by the sink
    connected: bool = False  # SUB socket currently connected to the engine
    disconnects: int = 0
    last_seq: int | None = None
    last_event_time: float | None = None  # time.monotonic() of the last applied batch
    last_batch_ts: float | None = None  # engine wall-clock ts of the last applied batch
    last_live_time: float | None = None  # time.monotonic() of the last live (not replayed) batch
    replay_ok: bool | None = None  # the last replay request was answered (None: none sent yet)
    routed_since_event: int = 0  # requests that must store new blocks, routed there since the last live batch
    silences: int = 0  # times the feed went SILENT


class KvEventSubscriber:
    """Follows one engine's KV event stream and applies it, in order, to a sink."""

    def __init__(self, backend_id: int, endpoint: str, sink: KvEventSink, *, replay_endpoint: str | None = None,
                 topic: str = "", ctx: zmq.asyncio.Context | None = None, replay_timeout: float = 2.0,
                 gpu_only: bool = True, silence_after: float = 5.0,
                 on_feed_change: Callable[[int, bool], None] | None = None) -> None:
        """on_feed_change(backend_id, flowing) is called when the index should switch modes: flowing=True just
        before the engine's state is (re)applied from a replay or a first live batch, False when the feed went
        silent."""
        self.backend_id = backend_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.sink = sink
        self.replay_timeout = replay_timeout
        # Offload connectors emit events for CPU/disk tiers too; the sink has no notion of tiers, and
        # mixing them would corrupt its per-hash reference counts.
        self.gpu_only = gpu_only
        self.stats = KvEventStats()
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._decoder = msgspec.msgpack.Decoder()
        self._dealer: zmq.asyncio.Socket | None = None
        self._last_payload: bytes | None = None  # lets a replay prove it comes from the same engine
        self._synced_upto: int | None = None  # live batches up to this seq were applied by the initial replay
        self._task: asyncio.Task | None = None
        self.silence_after = silence_after
        self.on_feed_change = on_feed_change
        self.state = FeedState.CONNECTING
        self._awaiting_since: float | None = None  # when the first request still awaiting a live batch ended
        self._started = time.monotonic()
        self._warned_unreachable = False
        self._ever_connected = False  # once connected, a lost connection is a stopped engine, not a wrong endpoint

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"kv-events-{self.backend_id}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Receive and apply batches until cancelled."""
        if self._task is None or self._task.done():
            self._task = asyncio.current_task()  # so stop() works when run() is awaited directly
        sub = self._ctx.socket(zmq.SUB)
        _tune(sub)
        sub.setsockopt(zmq.RCVHWM, _RCVHWM)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        watcher = asyncio.create_task(self._watch(monitor))
        sub.connect(self.endpoint)  # vLLM binds (tcp://*:port or ipc://); ZMQ reconnects on its own
        try:
            await self._initial_sync()
            while True:
                try:
                    frames = await sub.recv_multipart()
                except zmq.ContextTerminated:
                    return
                try:
                    await self._on_live(frames)
                except Exception:  # a bug here must not stop the stream for good
                    self.stats.decode_errors += 1
                    logger.exception("kv events backend %d: failed to handle a batch", self.backend_id)
                # recv returns without suspending while a backlog is queued: don't starve the router.
                await asyncio.sleep(0)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            self._close_dealer()
            self.stats.connected = False

    # ---- feed health ----------------------------------------------------------------------------------

    def note_routed(self, now: float, dispatched: float) -> None:
        """A request dispatched at `dispatched` made the engine store new blocks and has ended: their events are
        due, unless a live batch came after its dispatch (the stream is alive)."""
        last = self.stats.last_live_time
        if last is not None and last >= dispatched:
            return
        self.stats.routed_since_event += 1
        if self._awaiting_since is None:
            self._awaiting_since = now

    def check(self, now: float) -> FeedState:
        """Re-evaluate the feed (the router's health loop calls this): CONNECTING or FLOWING turns SILENT once a
        request has waited silence_after seconds for a live batch. Warns once when nothing ever accepted the SUB
        connection."""
        waited = None if self._awaiting_since is None else now - self._awaiting_since
        if not self.stats.connected and not self._ever_connected and not self._warned_unreachable and (
                time.monotonic() - self._started >= self.silence_after or (waited or 0.0) >= self.silence_after):
            self._warned_unreachable = True
            logger.warning(
                "kv events backend %d: nothing accepts connections at %s. vLLM's publisher binds only when its "
                "endpoint has '*' (\"endpoint\": \"tcp://*:5557\" in --kv-events-config); with a plain "
                "tcp://HOST:PORT it connects instead and no subscriber can reach it.", self.backend_id, self.endpoint)
        if self.state is not FeedState.SILENT and waited is not None and waited >= self.silence_after:
            self.state = FeedState.SILENT
            self.stats.silences += 1
            logger.warning(
                "kv events backend %d: no event from %s for %.1f s while %d requests that store new blocks were "
                "routed there; routing it on the estimated index until events flow again (is the engine's "
                "publisher reachable? --kv-events-config's endpoint must bind, e.g. tcp://*:5557)",
                self.backend_id, self.endpoint, waited, self.stats.routed_since_event)
            self._feed_changed(False)
        return self.state

    def _feed_changed(self, flowing: bool) -> None:
        if self.on_feed_change is not None:
            try:
                self.on_feed_change(self.backend_id, flowing)
            except Exception:
                logger.exception("kv events backend %d: feed change callback failed", self.backend_id)

    def _flowing(self) -> None:
        """The engine answered: from here on the index follows its events (the caller applies its state next)."""
        if self.state is FeedState.FLOWING:
            return
        if self.state is FeedState.SILENT:
            logger.warning("kv events backend %d: events flow again from %s; resyncing from the replay socket and "
                           "routing on events", self.backend_id, self.endpoint)
        self.state = FeedState.FLOWING
        self._feed_changed(True)

    # ---- live stream -------------------------------------------------------------------------------

    async def _initial_sync(self) -> None:
        """Learn what the engine already caches before any new event: another router that started earlier,
        or an idle engine, must not leave this index empty until the engine's next step."""
        got = await self._replay(0, 1 << 63)
        if got is not None:
            self._flowing()
        if got:
            await self._apply_replayed(got, sorted(got))
            self._synced_upto = self.stats.last_seq

    async def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.decode_errors += 1
            return
        topic, seq_bytes, payload = frames
        if self.topic and topic != self.topic:  # SUBSCRIBE matches prefixes only
            return
        seq = int.from_bytes(seq_bytes, "big")
        if self._synced_upto is not None:
            if seq <= self._synced_upto:
                return  # queued while the initial replay ran: already applied from it
            self._synced_upto = None
        # A live batch: the stream is alive, whatever the resync below takes (a replay can take seconds, and the
        # health loop must not call the feed silent meanwhile).
        self._awaiting_since = None
        self.stats.routed_since_event = 0
        self.stats.last_live_time = time.monotonic()
        if self.state is not FeedState.FLOWING:
            if self.state is FeedState.SILENT:
                # The index switches back from its estimate with nothing known: learn the engine's whole state
                # again (replay from 0), as for a subscriber that joins late.
                self.stats.last_seq, self._last_payload = None, None
            self._flowing()
        await self._catch_up(seq)
        self._apply_batch(seq, payload, replayed=False)

    async def _catch_up(self, seq: int) -> None:
        """Bring the sink up to date with everything before live batch `seq`."""
        last = self.stats.last_seq
        if last is not None and seq == last + 1:
            return
        if last is None or seq <= last:
            if last is not None:
                # seq restarts at 0 with the engine process: its cache is empty, ours is stale.
                self.stats.restarts += 1
                self._clear("engine restarted")
            if seq > 0:
                # We joined after the engine started: learn what it already caches (best effort).
                got = await self._replay(0, seq)
                await self._apply_replayed(got, sorted(got or ()))
            return

        # A gap: the PUB dropped batches (HWM, or while we were disconnected). Ask from `last`, not
        # last + 1: an identical batch `last` proves the engine did not restart behind our back.
        self.stats.gaps += 1
        got = await self._replay(last, seq)
        repaired = (got is not None
                    and got.get(last, self._last_payload) == self._last_payload
                    and all(s in got for s in range(last + 1, seq)))
        if repaired:
            todo = range(last + 1, seq)
        else:
            self._clear(f"unrepairable gap {last + 1}..{seq - 1}")
            todo = sorted(got or ())  # whatever the buffer still has is a subset of the truth
        await self._apply_replayed(got, todo)

    async def _apply_replayed(self, got: dict[int, bytes] | None, seqs: Iterable[int]) -> None:
        for i, s in enumerate(seqs):
            self._apply_batch(s, got[s], replayed=True)
            if i % 128 == 127:
                await asyncio.sleep(0)  # a replay can hold 10k batches: let the router serve meanwhile

    def _clear(self, reason: str) -> None:
        self.stats.resets += 1
        logger.warning("kv events backend %d: %s; clearing its cache index", self.backend_id, reason)
        self._call_sink(self.sink.apply_cleared, self.backend_id)

    # ---- replay ------------------------------------------------------------------------------------

    async def _replay(self, start: int, end: int) -> dict[int, bytes] | None:
        """Buffered batches with start <= seq < end, by seq; None if there is no replay or it timed out."""
        if self.replay_endpoint is None:
            return None
        self.stats.replays += 1
        dealer = self._dealer_socket()
        got: dict[int, bytes] = {}
        try:
            await asyncio.wait_for(dealer.send_multipart([b"", start.to_bytes(8, "big")]), self.replay_timeout)
            while True:  # read to the end marker, so no stale reply is left for the next request
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout)
                if frames and frames[0] == b"":
                    frames = frames[1:]  # the ROUTER's empty delimiter
                if len(frames) == 3:
                    frames = frames[1:]  # topic (vLLM >= 0.32; absent in 0.11)
                if len(frames) != 2 or len(frames[0]) != 8:
                    self.stats.decode_errors += 1
                    continue
                seq_bytes, payload = frames
                if seq_bytes == END_SEQ:
                    self.stats.replay_ok = True
                    return got
                seq = int.from_bytes(seq_bytes, "big")
                if start <= seq < end:
                    got[seq] = payload
        except asyncio.TimeoutError:
            self.stats.replay_failures += 1
            self.stats.replay_ok = False
            logger.warning("kv events backend %d: replay from %d timed out", self.backend_id, start)
            self._close_dealer()  # late replies die with the socket
            return None

    def _dealer_socket(self) -> zmq.asyncio.Socket:
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            _tune(self._dealer)
            self._dealer.setsockopt(zmq.RCVHWM, 0)  # a ROUTER drops what does not fit: take the whole buffer
            self._dealer.connect(self.replay_endpoint)
        return self._dealer

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None

    # ---- decoding and applying ---------------------------------------------------------------------

    def _apply_batch(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        # The seq is consumed even if the payload is bad: replaying it would not make it any better.
        self.stats.last_seq = seq
        self._last_payload = payload
        try:
            batch = self._decoder.decode(payload)
            if isinstance(batch, dict):  # tolerate a map-encoded EventBatch
                ts, events = batch.get("ts"), batch.get("events")
            elif isinstance(batch, list) and len(batch) >= 2:
                ts, events = batch[0], batch[1]
            else:
                raise ValueError("not an EventBatch")
            if not isinstance(events, list) or not isinstance(ts, (int, float)):
                raise ValueError("not an EventBatch")
        except (msgspec.DecodeError, ValueError):
            self.stats.decode_errors += 1
            logger.debug("kv events backend %d: undecodable batch %d", self.backend_id, seq)
            return
        # A replayed batch is the engine's past: its stored blocks are not requests being sent now, so the sink
        # must not read them as other routers' (cache_index.CacheIndex.replaying).
        marks = replayed and hasattr(self.sink, "replaying")
        if marks:
            self.sink.replaying = True  # type: ignore[attr-defined]
        try:
            for event in events:
                self._apply_event(event)
        finally:
            if marks:
                self.sink.replaying = False  # type: ignore[attr-defined]
        self.stats.batches += 1
        if replayed:
            self.stats.replayed_batches += 1
        self.stats.last_event_time = time.monotonic()
        self.stats.last_batch_ts = float(ts)

    def _apply_event(self, event: Any) -> None:
        if isinstance(event, list) and event and isinstance(event[0], str):
            fields = _LEGACY_FIELDS.get(event[0], ())
            event = {"type": event[0], **dict(zip(fields, event[1:]))}
        if not isinstance(event, dict):
            self.stats.bad_events += 1
            return
        kind = event.get("type")
        if kind not in _LEGACY_FIELDS:
            self.stats.skipped_events += 1
            return
        if self.gpu_only and event.get("medium") not in (None, "GPU"):
            self.stats.skipped_events += 1
            return
        if kind == "AllBlocksCleared":
            self._call_sink(self.sink.apply_cleared, self.backend_id)
            return
        hashes = event.get("block_hashes")
        if not isinstance(hashes, list):
            self.stats.bad_events += 1
            return
        if kind == "BlockRemoved":
            self._call_sink(self.sink.apply_removed, self.backend_id, hashes)
            return
        tokens, block_size = event.get("token_ids"), event.get("block_size")
        lora_name, extra_keys = event.get("lora_name"), event.get("extra_keys")
        if (not isinstance(tokens, list) or not isinstance(block_size, int) or block_size <= 0
                or not isinstance(lora_name, (str, type(None))) or not isinstance(extra_keys, (list, type(None)))):
            self.stats.bad_events += 1
            return
        self._call_sink(self.sink.apply_stored, self.backend_id, hashes, event.get("parent_block_hash"), tokens,
                        block_size, lora_name, extra_keys)

    def _call_sink(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.sink_errors += 1
            logger.exception("kv events backend %d: sink %s failed", self.backend_id, fn.__name__)
        else:
            self.stats.events += 1

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Track connection state from the SUB socket's monitor (for metrics and health)."""
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
            except zmq.ZMQError:
                return
            if event == zmq.EVENT_CONNECTED:
                self.stats.connected = True
                self._ever_connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.stats.connected = False
                self.stats.disconnects += 1


def _tune(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)


@dataclass(frozen=True, slots=True)
class AdvertisedFeed:
    """Where to subscribe to one engine's events, from what its API server advertises (GET /kv_event_sources)."""

    endpoint: str | None  # None: nothing to subscribe to (see problem)
    publishes: bool = True  # False: the engine has KV events off (a choice, not a fault)
    replay_endpoint: str | None = None
    topic: str = ""
    problem: str | None = None  # why not, or what is wrong, in words a user can act on


def _bind_host_for_subscriber(endpoint: str, host: str) -> tuple[str | None, str | None]:
    """(address a subscriber connects to, problem) for an endpoint the engine uses. The engine binds when its
    endpoint has '*' or '::' or is ipc:// / inproc:// (vllm ZmqEventPublisher); a wildcard host becomes the
    backend's host. A plain tcp://HOST:PORT makes the engine connect, so nothing listens there."""
    if endpoint.startswith("ipc://"):
        local = host in ("127.0.0.1", "localhost", "::1")
        return endpoint, None if local else f"{endpoint} is a local socket on the engine's host"
    if endpoint.startswith("inproc://"):
        return None, f"{endpoint} is inside the engine's process"
    scheme, sep, rest = endpoint.partition("://")
    if scheme != "tcp" or not sep:
        return None, f"unsupported endpoint {endpoint!r}"
    addr, _, port = rest.rpartition(":")
    if addr in ("*", "[::]", "::", "0.0.0.0", "[*]"):
        bracketed = f"[{host}]" if ":" in host else host
        return f"tcp://{bracketed}:{port}", None
    if "*" in addr or "::" in addr:
        return f"tcp://{host}:{port}", None
    return None, (f"the engine connects to {endpoint} instead of binding it (an endpoint without '*'), so no "
                  f"subscriber can reach it; start vLLM with \"endpoint\": \"tcp://*:{port or 5557}\" in "
                  f"--kv-events-config")


def advertised_feed(sources: Any, backend_host: str) -> AdvertisedFeed:
    """The feed to follow for a backend from its /kv_event_sources reply ({dp_rank: KVEventsConfig})."""
    if not isinstance(sources, dict) or not sources:
        return AdvertisedFeed(None, False, problem="the engine publishes no KV events (start vLLM with "
                              "--kv-events-config '{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\","
                              "\"endpoint\":\"tcp://*:5557\",\"replay_endpoint\":\"tcp://*:5558\"}')")
    ranks = sorted(sources, key=lambda r: int(r) if str(r).isdigit() else 0)
    config = sources[ranks[0]]
    if not isinstance(config, dict) or not config.get("enable_kv_cache_events") or \
            config.get("publisher") not in (None, "zmq"):
        return advertised_feed({}, backend_host)
    endpoint, problem = _bind_host_for_subscriber(str(config.get("endpoint") or "tcp://*:5557"), backend_host)
    replay = config.get("replay_endpoint")
    replay_addr = _bind_host_for_subscriber(str(replay), backend_host)[0] if replay else None
    if len(ranks) > 1 and problem is None:
        problem = (f"{len(ranks)} data-parallel engines share this API server; following rank {ranks[0]} only "
                   "(give each rank its own backend URL to route on all of them)")
    topic = config.get("topic")
    return AdvertisedFeed(endpoint, True, replay_addr if endpoint else None, topic if isinstance(topic, str) else "",
                          problem)
