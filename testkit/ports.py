"""Free TCP ports on this machine, for servers a test or a benchmark is about to start."""

from __future__ import annotations

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports nothing listens on now: every socket is held until all are picked. Another process may
    still take one between this call and the server's bind (a small race, acceptable for tests)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port nothing listens on now (see free_ports)."""
    return free_ports(1, host)[0]
