"""Servers as real subprocesses, each in its own process group: `preble-router` (its own CLI) in front of replicas,
a fake backend, a peer router; for tests, demos and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from testkit.ports import free_port


def router_argv(backends: Sequence, model_dir: str | os.PathLike, *, policy: str, kv_events: bool = True,
                served_model_name: str = "tiny", extra: Sequence[str] = ()) -> list[str]:
    """CLI arguments for replicas (objects with url / kv_endpoint / replay_endpoint) or plain URLs."""
    urls = [getattr(b, "url", b) for b in backends]
    argv = ["--backends", *urls, "--model", str(model_dir), "--served-model-name", served_model_name,
            "--policy", policy]
    sources = [f"{b.url}={b.kv_endpoint}|{b.replay_endpoint}" for b in backends
               if kv_events and getattr(b, "kv_endpoint", None)]
    if sources:
        argv += ["--kv-events", *sources]
    elif not kv_events:
        argv += ["--kv-events", "off"]  # the router's default is auto: it would follow what the engines advertise
    return argv + list(extra)


def answers_health(url: str) -> bool:
    """Ready check for start_server / server_process: GET url/health answers 200."""
    return httpx.get(url + "/health", timeout=2).status_code == 200


@contextlib.contextmanager
def server_process(cmd: Sequence[str], url: str, is_ready: Callable[[str], bool], *, ready_timeout: float = 60.0,
                   log_path: Path | None = None, env: Mapping[str, str] | None = None,
                   cwd: str | os.PathLike | None = None) -> Iterator[subprocess.Popen]:
    """Run cmd in its own process group (output to log_path, a temporary file by default); yield the process once
    is_ready(url) (an httpx.HTTPError counts as not yet); on exit SIGTERM the whole group, SIGKILL after 15 s.
    Raises with the log's tail if it exits, or is not ready within ready_timeout seconds."""
    log_path = log_path or Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if is_ready(url):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[0]} not ready in {ready_timeout}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def start_server(cmd: Sequence[str], url: str, is_ready: Callable[[str], bool], **kwargs: Any) -> Iterator[str]:
    """server_process (same arguments), yielding url."""
    with server_process(cmd, url, is_ready, **kwargs):
        yield url


@contextlib.contextmanager
def router_process(argv: Sequence[str], *, python: str = sys.executable, ready_timeout: float = 60.0,
                   log_path: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `python -m preble_router.cli ARGV --port P`; yields (its URL, the process) once /health answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process([python, "-m", "preble_router.cli", *argv, "--port", str(port)], url, answers_health,
                        ready_timeout=ready_timeout, log_path=log_path) as proc:
        yield url, proc


@contextlib.contextmanager
def start_router(argv: Sequence[str], *, python: str = sys.executable, ready_timeout: float = 60.0,
                 log_path: Path | None = None) -> Iterator[str]:
    """router_process (same arguments), yielding its URL."""
    with router_process(argv, python=python, ready_timeout=ready_timeout, log_path=log_path) as (url, _):
        yield url
