"""upstream.UpstreamPool against FAKE HTTP servers (raw asyncio sockets scripted per test)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from preble_router.upstream import (ConnectError, ConnectionLost, FirstByteTimeout, ProtocolError, StreamStalled,
                                    UpstreamPool)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeServer:
    """A scripted HTTP server: `handler` runs once per connection; requests and connections are counted."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> FakeServer:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                self._handlers.discard(task)

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.tls)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @classmethod
    def answering(cls, raw: bytes, *, hold_open: bool = False, tls: ssl.SSLContext | None = None) -> FakeServer:
        """A server that reads one request per connection and answers it with `raw`, then closes the connection
        or, with hold_open, waits for the client to close it."""
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(raw)
            await writer.drain()
            if hold_open:
                await reader.read()

        server = cls(handler, tls)
        return server

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def reply(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + b"".join(h + b"\r\n" for h in extra) + \
        b"content-length: %d\r\n\r\n" % len(body) + body


HEADERS = [(b"content-type", b"application/json")]


async def test_whole_replies_reuse_one_connection_and_frame_the_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(reply(b"hello", b"set-cookie: a=1", b"set-cookie: b=2"))

    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        for _ in range(3):
            resp = await pool.post(server.url + "/base/", "/v1/completions", HEADERS, b'{"x": 1}')
            assert resp.status == 200 and await resp.read() == b"hello"
            assert [v for n, v in resp.headers if n.lower() == b"set-cookie"] == [b"a=1", b"b=2"]
        await pool.close()
    assert server.connections == 1
    port = server.url.rsplit(":", 1)[1]
    assert server.requests[0] == (b"POST /base/v1/completions HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() +
                                  b"\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"x\": 1}")


async def test_other_methods_and_query_strings_are_sent_as_given() -> None:
    async with FakeServer.answering(reply(b"{}")) as server:
        pool = UpstreamPool()
        resp = await pool.request("GET", server.url, "/v1/responses/resp_1?stream=true", HEADERS, b"")
        assert resp.status == 200 and await resp.read() == b"{}"
        await pool.close()
    assert server.requests[0].startswith(b"GET /v1/responses/resp_1?stream=true HTTP/1.1\r\n")
    assert server.requests[0].endswith(b"content-length: 0\r\n\r\n")


async def test_a_chunked_reply_is_handed_on_piece_by_piece() -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await go_on.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await reader.read()

    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        resp = await pool.post(server.url, "/v1/completions", HEADERS, b"{}")
        assert await resp.read_any() == b"first"  # before the server sends the rest
        go_on.set()
        assert await resp.read_any() == b"second"
        assert await resp.read_any() == b""
        resp.release()
        await pool.close()


async def test_a_connection_the_backend_closed_while_idle_is_replaced() -> None:
    # Keep-alive as far as the headers say, then closed: a keep-alive timeout.
    async with FakeServer.answering(reply(b"once")) as server:
        pool = UpstreamPool()
        for _ in range(3):
            resp = await pool.post(server.url, "/x", HEADERS, b"{}")
            assert await resp.read() == b"once"
        await pool.close()
    assert server.connections == 3 and len(server.requests) == 3


async def test_a_fresh_connection_closed_without_a_reply_fails() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)  # then closed, no reply

    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        with pytest.raises(ConnectionLost):
            await pool.post(server.url, "/x", HEADERS, b"{}")
        await pool.close()
    assert server.connections == 1  # not retried: the request may have been read


async def test_unreachable_backend_is_a_connect_error() -> None:
    pool = UpstreamPool(connect_timeout=2)
    with pytest.raises(ConnectError):
        await pool.post("http://127.0.0.1:9", "/x", HEADERS, b"{}")
    with pytest.raises(ConnectError):
        await pool.post("ftp://example", "/x", HEADERS, b"{}")
    await pool.close()


async def test_a_backend_that_never_answers_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await asyncio.sleep(30)

    async with FakeServer(handler) as server:
        pool = UpstreamPool(request_timeout=0.3)
        resp = await pool.post(server.url, "/x", HEADERS, b"{}")
        assert await resp.read_any() == b"partial"
        with pytest.raises(TimeoutError):  # the timeout covers the whole reply, not only its head
            await asyncio.wait_for(resp.read_any(), 5)
        resp.close()
        await pool.close()


@pytest.mark.parametrize("head", [b"", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"])
async def test_no_body_byte_within_the_first_byte_limit_fails(head: bytes) -> None:
    """A backend that accepts and then says nothing (or only its head, as a stuck engine's server does for a
    stream) fails after first_byte_timeout, long before request_timeout."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(head)
        await asyncio.sleep(30)

    async with FakeServer(handler) as server:
        pool = UpstreamPool(request_timeout=30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(FirstByteTimeout):
            resp = await pool.post(server.url, "/x", HEADERS, b"{}", first_byte_timeout=0.3)
            await asyncio.wait_for(resp.read_any(), 5)
        assert loop.time() - started < 2
        await pool.close()


async def test_a_stream_that_stops_fails_after_the_idle_limit_and_one_that_flows_does_not() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):  # 0.8 s of chunks 0.1 s apart: longer than the idle limit, never idle that long
            writer.write(b"1\r\nx\r\n")
            await asyncio.sleep(0.1)
        await asyncio.sleep(30)

    async with FakeServer(handler) as server:
        pool = UpstreamPool(request_timeout=30)
        resp = await pool.post(server.url, "/x", HEADERS, b"{}", first_byte_timeout=5, idle_timeout=0.4)
        got = b""
        with pytest.raises(StreamStalled):
            while True:
                got += await asyncio.wait_for(resp.read_any(), 5)
        assert got == b"x" * 8
        resp.close()
        await pool.close()


async def test_the_progress_limits_end_with_the_reply() -> None:
    """A whole reply read in time leaves no timer behind to fail the connection's next request."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # every request on the connection
            await server.read_request(reader)
            writer.write(reply(b"done"))
            await writer.drain()

    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        for _ in range(2):
            resp = await pool.post(server.url, "/x", HEADERS, b"{}", first_byte_timeout=0.2, idle_timeout=0.2)
            assert await resp.read() == b"done"
            await asyncio.sleep(0.4)  # past both limits, idle in the pool
        assert server.connections == 1
        await pool.close()


async def test_a_reply_cut_off_mid_body_delivers_what_came_then_fails() -> None:
    async with FakeServer.answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789") as server:
        pool = UpstreamPool()
        resp = await pool.post(server.url, "/x", HEADERS, b"{}")
        assert await resp.read_any() == b"0123456789"
        with pytest.raises(ConnectionLost):
            await resp.read_any()
        resp.close()
        await pool.close()


async def test_a_body_without_length_runs_to_the_end_of_the_connection() -> None:
    async with FakeServer.answering(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it") as server:
        pool = UpstreamPool()
        resp = await pool.post(server.url, "/x", HEADERS, b"{}")
        assert await resp.read() == b"all of it"
        await pool.close()


async def test_an_interim_reply_is_skipped() -> None:
    async with FakeServer.answering(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"real"), hold_open=True) as server:
        pool = UpstreamPool()
        resp = await pool.post(server.url, "/x", HEADERS, b"{}")
        assert resp.status == 200 and await resp.read() == b"real"
        await pool.close()


async def test_a_malformed_reply_is_a_protocol_error() -> None:
    async with FakeServer.answering(b"NOT HTTP AT ALL\r\n\r\n", hold_open=True) as server:
        pool = UpstreamPool()
        with pytest.raises(ProtocolError):
            await pool.post(server.url, "/x", HEADERS, b"{}")
        await pool.close()


async def test_a_slow_reader_pauses_the_socket_and_still_gets_every_byte() -> None:
    big = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB, over the 4 MiB high-water mark

    async with FakeServer.answering(reply(big), hold_open=True) as server:
        pool = UpstreamPool()
        resp = await pool.post(server.url, "/x", HEADERS, b"{}")
        await asyncio.sleep(0.5)  # the backend writes; nothing reads
        conn = resp._conn
        assert conn is not None and conn._paused and conn._buffered < 2 * len(big) // 3
        assert await resp.read() == big
        await pool.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_https_backends_are_verified(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async with FakeServer.answering(reply(b"secure"), tls=server_tls) as server:
        https = server.url.replace("http://", "https://")
        trusting = UpstreamPool(ssl_context=ssl.create_default_context(cafile=str(cert)))
        resp = await trusting.post(https, "/x", HEADERS, b"{}")
        assert await resp.read() == b"secure"
        await trusting.close()
        default = UpstreamPool()  # the system's CAs: a self-signed certificate is refused
        with pytest.raises(ConnectError):
            await default.post(https, "/x", HEADERS, b"{}")
        await default.close()


async def _pieces(*chunks: bytes, pause: asyncio.Event | None = None):
    for i, chunk in enumerate(chunks):
        if pause is not None and i == 1:
            await pause.wait()
        yield chunk


async def test_a_streamed_body_is_sent_with_its_length_or_chunked() -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head:
            body = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readexactly(2)
        else:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
        got.append(head + body)
        writer.write(reply(b"ok"))
        await writer.drain()

    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        resp = await pool.request("POST", server.url, "/up", HEADERS, _pieces(b"abc", b"", b"defg"), body_length=7)
        assert resp.status == 200 and await resp.read() == b"ok"
        resp = await pool.request("POST", server.url, "/up", HEADERS, _pieces(b"abc", b"defg"))
        assert resp.status == 200 and await resp.read() == b"ok"
        await pool.close()
    assert got[0].endswith(b"content-length: 7\r\n\r\nabcdefg")
    assert b"transfer-encoding: chunked\r\n\r\n" in got[1] and got[1].endswith(b"abcdefg")
    assert server.connections == 2  # a streamed body always goes on a new connection


async def test_a_reply_before_the_whole_streamed_body_stops_the_upload() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply(b"too big"))  # answered without reading the body
        await writer.drain()
        await reader.read()

    pause = asyncio.Event()
    async with FakeServer(handler) as server:
        pool = UpstreamPool()
        task = asyncio.ensure_future(pool.request("POST", server.url, "/up", HEADERS, _pieces(b"a", b"b", pause=pause),
                                                             body_length=2))
        await asyncio.sleep(0.2)  # the reply's head has come meanwhile
        pause.set()
        resp = await asyncio.wait_for(task, 5)
        assert resp.status == 200 and await resp.read() == b"too big"
        assert not pool._idle.get(next(iter(pool._targets.values())).key)  # the connection is not reused
        await pool.close()
