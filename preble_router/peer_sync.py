"""Routers of one fleet tell each other what they dispatched, so each routes on the whole fleet's traffic.

Without this, a router learns of another router's request only from the engine: its KV events once its first
blocks are stored (cache_index.py, foreign runs) and its load report at the next poll (load.py). Until then a
new prefix that two routers see at once is prefilled twice, and each router's load figures lag. With it, every
router replays its peers' dispatches through its own bookkeeping (``Router.apply_peer``): the predicted blocks,
the load counts and the policy's history then cover every router's requests, as behind one router.

What travels (``PeerEvent``, msgpack over ZMQ PUB/SUB): per dispatched request its backend, block keys, prompt
length, matched tokens and reason; then its first token and its end. About 8 bytes a prompt block, once.

Who talks to whom:
- ``--workers N``: automatic. The workers of one router share a directory (made by the parent); each binds an
  ipc socket there and subscribes to the others' (found by a scan each second: a restarted worker joins).
- separate router processes (several pods behind one Service): ``--peer-bind tcp://*:PORT`` on each and
  ``--peers tcp://a:PORT,tcp://b:PORT,...`` (the same list everywhere: a router ignores its own events), or
  ``--peers dns:NAME:PORT``: every address NAME resolves to (a headless Service of the router pods, as the Helm
  chart makes), resolved again each second, so routers that scale up or down join and leave.

Degrading loudly: each router numbers its events; a gap (PUB drops past its high-water mark, a restart) is a
WARNING and counted. A peer silent for ``PEER_SILENCE_S`` (it sends a heartbeat every ``HEARTBEAT_S``) is a
WARNING and its requests in flight are forgotten: the engine's reports and events cover them again, as without
peers. A peer's request whose end never came is forgotten after ``flight_ttl`` (the request timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

if TYPE_CHECKING:
    from preble_router.router import Router

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PEER_SILENCE_S = 5.0
# --workers: the directory the workers' sockets are in (set by the parent process for its workers).
ENV_PEER_DIR = "PREBLE_ROUTER_PEER_DIR"


class PeerEventKind(enum.IntEnum):
    DISPATCHED = 1
    FIRST_TOKEN = 2
    FINISHED = 3
    HEARTBEAT = 4


class PeerEvent(msgspec.Struct, array_like=True, frozen=True):
    """One step of one request of one router (or its heartbeat). `seq` counts every event the router sent."""

    kind: int
    router: str
    seq: int
    request: int = 0  # the sender's dispatch number (a retry is a new dispatch)
    backend: str = ""  # the backend's URL (ids differ between routers)
    keys: bytes = b""  # the prompt's block keys for that backend, uint64 little-endian
    block_size: int = 0
    prompt_tokens: int = 0
    matched_tokens: int = 0
    reason: str = ""
    group_blocks: int = 0  # Decision.group_blocks: a move or replica's prefix group, for peers to adopt
    model: str | None = None  # as the client named it
    max_tokens: int | None = None
    ok: bool = True
    output_tokens: int | None = None
    elapsed: float = 0.0  # FIRST_TOKEN, FINISHED: seconds since the sender dispatched the request


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(PeerEvent).decode


def zmq_tcp_address(ip: str, port: int) -> str:
    """tcp://IP:PORT, with an IPv6 address in brackets."""
    return f"tcp://[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"tcp://{ip}:{port}"


def new_router_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


class PeerSync:
    """The ZMQ transport of one router: a PUB socket for its events, a SUB socket for its peers'.

    bind: where this router publishes (tcp://*:PORT), or None; peers: the other routers' PUB addresses;
    peer_dir: --workers' shared directory (bind there, and subscribe to every other socket found there)."""

    def __init__(self, router: Router, *, bind: str | None = None, peers: Sequence[str] = (),
                 peer_dir: str | None = None) -> None:
        self.router = router
        self.router_id = new_router_id()
        self.bind, self.peer_dir = bind, peer_dir
        self.peers = [p for p in peers if not p.startswith("dns:")]
        # dns:NAME:PORT -> the addresses it resolved to last, connected
        self._dns: dict[tuple[str, int], set[str]] = {}
        self._dns_failing: set[tuple[str, int]] = set()
        for spec in peers:
            if spec.startswith("dns:"):
                host, _, port = spec[4:].rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"peer {spec!r}: expected dns:NAME:PORT")
                self._dns[(host, int(port))] = set()
        self.dropped = 0  # events not sent: the PUB queue was full
        self._ctx: zmq.asyncio.Context | None = None
        self._pub_ctx: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._connected: set[str] = set()
        self._own_path: Path | None = None
        self._tasks: list[asyncio.Task] = []
        self._seq = 0

    @property
    def enabled(self) -> bool:
        return bool(self.bind or self.peers or self.peer_dir or self._dns)

    def start(self) -> None:
        """Bind, connect and start receiving (on the running loop)."""
        self._ctx = zmq.asyncio.Context()
        # A plain (blocking-API) socket to publish from synchronous code: a non-blocking send on it raises Again
        # at once, where an asyncio socket's would hide it in a future.
        self._pub_ctx = zmq.Context()
        self._pub = self._pub_ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.IPV6, 1)  # tcp://*:PORT then listens on IPv4 and IPv6
        if self.bind:
            self._pub.bind(self.bind)
        if self.peer_dir:
            self._own_path = Path(self.peer_dir) / f"{os.getpid()}.sock"
            self._pub.bind(f"ipc://{self._own_path}")
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.IPV6, 1)  # peers found by DNS may have IPv6 addresses
        for address in self.peers:
            self._connect(address)
        self._scan_dir()
        self.router.attach_peers(self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._tick())]
        log.info("peer sync: this router is %s; publishing at %s; peers %s", self.router_id,
                 ", ".join(self._publishing()) or "nowhere", ", ".join(sorted(self._connected)) or "none yet")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close(0)
        self._pub = self._sub = None
        if self._own_path is not None:
            with contextlib.suppress(OSError):
                self._own_path.unlink()
        for ctx in (self._ctx, self._pub_ctx):
            if ctx is not None:
                ctx.term()
        self._ctx = self._pub_ctx = None

    # ---- sending ------------------------------------------------------------------------------------
    def publish(self, kind: PeerEventKind, **fields: object) -> None:
        """Send one event to every peer; never blocks (a full queue drops it, and the peers see the gap)."""
        self._seq += 1
        if self._pub is None:
            return
        try:
            self._pub.send(_encode(PeerEvent(kind, self.router_id, self._seq, **fields)), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    # ---- receiving ----------------------------------------------------------------------------------
    async def _receive(self) -> None:
        assert self._sub is not None
        sub, router = self._sub, self.router
        while True:
            frame = await sub.recv()
            while True:
                try:
                    event = _decode(frame)
                except msgspec.DecodeError:
                    log.warning("peer sync: an undecodable message (%d bytes) ignored", len(frame))
                else:
                    if event.router != self.router_id:
                        try:
                            router.apply_peer(event)
                        except Exception:  # a bug here must never stop the feed
                            log.exception("peer sync: applying a peer's event failed")
                try:  # drain what is queued before awaiting again
                    frame = sub.recv(zmq.NOBLOCK).result()
                except zmq.Again:
                    break

    async def _tick(self) -> None:
        while True:
            self.publish(PeerEventKind.HEARTBEAT)
            self._scan_dir()
            await self._resolve()
            self.router.check_peers()
            await asyncio.sleep(HEARTBEAT_S)

    async def _resolve(self) -> None:
        """dns:NAME:PORT peers: subscribe to every address the name resolves to now, drop those it no longer does."""
        loop = asyncio.get_running_loop()
        for (host, port), connected in self._dns.items():
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                if (host, port) not in self._dns_failing:
                    self._dns_failing.add((host, port))
                    log.warning("peer sync: cannot resolve %s (%s); its routers are not peers until it resolves",
                                host, exc)
                continue
            if (host, port) in self._dns_failing:
                self._dns_failing.discard((host, port))
                log.info("peer sync: %s resolves again", host)
            addresses = {zmq_tcp_address(info[4][0], port) for info in infos}
            for address in addresses - connected:
                log.info("peer sync: subscribing to %s (%s)", address, host)
                self._connect(address)
            for address in connected - addresses:
                log.info("peer sync: %s no longer resolves to %s", host, address)
                self._disconnect(address)
            self._dns[(host, port)] = addresses

    def _connect(self, address: str) -> None:
        if address in self._connected or self._sub is None:
            return
        self._sub.connect(address)
        self._connected.add(address)

    def _disconnect(self, address: str) -> None:
        if address in self._connected and self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(address)
            self._connected.discard(address)

    def _scan_dir(self) -> None:
        """--workers: subscribe to every worker's socket in the shared directory but this one's."""
        if not self.peer_dir:
            return
        try:
            paths = list(Path(self.peer_dir).glob("*.sock"))
        except OSError:
            return
        for path in paths:
            if path != self._own_path:
                address = f"ipc://{path}"
                if address not in self._connected:
                    log.info("peer sync: subscribing to worker %s", path.stem)
                    self._connect(address)

    def _publishing(self) -> list[str]:
        """The addresses this router's PUB socket is bound to."""
        return [a for a in (self.bind, self._own_path and f"ipc://{self._own_path}") if a]

    def debug(self) -> dict[str, object]:
        return {"router_id": self.router_id, "publishing": self._publishing(),
                "subscribed": sorted(self._connected), "dropped_sends": self.dropped}
