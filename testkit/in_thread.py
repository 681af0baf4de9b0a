"""Servers in a daemon thread of this process (uvicorn on a socket bound first, so the port is known up front):
the router (same code as its CLI) and, through testkit.fake_backend, the fake vLLM backend."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def listen_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound TCP socket for serve_in_thread (port 0: a free one; read it with getsockname)."""
    # proto=IPPROTO_TCP, as uvicorn binds: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every reply on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve_in_thread(app: Any, sock: socket.socket, *, name: str, ready_timeout: float = 10.0,
                    stop_timeout: float = 5.0, **uvicorn_config: Any) -> Callable[..., None]:
    """Serve app with a uvicorn.Server on sock in a daemon thread; return, once it has started, stop(timeout):
    the server is asked to exit, the thread joined (stop_timeout by default), the socket closed.
    uvicorn_config goes to uvicorn.Config."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_config))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"{name} failed to start: {errors[:1]}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"{name} did not start in {ready_timeout} s")
        time.sleep(0.01)

    def stop(timeout: float = stop_timeout) -> None:
        server.should_exit = True
        thread.join(timeout)
        with contextlib.suppress(OSError):
            sock.close()

    return stop


@contextlib.contextmanager
def serve_router(argv: list[str]) -> Iterator[tuple[str, Any]]:
    """Run `preble-router ARGV` in a thread (same code as the CLI); yields (url, proxy)."""
    from preble_router.cli import build_parser, build_proxy

    sock = listen_socket()
    port = sock.getsockname()[1]
    proxy = build_proxy(build_parser().parse_args([*argv, "--port", str(port)]))
    stop = serve_in_thread(proxy.app(), sock, name=f"router-{port}", ready_timeout=60, stop_timeout=10,
                           log_level="warning", access_log=False, loop="asyncio", timeout_graceful_shutdown=2)
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        stop()
