"""Forwarding to backends: pooled HTTP/1.1 connections that send a POST and hand back its reply.

Why not aiohttp or httpx: the router's request path is CPU-bound on one core, and the HTTP client
was its largest part; both do work per request that a proxy does not need (httpx checks every pooled connection on
each request), and this client spends less of the router's CPU per request than either (BENCHMARKS.md, measured
through the router by benchmarks.overhead). It does one job: keep-alive connections per backend, a request written
in one go, the reply parsed by httptools (llhttp, the parser uvicorn serves with), its body handed on as it
arrives. Cookies, redirects and compression are not handled: a proxy must relay those as they are.

Failures are UpstreamError (ConnectError, ConnectionLost, ProtocolError) or TimeoutError (FirstByteTimeout and
StreamStalled among them: a reply that shows no progress, for a backend that accepts connections but no longer
answers). A reused connection that the backend closed while it sat idle is retried once on a new connection, when
no reply byte came back.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# A streamed reply that the client reads slower than the backend writes stops being read from the socket past
# this many buffered bytes, and resumes below a quarter of it.
_HIGH_WATER = 4 * 1024 * 1024


class UpstreamError(Exception):
    """The backend could not be reached, or its reply was cut off or malformed."""


class ConnectError(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    pass


class ProtocolError(UpstreamError):
    pass


class BackendDown(UpstreamError):
    """Failed on purpose: the backend failed its health probe before this reply's body began."""


class FirstByteTimeout(TimeoutError):
    """No byte of the reply's body came within the first-byte limit (nothing has reached the client yet)."""


class StreamStalled(TimeoutError):
    """The reply's body stopped: no byte for the idle limit, after some had come."""


@dataclass(frozen=True)
class _Target:
    key: tuple[str, str, int]  # scheme, host, port: connections are pooled per key
    host: str
    port: int
    tls: bool
    head: bytes  # request line and Host header


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None  # the progress limits (first byte, idle), when set
        self.closed = False
        self.idle_since = 0.0
        self._write_paused = False  # the transport's buffer is full (asyncio's write flow control)
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self.got_bytes = False  # any byte of the reply: a request that got none was never answered
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self._interim = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self.got_body = False
        self.reusable = True  # False once a streamed request body was cut short: the backend may still read it
        self._last_body = 0.0
        self._first_byte_timeout: float | None = None
        self._idle_timeout: float | None = None

    # ---- the request side -----------------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes, timeout: float, first_byte_timeout: float | None = None,
             idle_timeout: float | None = None) -> None:
        assert self.transport is not None and not self.active
        if self._paused:  # (never, if the last reply was read to its end; a paused socket would never answer)
            self.transport.resume_reading()
        self._reset()
        self.active = True
        self._timer = self.pool.loop.call_later(timeout, self._timed_out, timeout)
        self._first_byte_timeout, self._idle_timeout = first_byte_timeout, idle_timeout
        if first_byte_timeout is not None:
            self._watch = self.pool.loop.call_later(first_byte_timeout, self._check_progress)
        self.transport.writelines((head, body))

    async def send_body(self, chunks: AsyncIterable[bytes], chunked: bool) -> None:
        """Write a streamed request body after send()'s head, chunk by chunk as the source yields them, waiting
        while the transport's buffer is full. Stops early (the connection is then not reused) if the reply's head
        comes first: the backend answered without the rest of the body."""
        assert self.transport is not None
        async for chunk in chunks:
            if self.error is not None:
                raise self.error
            if self.head_done:
                self.reusable = False
                return
            if not chunk:
                continue
            if chunked:
                self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                self.transport.write(chunk)
            while self._write_paused and self.error is None and not self.closed:
                await self._wait()
        if chunked and not self.closed:
            self.transport.write(b"0\r\n\r\n")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    async def wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_any(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" once the reply is complete."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._last_body = self.pool.loop.time()  # the idle limit counts from here: the pause was ours
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    async def _wait(self) -> None:
        self._waiter = self.pool.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self.fail(TimeoutError(f"no complete reply within {timeout:g} s"))

    def _check_progress(self) -> None:
        """The first-byte or idle limit's timer: fail the reply if its body shows no progress. One timer per idle
        period, re-armed from the last byte's time, rather than one per chunk."""
        self._watch = None
        if not self.active or self.complete or self.error is not None:
            return
        if not self.got_body:
            self.fail(FirstByteTimeout(f"no reply byte within {self._first_byte_timeout:g} s"))
            return
        if self._idle_timeout is None:
            return
        quiet = self.pool.loop.time() - self._last_body
        if self._paused:  # the client reads slower than the backend writes: the silence is the client's
            quiet = 0.0
        if quiet >= self._idle_timeout:
            self.fail(StreamStalled(f"no reply byte for {self._idle_timeout:g} s mid-reply"))
            return
        self._watch = self.pool.loop.call_later(self._idle_timeout - quiet, self._check_progress)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def fail(self, exc: BaseException) -> None:
        """End the reply with exc and drop the connection."""
        if self.error is None and not self.complete:
            self.error = exc
        self.abort()
        self._wake()

    def abort(self) -> None:
        """Drop the connection, whatever state its reply is in; it never carries another request."""
        self.active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_watch()
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()
            self.pool.forget(self)

    # ---- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # the request goes out as head + body writes: never hold the body back for an ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.fail(ProtocolError("the backend sent bytes with no request in flight"))
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ProtocolError(f"malformed reply from the backend: {exc}"))

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_watch()
        self.closed = True
        self.pool.forget(self)
        if self.active and not self.complete and self.error is None:
            if self.head_done and not self._framed():
                self.complete = True  # a body with neither length nor chunks runs to the end of the connection
            else:
                what = "the reply" if self.head_done else "any reply"
                self.error = ConnectionLost(f"the backend closed the connection before {what} ended"
                                            + (f": {exc}" if exc else ""))
        self._wake()

    def _framed(self) -> bool:
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)

    # ---- httptools callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim reply, the real one follows
            self._interim = True
            return
        self.status = status
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._idle_timeout is not None:
            self._last_body = self.pool.loop.time()
        if not self.got_body:
            self.got_body = True
            if self._first_byte_timeout is not None or self._idle_timeout is not None:
                self._stop_watch()
                if self._idle_timeout is not None:
                    self._watch = self.pool.loop.call_later(self._idle_timeout, self._check_progress)
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_watch()
        self._wake()


class UpstreamResponse:
    """A backend's reply: status and raw headers now, the body as it arrives. End it with release() (the
    connection goes back to the pool if the reply was read whole) or close()."""

    __slots__ = ("_conn", "status", "headers")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers  # [(name, value)] as the backend sent them

    async def read_any(self) -> bytes:
        assert self._conn is not None, "read after release"
        return await self._conn.read_any()

    async def read(self) -> bytes:
        """The whole (rest of the) body; the connection then goes back to the pool."""
        parts = []
        try:
            while chunk := await self.read_any():
                parts.append(chunk)
        except BaseException:
            self.close()
            raise
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.active = False
        if conn.complete and conn.keep_alive and conn.reusable and conn.error is None and not conn.closed:
            conn.pool.put_idle(conn)
        else:
            conn.abort()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class UpstreamPool:
    """Keep-alive connections to any number of backends, created on demand, reused most recent first."""

    def __init__(self, *, connect_timeout: float = 5.0, request_timeout: float = 600.0, idle_timeout: float = 3.0,
                 max_idle_per_backend: int = 512, ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout  # the whole reply, body included
        # Below uvicorn's (and so vLLM's) 5 s keep-alive, so a backend rarely closes a connection as it is reused.
        self.idle_timeout = idle_timeout
        self.max_idle_per_backend = max_idle_per_backend
        self.loop = asyncio.get_running_loop()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[tuple[str, str, str], _Target] = {}
        self._ssl = ssl_context  # for https backends; the system's CAs when None

    async def post(self, base_url: str, path: str, headers: Sequence[tuple[bytes, bytes]], body: bytes, *,
                   first_byte_timeout: float | None = None, idle_timeout: float | None = None) -> UpstreamResponse:
        """Send POST base_url+path and wait for the reply's head. `headers` must not include Host or
        Content-Length (set here). With first_byte_timeout, the reply fails with FirstByteTimeout unless a body
        byte comes within that many seconds of sending (a stream's first chunk); with idle_timeout, it fails with
        StreamStalled once its body has come and then stopped for that long."""
        return await self.request("POST", base_url, path, headers, body, first_byte_timeout=first_byte_timeout,
                                  idle_timeout=idle_timeout)

    async def request(self, method: str, base_url: str, path: str, headers: Sequence[tuple[bytes, bytes]],
                      body: bytes | AsyncIterable[bytes], *, body_length: int | None = None,
                      first_byte_timeout: float | None = None, idle_timeout: float | None = None) -> UpstreamResponse:
        """post() with another method (GET /v1/responses/ID, GET /version); `path` may carry a query string.

        `body` may be an async iterable of chunks (an upload relayed as it arrives, never held whole): sent with
        Content-Length `body_length` when given (the source must yield exactly that many bytes), else chunked;
        always on a new connection, and never retried (the source is consumed as it is sent)."""
        target = self._targets.get((base_url, method, path)) or self._target(base_url, method, path)
        parts = [target.head]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if isinstance(body, (bytes, bytearray, memoryview)):
            parts.append(b"content-length: %d\r\n\r\n" % len(body))
        else:
            parts.append(b"transfer-encoding: chunked\r\n\r\n" if body_length is None
                         else b"content-length: %d\r\n\r\n" % body_length)
            conn = await self._connect(target)
            conn.send(b"".join(parts), b"", self.request_timeout, first_byte_timeout, idle_timeout)
            try:
                await conn.send_body(body, chunked=body_length is None)
                await conn.wait_head()
            except BaseException:
                conn.abort()
                raise
            return UpstreamResponse(conn)
        head = b"".join(parts)
        for retry in (False, True):
            conn = self._reuse(target.key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target)
            conn.send(head, body, self.request_timeout, first_byte_timeout, idle_timeout)
            try:
                await conn.wait_head()
            except BaseException as exc:
                conn.abort()
                if reused and not retry and isinstance(exc, ConnectionLost) and not conn.got_bytes:
                    continue  # closed by the backend while idle: the request was never read
                raise
            return UpstreamResponse(conn)
        raise AssertionError("unreachable")

    def fail_unanswered(self, base_url: str, reason: str) -> int:
        """Fail every reply from base_url whose body has not begun (so none of it can have reached a client) with
        BackendDown; the number failed."""
        url = urlsplit(base_url)
        key = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        failed = [conn for conn in self._open if conn.key == key and conn.active and not conn.got_body]
        for conn in failed:
            conn.fail(BackendDown(reason))
        return len(failed)

    async def close(self) -> None:
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()

    # ---- the pool's bookkeeping ----------------------------------------------------------------------------
    def put_idle(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_backend:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _reuse(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = self.loop.time() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > oldest_ok and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
            conn.abort()
        return None

    async def _connect(self, target: _Target) -> _Connection:
        if target.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self, target.key), target.host, target.port,
                                            ssl=self._ssl if target.tls else None),
                self.connect_timeout)
        except TimeoutError:
            raise TimeoutError(f"connecting to {target.host}:{target.port} took over {self.connect_timeout:g} s") \
                from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        self._open.add(conn)
        return conn

    def _target(self, base_url: str, method: str, path: str) -> _Target:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConnectError(f"not an http(s) URL: {base_url!r}")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        authority = url.netloc.rpartition("@")[2]  # as written, with [brackets] around an IPv6 address
        request_target = (url.path.rstrip("/") + path) or "/"
        head = f"{method} {request_target} HTTP/1.1\r\nhost: {authority}\r\n".encode("ascii")
        target = _Target((url.scheme, url.hostname, port), url.hostname, port, tls, head)
        if len(self._targets) > 1024:  # backends come and go (discovery): never grow without bound
            self._targets.clear()
        self._targets[(base_url, method, path)] = target
        return target
