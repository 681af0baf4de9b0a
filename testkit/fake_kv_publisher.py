"""A stand-in for vLLM's ZmqEventPublisher (vllm/distributed/kv_events.py) with the same wire format.

- live:   (topic, seq: 8 bytes big-endian, msgpack EventBatch) on a socket bound at `endpoint`
- replay: a ROUTER bound at `replay_endpoint`; request (id, b"", start8) -> (id, b"", topic, seq8, payload)
          for each buffered seq >= start, then (id, b"", b"", END_SEQ, b""). legacy=True speaks vLLM 0.11:
          positional (array_like) events and no topic frame in replay replies.

The live socket is an XPUB rather than a PUB: the frames a subscriber sees are identical, but the
subscription messages let tests wait until the subscriber is really listening (a PUB silently drops
what it sends before that, the "slow joiner"). Tests control loss explicitly with `drop=True`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import zmq

from testkit.ports import free_port

END_SEQ = (-1).to_bytes(8, "big", signed=True)


# ---- vLLM 0.32/0.33 structs: events are maps tagged "type" ----------------------------------------

class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


# ---- vLLM 0.11 structs: positional arrays ["BlockStored", ...] -------------------------------------

class LegacyKVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(LegacyKVCacheEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class LegacyBlockRemoved(LegacyKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class LegacyAllBlocksCleared(LegacyKVCacheEvent, tag="AllBlocksCleared"):
    pass


class FakeVllmKvPublisher:
    def __init__(self, tmp_path: Path, name: str = "engine", *, topic: str = "kv", replay: bool = True,
                 legacy: bool = False, buffer_steps: int = 10_000, transport: str = "ipc") -> None:
        self.topic = topic.encode()
        self.legacy = legacy
        self.buffer_steps = buffer_steps
        if transport == "ipc":
            self._bind = f"ipc://{tmp_path}/{name}.pub"
            self._replay_bind = f"ipc://{tmp_path}/{name}.replay" if replay else None
        else:  # bind ephemeral ports once, then reuse them across restarts like a fixed --kv-events-config
            self._bind = f"tcp://127.0.0.1:{free_port()}"
            self._replay_bind = f"tcp://127.0.0.1:{free_port()}" if replay else None
        self.endpoint = self._bind  # what a subscriber connects to
        self.replay_endpoint = self._replay_bind
        self._ctx = zmq.Context()
        self._pub: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self.open()

    # ---- engine lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Start an engine process: fresh sockets, seq from 0, empty replay buffer."""
        assert self._pub is None
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=self.buffer_steps)
        self._subscribed = False
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)  # KVEventsConfig.hwm
        self._pub.bind(self._bind)
        if self._replay_bind is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 2 * (self.buffer_steps + 1))  # as vLLM 0.33: a whole buffer fits
            router.bind(self._replay_bind)
            self._running = True
            self._thread = threading.Thread(target=self._serve_replay, args=(router,), daemon=True)
            self._thread.start()

    def close(self) -> None:
        """The engine goes away (its sockets close; ipc files are removed)."""
        if self._thread is not None:
            self._running = False
            self._thread.join(timeout=2)
            self._thread = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None

    def restart(self) -> None:
        self.close()
        self.open()

    def destroy(self) -> None:
        self.close()
        self._ctx.destroy(linger=0)

    async def wait_subscribed(self, timeout: float = 5.0) -> None:
        """Wait until a subscriber's SUBSCRIBE has reached this engine's live socket."""
        deadline = time.monotonic() + timeout
        while not self._subscribed:
            if self._pub.poll(0):
                if self._pub.recv()[:1] == b"\x01":
                    self._subscribed = True
                continue
            if time.monotonic() > deadline:
                raise TimeoutError("no subscriber")
            await asyncio.sleep(0.005)

    # ---- events, in this engine's format --------------------------------------------------------------

    def stored(self, block_hashes: list[int | bytes], token_ids: list[int], *, parent: int | bytes | None = None,
               block_size: int = 4, lora_name: str | None = None, extra_keys: list | None = None,
               medium: str = "GPU") -> Any:
        if self.legacy:
            return LegacyBlockStored(block_hashes, parent, token_ids, block_size, None, medium)
        return BlockStored(block_hashes, parent, token_ids, block_size, None, medium, lora_name,
                           extra_keys=extra_keys, group_idx=0, kv_cache_spec_kind="full_attention")

    def removed(self, block_hashes: list[int | bytes], *, medium: str = "GPU") -> Any:
        if self.legacy:
            return LegacyBlockRemoved(block_hashes, medium)
        return BlockRemoved(block_hashes, medium, group_idx=0)

    def cleared(self) -> Any:
        return LegacyAllBlocksCleared() if self.legacy else AllBlocksCleared()

    # ---- publishing ----------------------------------------------------------------------------------

    def publish(self, *events: Any, drop: bool = False) -> int:
        """Publish one batch (one engine step); drop=True buffers it for replay but loses it on the wire."""
        payload = msgspec.msgpack.encode(EventBatch(ts=time.time(), events=list(events), data_parallel_rank=0))
        return self.publish_raw(payload, drop=drop)

    def publish_raw(self, payload: bytes, *, drop: bool = False) -> int:
        seq = self._seq
        self._seq += 1
        if not drop:
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        with self._lock:
            self._buffer.append((seq, payload))
        return seq

    def send_frames(self, frames: list[bytes]) -> None:
        """Send arbitrary frames on the live socket (malformed-input tests)."""
        self._pub.send_multipart(frames)

    # ---- replay (vLLM's _service_replay) --------------------------------------------------------------

    def _serve_replay(self, router: zmq.Socket) -> None:
        try:
            while self._running:
                if not router.poll(20):
                    continue
                frame = router.recv_multipart()
                if len(frame) != 3:  # vLLM ignores anything but (id, b"", start8)
                    continue
                client_id, _, start_bytes = frame
                start = int.from_bytes(start_bytes, "big")
                with self._lock:
                    buffered = list(self._buffer)
                for seq, buf in buffered:
                    if seq >= start:
                        head = [client_id, b""] if self.legacy else [client_id, b"", self.topic]
                        router.send_multipart(head + [seq.to_bytes(8, "big"), buf])
                if self.legacy:
                    router.send_multipart((client_id, b"", END_SEQ, b""))
                else:
                    router.send_multipart((client_id, b"", b"", END_SEQ, b""))
        finally:
            router.close(linger=0)
