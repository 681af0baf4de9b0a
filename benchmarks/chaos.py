"""Chaos benchmark: real vLLM CPU replicas behind `preble-router` (its default policy and flags), one fault at a
time under a steady closed-loop load, every request accounted for.

    flock /tmp/preble-bench.lock python -m benchmarks.chaos [--faults kill,stop,engine_restart,router_restart,feed_drop]
        [--duration 35] [--out runs/chaos.json]

Two replicas (one core each) serve the whole run; each fault leaves the cluster recovered for the next one. The
router runs as `preble-router --backends A B --model MODEL --health-interval 0.5 --admin-open` (/debug/backends
is read throughout), with no --policy and default timeouts and KV-event discovery (`--kv-events auto`). Faults:

  kill            SIGKILL a replica while it streams a long completion, then restart it
  stop            SIGSTOP a replica (mid-stream) for 20 s, then SIGCONT
  engine_restart  stop and start a replica's engine gracefully: new KV-event sequence, empty cache
  router_restart  SIGTERM the router and start it again on the same port: its index must come back from the
                  engines' replay sockets with no new traffic (checked with /debug/route on a prompt sent before
                  the restart, then predicted == vLLM's cached_tokens when it is sent again)
  feed_drop       one replica's KV events reach the router through a ZMQ forwarder (XSUB -> XPUB) started here;
                  the forwarder is SIGSTOPped for 10 s: the feed must turn `silent` (routed on the estimate)
                  and back to `flowing`

Load: 3 clients in a closed loop, half streaming, /v1/completions with 6 shared 128-token prefixes (plus a
unique tail) and a quarter of unique prompts, max_tokens 8-16. Each request ends as one of: ok; retried (ok
or not, x-preble-attempts > 1); clear error (an OpenAI-style JSON error, or an SSE error event then [DONE]);
refused (the router's port was closed: only while it restarts); lost (anything else: no answer within 90 s, a
connection dropped without an error body, a stream cut without an error event). Lost must be 0. Time to
recover: from the fault until requests sent after it succeed on both replicas (feed_drop: until the feed
flows again for good); "after end" is the part of it past the fault's end (replica ready again, SIGCONT, router
up), i.e. the router's own share. Prints a table; writes everything (per-request records, /debug/backends
samples, the router's warnings during each fault) to --out. Exits 1 if a request was lost or a fault broke.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.vllm_replicas import Replica, start_replicas
from testkit.ports import free_port
from testkit.router_process import answers_health, start_server
from testkit.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("kill", "stop", "engine_restart", "router_restart", "feed_drop")
MODEL_NAME = "tiny"
VOCAB = 1024  # the tiny model's; ids 0-2 are special
BLOCK = 32
REQUEST_TIMEOUT = 90.0  # past the router's own limits (60 s first byte / stream idle): a request this old is lost
LONG_STREAM_TOKENS = 1500  # the stream a fault interrupts
STOP_SECONDS = 20.0
FEED_DROP_SECONDS = 10.0
ERROR_TAIL = 300


# ---------------------------------------------------------------------------------------------- requests
def _classify_json_error(raw: bytes) -> str | None:
    """The message of an OpenAI-style error body, else None."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None
    return str(err.get("message")) if isinstance(err, dict) and err.get("message") else None


async def send_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: dict[str, Any],
                   first_chunk: threading.Event | None = None) -> dict[str, Any]:
    """Send one /v1/completions request and fill rec with its outcome (ok, clear_error, refused, lost)."""
    rec.update(start=time.monotonic(), stream=bool(body.get("stream")), outcome=None, status=None, backend=None,
               attempts=None, error=None)

    def headers(r: httpx.Response) -> None:
        rec["status"] = r.status_code
        rec["backend"] = r.headers.get("x-preble-backend")
        rec["attempts"] = int(r.headers["x-preble-attempts"]) if "x-preble-attempts" in r.headers else None
        if "x-preble-matched-tokens" in r.headers:
            rec["predicted_tokens"] = int(r.headers["x-preble-matched-tokens"])

    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            if body.get("stream"):
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    headers(r)
                    if r.status_code != 200:
                        raw = await r.aread()
                        msg = _classify_json_error(raw)
                        rec["outcome"] = "clear_error" if msg else "lost"
                        rec["error"] = (msg or f"HTTP {r.status_code} without an error body: {raw[:200]!r}")
                    else:
                        events: list[str] = []
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line[6:])
                                if first_chunk is not None:
                                    first_chunk.set()
                        errors = [e for e in events if e != "[DONE]" and '"error"' in e and _classify_json_error(
                            e.encode())]
                        rec["chunks"] = len(events)
                        if events and events[-1] == "[DONE]":
                            rec["outcome"] = "clear_error" if errors else "ok"
                            if errors:
                                rec["error"] = _classify_json_error(errors[-1].encode())
                        else:
                            rec["outcome"] = "lost"
                            rec["error"] = (f"stream ended after {len(events)} events without [DONE]"
                                            + (f" (error event: {errors[-1][:200]})" if errors else ""))
            else:
                r = await client.post(url + "/v1/completions", json=body)
                headers(r)
                if r.status_code == 200:
                    try:
                        reply = r.json()
                        ok = bool(reply.get("choices"))
                    except ValueError:
                        ok, reply = False, {}
                    rec["outcome"] = "ok" if ok else "lost"
                    if not ok:
                        rec["error"] = f"200 without choices: {r.content[:200]!r}"
                    details = (reply.get("usage") or {}).get("prompt_tokens_details") or {}
                    rec["cached_tokens"] = details.get("cached_tokens")
                else:
                    msg = _classify_json_error(r.content)
                    rec["outcome"] = "clear_error" if msg else "lost"
                    rec["error"] = msg or f"HTTP {r.status_code} without an error body: {r.content[:200]!r}"
    except httpx.ConnectError as exc:  # nothing listens on the router's port: the request never left
        rec["outcome"], rec["error"] = "refused", repr(exc)[:ERROR_TAIL]
    except TimeoutError:
        rec["outcome"], rec["error"] = "lost", f"no complete answer within {REQUEST_TIMEOUT:.0f} s"
    except httpx.HTTPError as exc:  # reset, dropped connection, cut chunked body: no error body came
        rec["outcome"], rec["error"] = "lost", f"{type(exc).__name__}: {exc}"[:ERROR_TAIL]
    finally:
        rec["end"] = time.monotonic()
        if first_chunk is not None:
            first_chunk.set()  # also when it failed before any chunk: the waiter looks at rec
    return rec


class Prompts:
    """Shared-prefix and unique prompts (token ids), max_tokens 8-16, half streamed."""

    def __init__(self, seed: int = 0, groups: int = 6, prefix_len: int = 128) -> None:
        self.rng = random.Random(seed)
        self.prefixes = [[self.rng.randrange(3, VOCAB) for _ in range(prefix_len)] for _ in range(groups)]
        self.lock = threading.Lock()

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, VOCAB) for _ in range(n)]

    def body(self) -> dict[str, Any]:
        with self.lock:
            if self.rng.random() < 0.25:
                prompt = self.tokens(self.rng.randrange(160, 200))  # a new prefix: goes to the emptier replica
            else:  # a shared prefix plus at least one new full block
                prompt = self.rng.choice(self.prefixes) + self.tokens(self.rng.randrange(40, 72))
            return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": self.rng.randrange(8, 17),
                    "ignore_eos": True, "stream": self.rng.random() < 0.5}

    def unique(self, n: int, **kw: Any) -> dict[str, Any]:
        with self.lock:
            return {"model": MODEL_NAME, "prompt": self.tokens(n), "max_tokens": 4, "ignore_eos": True, **kw}


class Load:
    """A closed loop of `clients` coroutines on an event loop of its own (a thread), until stop()."""

    def __init__(self, url: str, prompts: Prompts, clients: int = 3) -> None:
        self.url, self.prompts, self.clients = url, prompts, clients
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._ready = threading.Event()
        self._extra: set[asyncio.Task] = set()  # requests submit() started
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=5.0), limits=limits) as client:
            self._client = client
            self._ready.set()
            await asyncio.gather(*(self._worker(i) for i in range(self.clients)))
            while self._extra:
                await asyncio.sleep(0.1)

    async def _worker(self, i: int) -> None:
        while not self._stop.is_set():
            rec: dict[str, Any] = {"kind": "load", "client": i}
            self.records.append(rec)
            await send_one(self._client, self.url, self.prompts.body(), rec)
            if rec["outcome"] == "refused":
                await asyncio.sleep(0.2)  # the router is restarting: do not spin

    def submit(self, body: dict[str, Any], kind: str) -> tuple[dict[str, Any], threading.Event,
                                                                 concurrent.futures.Future]:
        """Send one more request on the load's loop; (its record, set at its first SSE chunk, its future)."""
        rec: dict[str, Any] = {"kind": kind}
        first = threading.Event()
        self.records.append(rec)

        async def go() -> dict[str, Any]:
            task = asyncio.current_task()
            self._extra.add(task)
            try:
                return await send_one(self._client, self.url, body, rec, first)
            finally:
                self._extra.discard(task)

        return rec, first, asyncio.run_coroutine_threadsafe(go(), self._loop)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 30)
        return self.records


# ---------------------------------------------------------------------------------------------- router
class RouterProc:
    """`python -m preble_router.cli ARGV --port P` on a fixed port, so it can be restarted in place."""

    def __init__(self, argv: Sequence[str], log_dir: Path, port: int | None = None) -> None:
        self.argv = list(argv)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.logs: list[Path] = []
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> float:
        """Start and wait for /health; returns the seconds it took."""
        t0 = time.monotonic()
        log = self.log_dir / f"router-{len(_ALL_ROUTER_LOGS) + 1}-{self.port}.log"
        self.logs.append(log)
        _ALL_ROUTER_LOGS.append(log)
        stack = contextlib.ExitStack()
        cmd = [sys.executable, "-m", "preble_router.cli", *self.argv, "--port", str(self.port)]
        stack.enter_context(start_server(cmd, self.url, answers_health, ready_timeout=90, log_path=log))
        self._stack = stack
        return time.monotonic() - t0

    def stop(self) -> float:
        """SIGTERM (in-flight requests drain), SIGKILL after 15 s; returns the seconds it took."""
        t0 = time.monotonic()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return time.monotonic() - t0

    def log_marks(self) -> dict[Path, int]:
        """Where each log ends now (log_tail(since=...) reads only what comes after)."""
        return {log: log.stat().st_size if log.exists() else 0 for log in self.logs}

    def log_tail(self, n: int = 40, grep: Sequence[str] = ("WARNING", "ERROR", "Traceback"),
                 since: dict[Path, int] | None = None) -> list[str]:
        lines: list[str] = []
        for log in self.logs:
            with contextlib.suppress(OSError), open(log, "rb") as f:
                f.seek((since or {}).get(log, 0))
                lines += [f"{log.name}: {x}" for x in f.read().decode(errors="replace").splitlines()
                          if any(g in x for g in grep)]
        return lines[-n:]


_ALL_ROUTER_LOGS: list[Path] = []


def default_router_argv(replicas: Sequence[Replica], model: Path, kv_events: Sequence[str] = ()) -> list[str]:
    """The router as a user starts it: no --policy, default limits; /debug opened and probes twice a second."""
    argv = ["--backends", *[r.url for r in replicas], "--model", str(model), "--health-interval", "0.5",
            "--admin-open"]
    if kv_events:
        argv += ["--kv-events", *kv_events]
    return argv


# ------------------------------------------------------------------------------------------- forwarder
_FORWARDER = """\
import os, sys, threading, time, zmq
launcher = int(sys.argv[3])
def watch():  # die with the benchmark
    while os.getppid() == launcher:
        time.sleep(0.5)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
ctx = zmq.Context()
xsub = ctx.socket(zmq.XSUB); xsub.setsockopt(zmq.RCVHWM, 0); xsub.connect(sys.argv[1])
xpub = ctx.socket(zmq.XPUB); xpub.setsockopt(zmq.SNDHWM, 0); xpub.bind(sys.argv[2])
print("forwarding", sys.argv[1], "->", sys.argv[2], flush=True)
zmq.proxy(xsub, xpub)
"""


class Forwarder:
    """A ZMQ XSUB (connects to the engine's PUB) -> XPUB (binds tcp) process, pausable with SIGSTOP."""

    def __init__(self, upstream: str, log_path: Path) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            cmd = [sys.executable, "-c", _FORWARDER, self.upstream, self.endpoint, str(os.getpid())]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forwarder exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("forwarder did not bind")
            time.sleep(0.1)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# ---------------------------------------------------------------------------------------------- monitor
def backends_view(url: str, timeout: float = 3.0) -> dict[str, dict[str, Any]]:
    return {b["url"]: b for b in httpx.get(url + "/debug/backends", timeout=timeout).json()["backends"]}


class Monitor:
    """Samples /debug/backends four times a second: (t, {url: {healthy, indexed_blocks, index, kv, ...}})."""

    def __init__(self, router: RouterProc, interval: float = 0.25) -> None:
        self.router, self.interval = router, interval
        self.samples: list[tuple[float, dict[str, dict[str, Any]] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                view = {u: {"healthy": b["healthy"], "indexed_blocks": b["indexed_blocks"], "index": b["index"],
                            "kv": (b.get("kv_events") or {}).get("state"),
                            "last_seq": (b.get("kv_events") or {}).get("last_seq"),
                            "resets": (b.get("kv_events") or {}).get("resets"),
                            "silences": (b.get("kv_events") or {}).get("silences"),
                            "replay_ok": (b.get("kv_events") or {}).get("replay_ok"),
                            "in_flight": b["in_flight"]}
                        for u, b in backends_view(self.router.url, timeout=2.0).items()}
            except (httpx.HTTPError, ValueError, KeyError):
                view = None
            self.samples.append((t, view))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def first(self, pred: Callable[[dict[str, dict[str, Any]]], bool], after: float) -> float | None:
        for t, view in list(self.samples):
            if t >= after and view is not None and pred(view):
                return t
        return None


# ---------------------------------------------------------------------------------------------- cluster
class Cluster:
    def __init__(self, model: Path, replicas: list[Replica], log_dir: Path) -> None:
        self.model, self.replicas, self.log_dir = model, replicas, log_dir
        self.prompts = Prompts()
        self.router: RouterProc | None = None
        self.forwarder: Forwarder | None = None

    def by_url(self, url: str) -> Replica:
        return next(r for r in self.replicas if r.url == url)

    def use_router(self, argv: list[str]) -> None:
        """Run the router with these arguments (restarting it if it runs with others)."""
        if self.router is not None and self.router.argv == argv:
            return
        if self.router is not None:
            self.router.stop()
        self.router = RouterProc(argv, self.log_dir)
        self.router.start()

    def settle(self, timeout: float = 120.0) -> None:
        """Every replica up and taken as healthy, and its KV events flowing, before the next fault."""
        for rep in self.replicas:
            if not rep.alive():
                rep.start()
        for rep in self.replicas:
            rep.wait_ready(timeout)
        deadline = time.monotonic() + timeout
        view = None
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                view = backends_view(self.router.url)
                if all(b["healthy"] and (b.get("kv_events") or {}).get("state") == "flowing" for b in view.values()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster did not settle: {view}")
            # A feed turns `flowing` at its first live batch: give both engines something to store.
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(self.router.url + "/v1/completions", json=self.prompts.unique(96), timeout=30)
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- faults
class FaultRun:
    """One fault under load: the shared timeline and bookkeeping."""

    def __init__(self, cluster: Cluster, name: str, duration: float, inject_at: float) -> None:
        self.cluster, self.name, self.duration, self.inject_at = cluster, name, duration, inject_at
        self.checks: dict[str, Any] = {}
        self.notes: list[str] = []
        self.t_inject: float | None = None
        self.t_fault_end: float | None = None
        self.victim: Replica | None = None

    def long_stream(self, load: Load, kind: str) -> tuple[dict[str, Any], concurrent.futures.Future]:
        """A long stream; returns once its first chunk arrived (or it failed)."""
        body = self.cluster.prompts.unique(64, stream=True, max_tokens=LONG_STREAM_TOKENS)
        rec, first, fut = load.submit(body, kind)
        first.wait(60)
        return rec, fut


def _marker(cluster: Cluster, want_backend: str | None = None, tries: int = 8) -> dict[str, Any] | None:
    """Send unique 261-token prompts (8 full blocks) until one lands on want_backend (any if None)."""
    for _ in range(tries):
        body = cluster.prompts.unique(8 * BLOCK + 5)
        r = httpx.post(cluster.router.url + "/v1/completions", json=body, timeout=60)
        if r.status_code == 200 and (want_backend is None or r.headers.get("x-preble-backend") == want_backend):
            return {"body": body, "backend": r.headers.get("x-preble-backend")}
    return None


def _route_view(url: str, body: dict[str, Any]) -> dict[str, int]:
    """Matched tokens per backend for body, from /debug/route (nothing is sent to a backend)."""
    r = httpx.post(url + "/debug/route", json=body, timeout=10)
    return {b["url"]: b["matched_tokens"] for b in r.json()["backends"]}


def _predicted_vs_cached(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    details = (r.json().get("usage") or {}).get("prompt_tokens_details") or {}
    predicted = int(r.headers.get("x-preble-matched-tokens", -1))
    return {"backend": r.headers.get("x-preble-backend"), "predicted": predicted,
            "cached_tokens": details.get("cached_tokens"), "equal": predicted == details.get("cached_tokens")}


def inject_kill(run: FaultRun, load: Load) -> None:
    rec, _ = run.long_stream(load, "long_stream")
    if rec.get("backend") is None or rec.get("outcome") is not None:
        run.notes.append(f"the long stream did not start streaming before the kill: {rec.get('error')}")
    run.victim = run.cluster.by_url(rec.get("backend") or run.cluster.replicas[0].url)
    run.checks["killed_mid_stream"] = rec.get("outcome") is None  # still streaming at the kill
    run.t_inject = time.monotonic()
    run.victim.kill()
    t = time.monotonic()
    run.victim.start()
    run.victim.wait_ready()
    run.t_fault_end = time.monotonic()
    run.checks["replica_restart_s"] = round(run.t_fault_end - t, 1)
    run.checks["long_stream"] = rec  # filled in by the end of the run


def inject_stop(run: FaultRun, load: Load) -> None:
    rec, _ = run.long_stream(load, "long_stream")
    run.victim = run.cluster.by_url(rec.get("backend") or run.cluster.replicas[0].url)
    run.checks["paused_mid_stream"] = rec.get("outcome") is None
    run.t_inject = time.monotonic()
    run.victim.pause()
    try:
        time.sleep(STOP_SECONDS)
    finally:
        run.victim.resume()
    run.t_fault_end = time.monotonic()
    run.checks["long_stream"] = rec


def inject_engine_restart(run: FaultRun, load: Load) -> None:
    cluster = run.cluster
    run.victim = cluster.replicas[1]
    marker = _marker(cluster, run.victim.url)
    before = backends_view(cluster.router.url)[run.victim.url]
    run.checks["before"] = {"indexed_blocks": before["indexed_blocks"], "last_seq": before["kv_events"]["last_seq"],
                            "resets": before["kv_events"]["resets"]}
    run.t_inject = time.monotonic()
    run.victim.stop(grace=10.0)  # SIGTERM: vLLM shuts down gracefully
    run.victim.start()
    run.victim.wait_ready()
    run.t_fault_end = time.monotonic()
    run.checks["replica_restart_s"] = round(run.t_fault_end - run.t_inject, 1)
    run._marker = marker  # checked after the load, once the new engine's events flow


def after_engine_restart(run: FaultRun) -> None:
    url = run.cluster.router.url
    after = backends_view(url)[run.victim.url]
    b = run.checks["before"]
    run.checks["after"] = {"indexed_blocks": after["indexed_blocks"], "last_seq": after["kv_events"]["last_seq"],
                           "resets": after["kv_events"]["resets"], "state": after["kv_events"]["state"]}
    run.checks["index_cleared"] = (after["kv_events"]["resets"] or 0) > (b["resets"] or 0)
    marker = getattr(run, "_marker", None)
    if marker is None:
        run.notes.append("no marker prompt landed on the victim before the restart")
        return
    # Blocks the old engine held must be gone from the index: the new engine's cache is empty.
    run.checks["marker_matched_on_victim_after"] = _route_view(url, marker["body"]).get(run.victim.url)
    run.checks["stale_prefix_forgotten"] = run.checks["marker_matched_on_victim_after"] == 0
    run.checks["repeat"] = _predicted_vs_cached(url, marker["body"])


def inject_router_restart(run: FaultRun, load: Load) -> None:
    cluster = run.cluster
    marker = _marker(cluster)
    run.checks["marker_backend"] = marker and marker["backend"]
    run.t_inject = time.monotonic()
    run.checks["router_stop_s"] = round(cluster.router.stop(), 2)
    run.checks["router_start_s"] = round(cluster.router.start(), 2)
    t_up = time.monotonic()
    run.t_fault_end = t_up
    # Straight away, before anything else asks: what the new index knows (load clients may be sending already,
    # but the marker's prefix only this function ever sends).
    view = backends_view(cluster.router.url)
    run.checks["indexed_blocks_at_start"] = {u: b["indexed_blocks"] for u, b in view.items()}
    run.checks["feeds_at_start"] = {u: (b["kv_events"] or {}).get("state") for u, b in view.items()}
    if marker is not None:
        run.checks["marker_matched_after_restart"] = _route_view(cluster.router.url, marker["body"])
        deadline = time.monotonic() + 10
        while (run.checks["marker_matched_after_restart"].get(marker["backend"], 0) == 0
               and time.monotonic() < deadline):  # the replay may still be applying
            time.sleep(0.2)
            run.checks["marker_matched_after_restart"] = _route_view(cluster.router.url, marker["body"])
        run.checks["index_rebuilt_s"] = round(time.monotonic() - t_up, 2)
        run.checks["repeat"] = _predicted_vs_cached(cluster.router.url, marker["body"])
        run.checks["index_rebuilt"] = (run.checks["marker_matched_after_restart"].get(marker["backend"], 0) > 0
                                       and run.checks["repeat"]["equal"])


def setup_feed_drop(run: FaultRun) -> None:
    cluster = run.cluster
    run.victim = cluster.replicas[0]
    fwd = Forwarder(run.victim.kv_endpoint, cluster.log_dir / "forwarder.log")
    fwd.start()
    cluster.forwarder = fwd
    # The victim's events through the forwarder (its replay socket directly); the others as by default.
    cluster.use_router(default_router_argv(cluster.replicas, cluster.model,
                                           ["auto", f"{run.victim.url}={fwd.endpoint}|{run.victim.replay_endpoint}"]))
    cluster.settle()


def inject_feed_drop(run: FaultRun, load: Load) -> None:
    fwd = run.cluster.forwarder
    run.t_inject = time.monotonic()
    fwd.pause()
    try:
        time.sleep(FEED_DROP_SECONDS)
    finally:
        fwd.resume()
    run.t_fault_end = time.monotonic()


def teardown_feed_drop(run: FaultRun, more_faults: bool) -> None:
    cluster = run.cluster
    if more_faults:
        cluster.use_router(default_router_argv(cluster.replicas, cluster.model))
    if cluster.forwarder is not None and more_faults:
        cluster.forwarder.stop()
        cluster.forwarder = None


INJECT = {"kill": inject_kill, "stop": inject_stop, "engine_restart": inject_engine_restart,
          "router_restart": inject_router_restart, "feed_drop": inject_feed_drop}


def run_fault(cluster: Cluster, name: str, *, duration: float, inject_at: float = 5.0, clients: int = 3,
              more_faults: bool = False, recover_cap: float = 120.0) -> dict[str, Any]:
    run = FaultRun(cluster, name, duration, inject_at)
    if name == "feed_drop":
        setup_feed_drop(run)
    else:
        cluster.use_router(default_router_argv(cluster.replicas, cluster.model))
        cluster.settle()
    router = cluster.router
    marks = router.log_marks()
    monitor = Monitor(router).start()
    load = Load(router.url, cluster.prompts, clients).start()
    t0 = time.monotonic()
    error: str | None = None
    try:
        time.sleep(max(0.0, t0 + inject_at - time.monotonic()))
        INJECT[name](run, load)
        # Keep the load on for `duration`, and on until recovered (at most recover_cap more seconds).
        while time.monotonic() - t0 < duration or (
                _recovered_at(run, load.records, monitor) is None and time.monotonic() - t0 < duration + recover_cap):
            time.sleep(0.25)
    except Exception as exc:  # report the fault as broken, still account for the requests
        error = f"{type(exc).__name__}: {exc}"
    finally:
        records = load.stop()
        monitor.stop()
    recovered_at = _recovered_at(run, records, monitor)
    if name == "engine_restart" and error is None:
        after_engine_restart(run)
    if name == "feed_drop":
        _feed_checks(run, records, monitor)
        teardown_feed_drop(run, more_faults)
    result = _summarize(run, records, t0, recovered_at)
    result["error"] = error
    result["router_log"] = [str(p) for p in router.logs]
    result["router_warnings"] = router.log_tail(since=marks)
    result["timeline"] = [(round(t - t0, 2), v) for t, v in monitor.samples]
    return result


def _recovered_at(run: FaultRun, records: list[dict[str, Any]], monitor: Monitor) -> float | None:
    """When requests sent after the fault began had succeeded on every replica (feed_drop: the feed flowed)."""
    if run.t_inject is None or run.t_fault_end is None:
        return None
    if run.name == "feed_drop":
        return _flowing_for_good(monitor, run.victim.url, run.t_inject)[1]
    firsts = []
    for rep in run.cluster.replicas:
        ends = [r["end"] for r in list(records) if r.get("outcome") == "ok" and r.get("backend") == rep.url
                and r.get("start", 0.0) >= run.t_inject]
        if not ends:
            return None
        firsts.append(min(ends))
    return max(firsts)


def _flowing_for_good(monitor: Monitor, url: str, after: float) -> tuple[float | None, float | None]:
    """(first sample showing the feed silent after `after`, the sample from which it stays flowing to the end)."""
    samples = [(t, v[url]) for t, v in list(monitor.samples) if t >= after and v is not None]
    t_silent = next((t for t, b in samples if b["kv"] == "silent"), None)
    if t_silent is None:
        return None, None
    t_flowing = None
    for t, b in samples:
        if t <= t_silent:
            continue
        if b["kv"] == "flowing":
            t_flowing = t if t_flowing is None else t_flowing
        else:
            t_flowing = None
    return t_silent, t_flowing


def _feed_checks(run: FaultRun, records: list[dict[str, Any]], monitor: Monitor) -> None:
    v = run.victim.url
    t_silent, t_flowing = _flowing_for_good(monitor, v, run.t_inject)
    run.checks["went_silent"] = t_silent is not None
    run.checks["flowing_again"] = t_flowing is not None
    run.checks["silent_after_s"] = None if t_silent is None else round(t_silent - run.t_inject, 2)
    run.checks["flowing_after_resume_s"] = None if t_flowing is None else round(t_flowing - run.t_fault_end, 2)
    during = [view[v] for t, view in monitor.samples if view and t_silent and t_silent <= t < (t_flowing or 1e18)
              and view[v]["kv"] == "silent"]
    run.checks["estimated_while_silent"] = bool(during) and all(x["index"] == "estimated" for x in during)
    views = [view[v] for _, view in monitor.samples if view]
    run.checks["events_index_after"] = bool(views) and views[-1]["index"] == "events"
    # The router's own count of silent episodes in this fault (1 expected), and whether its last replay answered.
    run.checks["silent_episodes"] = (views[-1]["silences"] or 0) - (views[0]["silences"] or 0) if views else None
    run.checks["last_replay_ok"] = views[-1]["replay_ok"] if views else None
    run.checks["ok_on_victim_while_silent"] = sum(
        1 for r in records if r.get("outcome") == "ok" and r.get("backend") == v and t_silent
        and t_silent <= r["start"] < (t_flowing or 1e18))


def _summarize(run: FaultRun, records: list[dict[str, Any]], t0: float, recovered_at: float | None) -> dict[str, Any]:
    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    count = {k: sum(1 for r in records if r.get("outcome") == k) for k in ("ok", "clear_error", "refused", "lost")}
    unfinished = sum(1 for r in records if r.get("outcome") is None)
    lost = [r for r in records if r.get("outcome") in ("lost", None)]
    checks = dict(run.checks)
    if isinstance(checks.get("long_stream"), dict):
        ls = checks.pop("long_stream")
        checks["long_stream_outcome"] = ls.get("outcome")
        checks["long_stream_error"] = ls.get("error")
    return {
        "fault": run.name,
        "victim": run.victim.url if run.victim else None,
        "sent": len(records),
        "succeeded": count["ok"],
        "retried": sum(1 for r in records if (r.get("attempts") or 0) > 1),
        "failed_clear": count["clear_error"],
        "refused": count["refused"],
        "lost": count["lost"] + unfinished,
        "recover_s": None if recovered_at is None else round(recovered_at - run.t_inject, 2),
        # the router's share: from the end of the fault (replica ready again, SIGCONT, router up) to recovered
        "after_fault_end_s": None if recovered_at is None or run.t_fault_end is None
        else round(recovered_at - run.t_fault_end, 2),
        "inject_at_s": rel(run.t_inject),
        "fault_end_s": rel(run.t_fault_end),
        "checks": checks,
        "notes": run.notes,
        "lost_requests": [{k: (rel(v) if k in ("start", "end") else v) for k, v in r.items()} for r in lost],
        "records": [{k: (rel(v) if k in ("start", "end") else v) for k, v in r.items()} for r in records],
    }


# ---------------------------------------------------------------------------------------------- driver
def run_chaos(model: Path, faults: Sequence[str] = FAULTS, *, duration: float = 35.0, inject_at: float = 5.0,
              clients: int = 3, log_dir: Path | None = None, recover_cap: float = 120.0) -> dict[str, Any]:
    log_dir = Path(log_dir or ROOT / "runs" / "chaos-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    out: dict[str, Any] = {"duration_per_fault_s": duration, "inject_at_s": inject_at, "clients": clients,
                           "log_dir": str(log_dir), "faults": []}
    with start_replicas(model, 2, block_size=BLOCK, log_dir=log_dir) as replicas:
        out["replica_startup_s"] = [round(r.startup_s or 0, 1) for r in replicas]
        cluster = Cluster(model, replicas, log_dir)
        try:
            for i, name in enumerate(faults):
                print(f"[chaos] {name} ...", file=sys.stderr, flush=True)
                res = run_fault(cluster, name, duration=duration, inject_at=inject_at, clients=clients,
                                more_faults=i < len(faults) - 1, recover_cap=recover_cap)
                print(f"[chaos] {name}: sent {res['sent']} ok {res['succeeded']} lost {res['lost']} "
                      f"recover {res['recover_s']} s", file=sys.stderr, flush=True)
                out["faults"].append(res)
        finally:
            if cluster.router is not None:
                cluster.router.stop()
            if cluster.forwarder is not None:
                cluster.forwarder.stop()
        out["replica_logs"] = [str(r.log_path) for r in replicas]
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    return out


def print_table(result: dict[str, Any]) -> None:
    headers = ["fault", "sent", "ok", "retried", "clear err", "refused", "lost", "recover s", "after end s",
               "checks"]
    rows = []
    for f in result["faults"]:
        c = f["checks"]
        shown = {k: v for k, v in c.items() if isinstance(v, (bool, int, float, str)) or v is None}
        rows.append([f["fault"], str(f["sent"]), str(f["succeeded"]), str(f["retried"]), str(f["failed_clear"]),
                     str(f["refused"]), str(f["lost"]), "-" if f["recover_s"] is None else f"{f['recover_s']:.1f}",
                     "-" if f["after_fault_end_s"] is None else f"{f['after_fault_end_s']:.1f}",
                     ", ".join(f"{k}={v}" for k, v in shown.items()) + (f" ERROR {f['error']}" if f["error"] else "")])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print("\t".join(headers))
        for r in rows:
            print("\t".join(r))
        return
    t = Table(title=f"chaos: {result['clients']} clients, {result['duration_per_fault_s']:g} s per fault")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i in (0, len(headers) - 1) else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(200, console.width))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    ap.add_argument("--duration", type=float, default=35.0, help="seconds of load per fault (longer until recovered)")
    ap.add_argument("--inject-at", type=float, default=5.0, help="seconds into each fault's load")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--out", default="runs/chaos.json")
    ap.add_argument("--log-dir", default=None, help="replica, router and forwarder logs (default: runs/chaos-logs)")
    args = ap.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults: {', '.join(sorted(unknown))}")
    model = build_tiny_model(ROOT / ".cache" / "models" / "tiny", size="tiny")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # teardown runs
    result = run_chaos(model, faults, duration=args.duration, inject_at=args.inject_at, clients=args.clients,
                       log_dir=Path(args.log_dir) if args.log_dir else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"wall {result['wall_s']} s; written to {out}")
    bad = [f["fault"] for f in result["faults"] if f["lost"] or f["error"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
