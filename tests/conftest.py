"""Shared fixtures: a tiny model built offline, and an in-process router served over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from preble_router.cli import build_parser, build_proxy
from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", size="tiny")


@contextmanager
def serve_router(argv: list[str]) -> Iterator[tuple[str, object]]:
    """Run `preble-router ARGV` in a thread (same code as the CLI); yields (url, proxy)."""
    # proto=IPPROTO_TCP, as uvicorn binds: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every reply on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    args = build_parser().parse_args([*argv, "--port", str(port)])
    proxy = build_proxy(args)
    server = uvicorn.Server(uvicorn.Config(proxy.app(), log_level="warning", access_log=False, loop="asyncio",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "router did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
