"""Router overhead benchmark: latency, throughput and memory of a router in front of two FAKE backends.

    python -m benchmarks.overhead [--duration 30] [--concurrency 32] [--routers ours,smg,vllm-router]
                                  [--out runs/overhead.json] [--bin-dir DIR] [--client httpx|raw]

    # cleanest per-request overhead: one client (no queueing) and a cheap load generator
    python -m benchmarks.overhead --concurrency 1,32 --client raw --bin-dir /tmp/bench-venv/bin

    # each router 3 times, in alternating order: medians, and ours against smg round by round
    python -m benchmarks.overhead --concurrency 1,32 --client raw --routers ours,smg --rounds 3

    # ours with one worker process and with two (`preble-router --workers 2`), side by side with smg
    python -m benchmarks.overhead --concurrency 32 --client raw --routers ours,ours-w2,smg

Peers: `pip install sglang-router vllm-router` (anywhere; point --bin-dir at that venv's bin/). A router
whose binary is missing is skipped with a message. `ours` is `preble-router` on PATH / beside
sys.executable, else `python -c "from preble_router.cli import main; main()"` from this checkout.

What it does:

1. Starts two fake vLLM backends (``testkit/fake_backend.py``, separate processes, free ports). They
   answer in microseconds, so whatever latency a router adds is visible.
2. Baseline: drives the two fakes directly (requests alternate between them), with the same load.
3. For each router (``ours`` = preble-router, ``smg`` = SGLang's Rust router, ``vllm-router``): starts it
   as a subprocess in front of the two fakes with policy ``cache_aware``, waits until requests through it
   reach both fakes, warms up, then runs a closed loop of ``concurrency`` async httpx clients for
   ``duration`` seconds: POST /v1/completions, ~3000-word prompt (text of /usr/share/common-licenses/*:
   a few shared prefixes of ~2500 words with varied ~500-word suffixes), max_tokens 8, non-streaming.
   The router's RSS (with its children) is sampled every second; CPU seconds are recorded too.
4. Runs the direct baseline again at the end (machine drift check), prints a table, writes JSON.
   Columns: req/s, p50/p99/mean latency, +ms over direct, errors, router RSS start/end/max, router CPU
   ms per request, per-backend split, and prefix affinity (share of each prefix group's requests that
   went to that group's most-used backend: ~0.5 for round robin over two backends, 1.0 = sticky).

Router overhead = latency through the router - direct latency (mean of the two baseline runs).
Everything (load generator, fakes, router) shares this machine's cores, so compare routers within one
run; absolute numbers move between machines. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from testkit.ports import free_port

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ALL_ROUTERS = ("ours", "smg", "vllm-router")
# Where each router's binary comes from (for the version line in the report).
ROUTER_DISTS = {"ours": "preble-router", "smg": "sglang-router", "vllm-router": "vllm-router"}
ROUTER_BINARIES = {"ours": "preble-router", "smg": "smg", "vllm-router": "vllm-router"}


# ---------------------------------------------------------------------------------------------- utils


def find_binary(name: str, extra_dirs: list[str] | None = None) -> str | None:
    """On PATH, next to sys.executable, or in one of extra_dirs."""
    for d in extra_dirs or []:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    p = Path(sys.executable).parent / name
    if p.is_file() and os.access(p, os.X_OK):
        return str(p)
    return None


def dist_version(binary: str | None, dist: str) -> str | None:
    """Version of `dist` in the environment that owns `binary` (its shebang python), else in ours."""
    pythons = []
    if binary:
        try:
            with open(binary, "rb") as f:
                first = f.readline().decode(errors="replace").strip()
            if first.startswith("#!") and "python" in first:
                pythons.append(first[2:].split()[0])
        except OSError:
            pass
    pythons.append(sys.executable)
    for py in pythons:
        try:
            out = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                                 capture_output=True, text=True, timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


class ProcStats:
    """RSS (bytes, process + descendants) and CPU seconds of a process: psutil, else /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            import psutil

            self._ps = psutil.Process(pid)
        except Exception:  # noqa: BLE001 - psutil missing or process gone
            self._ps = None
        self._tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _pids(self) -> list[int]:
        if self._ps is not None:
            try:
                return [self.pid] + [c.pid for c in self._ps.children(recursive=True)]
            except Exception:  # noqa: BLE001
                return [self.pid]
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            for task in glob.glob(f"/proc/{p}/task/*/children"):
                try:
                    todo.extend(int(x) for x in Path(task).read_text().split())
                except (OSError, ValueError):
                    pass
        return out

    def rss(self) -> int | None:
        total, ok = 0, False
        for p in self._pids():
            try:
                if self._ps is not None:
                    import psutil

                    total += psutil.Process(p).memory_info().rss
                else:
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                            break
                ok = True
            except Exception:  # noqa: BLE001 - raced with exit
                continue
        return total if ok else None

    def cpu_seconds(self) -> float | None:
        total, ok = 0.0, False
        for p in self._pids():
            try:
                if self._ps is not None:
                    import psutil

                    t = psutil.Process(p).cpu_times()
                    total += t.user + t.system
                else:
                    fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / self._tck
                ok = True
            except Exception:  # noqa: BLE001
                continue
        return total if ok else None


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a background thread."""

    def __init__(self, stats: ProcStats, interval: float = 1.0):
        self.stats, self.interval = stats, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._th = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.stats.rss()
            if r is not None:
                self.samples.append((round(time.monotonic() - self._t0, 2), r))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join(5)
        r = self.stats.rss()
        if r is not None:
            self.samples.append((round(time.monotonic() - self._t0, 2), r))


# ---------------------------------------------------------------------------------------------- workload


def _license_words() -> list[str]:
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    words: list[str] = []
    for f in files:
        try:
            words.extend(Path(f).read_text(errors="replace").split())
        except OSError:
            continue
    if len(words) < 10_000:  # machines without common-licenses: fall back to the stdlib's docs
        import sysconfig

        for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:100]:
            words.extend(Path(f).read_text(errors="replace").split())
    return words


@dataclass
class Workload:
    bodies: list[bytes]
    prefix_of: list[int]  # prefix group of each body
    prompt_words: int
    num_prefixes: int


def build_workload(model: str, n_bodies: int = 256, num_prefixes: int = 4, prefix_words: int = 2500,
                   suffix_words: int = 500, max_tokens: int = 8, seed: int = 0) -> Workload:
    """Pre-serialized request bodies: `num_prefixes` shared prefixes, each body a varied suffix."""
    rng = random.Random(seed)
    words = _license_words()
    n = len(words)
    prefixes = []
    for i in range(num_prefixes):
        start = (i * n // num_prefixes) % max(1, n - prefix_words)
        pre = words[start:start + prefix_words]
        while len(pre) < prefix_words:
            pre += words[: prefix_words - len(pre)]
        # A distinct header so prefixes never share leading text even if the corpus repeats.
        prefixes.append(f"System prompt {i}: " + " ".join(pre))
    bodies, prefix_of = [], []
    for j in range(n_bodies):
        g = j % num_prefixes
        s = rng.randrange(0, max(1, n - suffix_words))
        suffix = " ".join(words[s:s + suffix_words])
        prompt = f"{prefixes[g]}\n\nRequest {j}: {suffix}"
        bodies.append(json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                  "temperature": 0.0, "stream": False}).encode())
        prefix_of.append(g)
    return Workload(bodies, prefix_of, prefix_words + suffix_words + 4, num_prefixes)


PROMPT_MODES = ("hot", "unique", "novel", "shared")


def build_hot_workload(model: str, prompt_words: int = 3000, max_tokens: int = 8) -> Workload:
    """One prompt for every request: the router has seen it after the first request (its cost as windows fill)."""
    words = _license_words()
    prompt = "Hot prompt: " + " ".join((words * (1 + prompt_words // max(1, len(words))))[:prompt_words])
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": False}).encode()
    return Workload([body], [0], prompt_words, 1)


@dataclass
class UniqueBodies:
    """A prompt no router has seen before for every request: ~prompt_words of corpus text (one of a few dozen
    passages) behind a marker with the request's number, so every block key is new (keys chain from the first
    token) while the text after the marker recurs, as a template's or a document's would (a tokenizer's chunk
    cache still applies). `novel`: a marker between every ~100 words too, so no tokenizer chunk recurs either
    (text never seen anywhere: the worst case, dominated by tokenization). Built by joining bytes."""

    variants: list[list[bytes]]  # per variant: the JSON body split where the markers go
    prompt_words: int

    def body(self, i: int) -> bytes:
        parts = self.variants[i % len(self.variants)]
        marker = b" r%dq" % i
        return marker.join(parts)


def build_unique_bodies(model: str, prompt_words: int = 3000, max_tokens: int = 8, variants: int = 64,
                        seed: int = 0, novel: bool = False) -> UniqueBodies:
    rng = random.Random(seed)
    words = _license_words()
    n = len(words)
    out = []
    for _ in range(variants):
        start = rng.randrange(0, max(1, n - prompt_words))
        text = words[start:start + prompt_words]
        pieces = [" ".join(text[j:j + 100]) for j in range(0, len(text), 100)]
        sep = "\u0000SPLIT\u0000"
        text = sep.join(pieces) if novel else " ".join(pieces)
        body = json.dumps({"model": model, "prompt": "Unique:" + sep + text, "max_tokens": max_tokens,
                           "temperature": 0.0, "stream": False}).encode()
        out.append(body.split(json.dumps(sep)[1:-1].encode()))
    return UniqueBodies(out, prompt_words)


# ---------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    backend_counts: dict[str, int] = field(default_factory=dict)
    prefix_backend: dict[int, dict[str, int]] = field(default_factory=dict)
    elapsed: float = 0.0
    loadgen_cpu_s: float = 0.0
    done_at: list[float] = field(default_factory=list)  # seconds from the start, per latency


class RawHttpConn:
    """Minimal HTTP/1.1 keep-alive POST client on asyncio streams (``--client raw``).

    About 10x less CPU per request than httpx, so on a small machine the load generator steals less CPU
    from the router under test. Handles Content-Length and chunked bodies; reconnects after errors.
    """

    def __init__(self, url: str):
        u = httpx.URL(url)
        self.host, self.port, self.path = u.host, u.port or 80, u.raw_path.decode() or "/"
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None
        self._head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                      f"Content-Type: application/json\r\nAccept: */*\r\n").encode()

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            try:
                await self._w.wait_closed()
            except Exception:  # noqa: BLE001
                pass
        self._r = self._w = None

    async def post(self, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self._w is None:
            self._r, self._w = await asyncio.open_connection(self.host, self.port)
        r, w = self._r, self._w
        try:
            w.write(self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            head = await r.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            hdrs = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
            if b"content-length" in hdrs:
                data = await r.readexactly(int(hdrs[b"content-length"]))
            elif hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
                parts = []
                while True:
                    size = int((await r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await r.readuntil(b"\r\n")  # no trailers expected
                        break
                    parts.append(await r.readexactly(size))
                    await r.readexactly(2)
                data = b"".join(parts)
            else:  # read to EOF
                data = await r.read()
                await self.close()
            if hdrs.get(b"connection", b"").lower() == b"close":
                await self.close()
            return status, hdrs, data
        except BaseException:
            await self.close()
            raise


async def closed_loop(urls: list[str], wl: Workload | UniqueBodies, concurrency: int, duration: float,
                      client: str = "httpx", timeout: float = 60.0, seed: int = 1) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as the last one answers.

    Request i goes to urls[i % len(urls)] (direct baseline: alternate between backends) with a body
    drawn at random from the workload, so prefix groups are spread over the backends in the baseline
    (UniqueBodies: body i, never seen before, in its own group).
    """
    res = LoadResult()
    counter = itertools.count()
    rng = random.Random(seed)
    unique = isinstance(wl, UniqueBodies)
    order = [0] if unique else [rng.randrange(len(wl.bodies)) for _ in range(4096)]
    headers = {"content-type": "application/json"}
    start = time.perf_counter()
    end = start + duration

    def body_of(i: int, k: int) -> bytes:
        return wl.body(i) if unique else wl.bodies[k]

    def record(k: int, dt: float, backend: str) -> None:
        res.done_at.append(time.perf_counter() - start)
        res.latencies.append(dt)
        res.backend_counts[backend] = res.backend_counts.get(backend, 0) + 1
        pb = res.prefix_backend.setdefault(-1 if unique else wl.prefix_of[k], {})
        pb[backend] = pb.get(backend, 0) + 1

    def fail(msg: str) -> None:
        res.errors += 1
        if len(res.error_samples) < 5:
            res.error_samples.append(msg)

    async def httpx_worker() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as c:
            while time.perf_counter() < end:
                i = next(counter)
                k = order[i % len(order)]
                t0 = time.perf_counter()
                try:
                    r = await c.post(urls[i % len(urls)], content=body_of(i, k), headers=headers)
                except httpx.HTTPError as e:
                    fail(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.01)
                    continue
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    fail(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                record(k, dt, r.headers.get("x-fake-backend", "?"))

    async def raw_worker() -> None:
        conns = [RawHttpConn(u) for u in urls]
        try:
            while time.perf_counter() < end:
                i = next(counter)
                k = order[i % len(order)]
                conn = conns[i % len(urls)]
                t0 = time.perf_counter()
                try:
                    status, hdrs, data = await asyncio.wait_for(conn.post(body_of(i, k)), timeout)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                        TimeoutError) as e:
                    fail(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.01)
                    continue
                dt = time.perf_counter() - t0
                if status != 200:
                    fail(f"HTTP {status}: {data[:200]!r}")
                    continue
                record(k, dt, hdrs.get(b"x-fake-backend", b"?").decode())
        finally:
            for c in conns:
                await c.close()

    worker = raw_worker if client == "raw" else httpx_worker
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res.loadgen_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return res


def run_load(urls: list[str], wl: Workload | UniqueBodies, concurrency: int, duration: float,
             client: str = "httpx") -> LoadResult:
    coro = closed_loop(urls, wl, concurrency, duration, client)
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return asyncio.run(coro)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[i]


def segments(res: LoadResult, seconds: float) -> list[dict[str, Any]]:
    """req/s and p50 in successive `seconds` of the measurement: does throughput hold as the router's windows
    fill? (A last, partial segment shorter than half of `seconds` is left out.)"""
    if seconds <= 0 or not res.done_at:
        return []
    buckets: dict[int, list[float]] = {}
    for t, dt in zip(res.done_at, res.latencies):
        buckets.setdefault(int(t // seconds), []).append(dt)
    out = []
    for k in sorted(buckets):
        span = min(seconds, res.elapsed - k * seconds)
        if span < seconds / 2:
            continue
        lat = buckets[k]
        out.append({"segment": k, "rps": round(len(lat) / span, 2), "p50_ms": round(pct(lat, 50) * 1e3, 3)})
    return out


def summarize(res: LoadResult, segment_s: float = 0.0) -> dict[str, Any]:
    lat = res.latencies
    n = len(lat)
    # Prefix affinity: share of each prefix group's requests that went to its most-used backend.
    aff_hits = sum(max(d.values()) for d in res.prefix_backend.values())
    aff_total = sum(sum(d.values()) for d in res.prefix_backend.values())
    return {
        "requests": n,
        "errors": res.errors,
        "error_samples": res.error_samples,
        "elapsed_s": round(res.elapsed, 3),
        "loadgen_cpu_ms_per_req": round(res.loadgen_cpu_s * 1e3 / n, 3) if n else None,
        "rps": round(n / res.elapsed, 2) if res.elapsed > 0 else 0.0,
        "p50_ms": round(pct(lat, 50) * 1e3, 3) if n else None,
        "p90_ms": round(pct(lat, 90) * 1e3, 3) if n else None,
        "p99_ms": round(pct(lat, 99) * 1e3, 3) if n else None,
        "mean_ms": round(statistics.fmean(lat) * 1e3, 3) if n else None,
        "max_ms": round(max(lat) * 1e3, 3) if n else None,
        "backend_counts": res.backend_counts,
        "prefix_affinity": round(aff_hits / aff_total, 3) if aff_total else None,
        "prefix_backend": {str(k): v for k, v in sorted(res.prefix_backend.items())},
        "segments": segments(res, segment_s),
    }


# ---------------------------------------------------------------------------------------------- processes


class Proc:
    """A subprocess in its own session (so its whole group can be stopped), logging to a file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.p = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=str(REPO), env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, signal.SIGTERM)  # the group this Popen created
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._log.close()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)  # everything here is on 127.0.0.1
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def wait_http(url: str, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log_tail()}")
        try:
            r = httpx.get(url, timeout=2.0, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}"
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})")


def wait_routes_to_both(router_url: str, model: str, backends: set[str], timeout: float,
                        proc: Proc, max_ok: int = 20) -> dict[str, int]:
    """Ready = completions through the router succeed (and, ideally, have reached every backend).

    Stops at the first moment every backend has answered, or after `max_ok` successful probes: a
    cache-aware router may legitimately send all the (similar) probes to one backend.
    """
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    i = 0
    last = ""
    rnd = random.Random(7)
    with httpx.Client(timeout=10.0, trust_env=False) as c:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log_tail()}")
            i += 1
            words = " ".join(str(rnd.random()) for _ in range(16))  # distinct from the first character on
            body = {"model": model, "prompt": f"{words} readiness probe {i}", "max_tokens": 1}
            try:
                r = c.post(router_url + "/v1/completions", json=body)
                if r.status_code == 200:
                    b = r.headers.get("x-fake-backend", "?")
                    seen[b] = seen.get(b, 0) + 1
                    if backends <= set(seen) or sum(seen.values()) >= max_ok:
                        return seen
                else:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.05 if seen else 0.3)
    raise TimeoutError(f"{proc.name} not routing after {timeout}s (last: {last})\n{proc.log_tail()}")


# ---------------------------------------------------------------------------------------------- routers


def _tokenizer_only_dir(out_dir: Path) -> Path:
    """Stop-gap when the tiny model can't be built (no torch): train a BPE tokenizer only."""
    from transformers import PreTrainedTokenizerFast

    try:
        from testkit.tiny_model import CHAT_TEMPLATE, _train_tokenizer  # type: ignore

        tk = _train_tokenizer(1024)
        template = CHAT_TEMPLATE
    except ImportError:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tk.train(sorted(glob.glob("/usr/share/common-licenses/*")), trainer)
        template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] "
                    "+ eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
                    "{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  model_max_length=8192, chat_template=template)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    cfg = out_dir / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                   "vocab_size": 1024, "max_position_embeddings": 8192}, indent=1))
    return out_dir


def make_model_dir(out_dir: Path) -> Path:
    """A tokenizer dir for `preble-router --model`: the tiny model if it can be built, else tokenizer only."""
    try:
        from testkit.tiny_model import build_tiny_model

        return Path(build_tiny_model(out_dir, "tiny"))
    except ImportError as e:  # tiny_model or torch missing
        print(f"  (tiny model unavailable: {e}; building a tokenizer-only dir)")
        return _tokenizer_only_dir(out_dir)


@dataclass
class RouterSpec:
    name: str
    binary: str | None
    build: Callable[[int, list[str], str], list[str]] | None  # (port, backends, model_dir) -> argv
    skip_reason: str | None = None


def router_specs(bin_dirs: list[str]) -> dict[str, RouterSpec]:
    specs: dict[str, RouterSpec] = {}

    ours = find_binary("preble-router", bin_dirs)
    ours_prefix: list[str] | None = [ours] if ours else None
    if ours_prefix is None:
        import importlib.util

        try:
            if importlib.util.find_spec("preble_router.cli") is not None:
                ours_prefix = [sys.executable, "-c",
                               "import sys; from preble_router.cli import main; sys.exit(main())"]
        except ImportError:
            pass
    specs["ours"] = RouterSpec(
        "ours", ours or (ours_prefix and "python -c preble_router.cli.main"),
        # As the README starts it: the default policy and flags (ours:POLICY adds --policy POLICY).
        (lambda port, be, model: [*ours_prefix, "--backends", *be, "--model", model,
                                  "--host", HOST, "--port", str(port), "--log-level", "warning"])
        if ours_prefix else None,
        None if ours_prefix else "preble-router not found (not on PATH, not beside sys.executable, "
                                 "no preble_router.cli)")

    smg = find_binary("smg", bin_dirs)
    specs["smg"] = RouterSpec(
        "smg", smg,
        (lambda port, be, model: [smg, "launch", "--host", HOST, "--port", str(port), "--worker-urls", *be,
                                  "--policy", "cache_aware", "--prometheus-host", HOST,
                                  "--prometheus-port", str(free_port()), "--log-level", "warn"]) if smg else None,
        None if smg else "smg not found (pip install sglang-router)")

    vr = find_binary("vllm-router", bin_dirs)
    specs["vllm-router"] = RouterSpec(
        "vllm-router", vr,
        (lambda port, be, model: [vr, "--host", HOST, "--port", str(port), "--worker-urls", *be,
                                  "--policy", "cache_aware", "--prometheus-host", HOST,
                                  "--prometheus-port", str(free_port()), "--log-level", "warning"]) if vr else None,
        None if vr else "vllm-router not found (pip install vllm-router)")
    return specs


def _ours_variant(name: str) -> tuple[str | None, int] | None:
    """`ours[:POLICY][-wN]` -> (POLICY or None for the default, N worker processes); None for other names."""
    base, _, n = name.partition("-w")
    if n and not (n.isdigit() and int(n) >= 1):
        return None
    head, _, policy = base.partition(":")
    if head != "ours":
        return None
    return (policy or None), int(n) if n else 1


def _ours_with(ours: RouterSpec, name: str, policy: str | None, workers: int) -> RouterSpec:
    build = ours.build
    extra = (["--policy", policy] if policy else []) + (["--workers", str(workers)] if workers > 1 else [])
    return RouterSpec(name, ours.binary,
                      (lambda port, be, model: [*build(port, be, model), *extra]) if build else None,
                      ours.skip_reason)


def default_routers() -> list[str]:
    """Ours with every policy, the default first (no --policy flag), then the peers."""
    from preble_router.cli import build_parser
    from preble_router.policies import POLICIES

    default = build_parser().get_default("policy")
    return ["ours", *(f"ours:{p}" for p in sorted(POLICIES) if p != default), "smg", "vllm-router"]


# ---------------------------------------------------------------------------------------------- report


def summarize_rounds(results: list[dict[str, Any]], routers: list[str], levels: list[int],
                     mode: str = "") -> dict[str, Any]:
    """Medians over rounds, and each router's req/s and p50 against smg's in the same round (measured minutes
    apart, so a slow phase of the machine hits both less than it hits a single run): printed and returned.

    Per segment too: each of a router's segments against the median segment of smg's run in the same round (does
    it hold up as its windows fill?), and its last segment against its first."""
    def runs(name: str, conc: int) -> dict[int, dict[str, Any]]:
        return {r["round"]: r["metrics"] for r in results if r.get("target") == name and not r.get("skipped")
                and r.get("concurrency") == conc and r["metrics"].get("rps")}

    summary: dict[str, Any] = {}
    print(f"\n[{mode}] medians over rounds (and against smg, round by round):")
    for conc in levels:
        smg = runs("smg", conc)
        for name in routers:
            mine = runs(name, conc)
            if not mine:
                continue
            cpu = [r["router_cpu_ms_per_req"] for r in results if r.get("target") == name
                   and r.get("concurrency") == conc and r.get("router_cpu_ms_per_req") is not None]
            row: dict[str, Any] = {"rps": statistics.median(m["rps"] for m in mine.values()),
                                   "p50_ms": statistics.median(m["p50_ms"] for m in mine.values()),
                                   "cpu_ms_per_req": statistics.median(cpu) if cpu else None}
            line = f"  {name} @{conc}: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.2f} ms"
            segs = {k: m.get("segments") or [] for k, m in mine.items()}
            holds = [round(g[-1]["rps"] / g[0]["rps"], 3) for g in segs.values() if len(g) > 1 and g[0]["rps"]]
            if holds:
                row["last_vs_first_segment"] = holds
                line += f"; last/first segment {holds}"
            paired = sorted(set(mine) & set(smg))
            if name != "smg" and paired:
                row["rps_vs_smg"] = [round(mine[k]["rps"] / smg[k]["rps"], 3) for k in paired]
                row["p50_vs_smg"] = [round(mine[k]["p50_ms"] / smg[k]["p50_ms"], 3) for k in paired]
                line += (f"; vs smg: req/s {statistics.median(row['rps_vs_smg']):.2f}x (rounds {row['rps_vs_smg']}), "
                         f"p50 {statistics.median(row['p50_vs_smg']):.2f}x (rounds {row['p50_vs_smg']})")
                seg_rps, seg_p50 = [], []
                for k in paired:
                    ref = smg[k].get("segments") or []
                    if not ref or not segs[k]:
                        continue
                    ref_rps = statistics.median(g["rps"] for g in ref)
                    ref_p50 = statistics.median(g["p50_ms"] for g in ref)
                    seg_rps.append([round(g["rps"] / ref_rps, 3) for g in segs[k]])
                    seg_p50.append([round(g["p50_ms"] / ref_p50, 3) for g in segs[k]])
                if seg_rps:
                    row["segment_rps_vs_smg"], row["segment_p50_vs_smg"] = seg_rps, seg_p50
                    worst_rps = min(min(x) for x in seg_rps)
                    worst_p50 = max(max(x) for x in seg_p50)
                    line += f"; every segment: req/s >= {worst_rps:.2f}x smg, p50 <= {worst_p50:.2f}x"
            print(line)
            summary[f"{name}@{conc}"] = row
    return summary


def _mb(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["target", "conc", "req/s", "p50 ms", "p99 ms", "mean ms", "+p50 ms", "+p99 ms", "+mean ms",
            "errors", "RSS start/end/max MB", "router CPU ms/req", "split", "affinity"]

    def fmt(v: Any, nd: int = 2) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{nd}f}"
        return str(v)

    table = []
    for r in rows:
        if r.get("skipped"):
            table.append([r["target"], "", "skipped: " + r["skipped"][:80]] + [""] * (len(cols) - 3))
            continue
        m = r["metrics"]
        over = r.get("overhead") or {}
        rss = r.get("rss") or {}
        rss_s = (f"{fmt(rss.get('start_mb'), 1)}/{fmt(rss.get('end_mb'), 1)}/{fmt(rss.get('max_mb'), 1)}"
                 if rss else "-")
        split = "/".join(str(v) for _, v in sorted(m["backend_counts"].items()))
        table.append([r["target"], str(r["concurrency"]), fmt(m["rps"], 1), fmt(m["p50_ms"]), fmt(m["p99_ms"]),
                      fmt(m["mean_ms"]), fmt(over.get("p50_ms")), fmt(over.get("p99_ms")), fmt(over.get("mean_ms")),
                      str(m["errors"]), rss_s, fmt(r.get("router_cpu_ms_per_req")), split,
                      fmt(m.get("prefix_affinity"))])
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="Router overhead vs direct (fake backends; +ms = through router - direct, same concurrency)")
        for c in cols:
            t.add_column(c, justify="left" if c in ("target", "split") else "right")
        for row in table:
            t.add_row(*row)
        Console(width=220).print(t)
    except ImportError:
        widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Router overhead benchmark against two fake vLLM backends.")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds per target and concurrency")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds before each measurement")
    ap.add_argument("--concurrency", default="32",
                    help="closed-loop clients; a comma list (e.g. 1,32) runs each level in turn")
    ap.add_argument("--routers", default=None,
                    help="comma list of ours (the default policy, as the README starts it), ours:POLICY, "
                         "ours[:POLICY]-wN (N worker processes), smg, vllm-router (default: ours with every "
                         "policy, the default first, then the peers; empty: baseline only)")
    ap.add_argument("--prompts", default="hot,unique",
                    help="comma list of prompt mixes, each measured in turn: hot (one prompt for every request), "
                         "unique (a prompt never seen before per request: new block keys throughout, recurring "
                         "text after its first words), novel (text never seen anywhere: tokenization-bound), "
                         "shared (--num-prefixes prefixes with varied suffixes)")
    ap.add_argument("--segment", type=float, default=10.0,
                    help="report req/s and p50 per this many seconds of each measurement (0: off)")
    ap.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                    help="load generator: httpx.AsyncClient, or a minimal asyncio HTTP/1.1 client that uses "
                         "~10x less CPU (leaves more of a small machine to the router under test)")
    ap.add_argument("--out", default="runs/overhead.json")
    ap.add_argument("--bin-dir", action="append", default=[],
                    help="extra directory to look for router binaries in (repeatable)")
    ap.add_argument("--model-dir", default=None,
                    help="tokenizer/model dir for preble-router (default: build one under .cache/)")
    ap.add_argument("--prompt-words", type=int, default=3000)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--log-dir", default=None, help="router/backend logs (default: next to --out)")
    ap.add_argument("--no-final-baseline", action="store_true", help="skip the second direct run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every router this many times, in reverse order every other round, and print "
                         "medians and per-round ratios (this machine's speed moves by 1.5x within minutes)")
    a = ap.parse_args(argv)

    routers = default_routers() if a.routers is None else [r.strip() for r in a.routers.split(",") if r.strip()]
    for r in routers:
        if r not in ALL_ROUTERS and _ours_variant(r) is None:
            ap.error(f"unknown router {r!r}; choose from {ALL_ROUTERS}, ours:POLICY or ours[:POLICY]-wN")
    modes = [m.strip() for m in a.prompts.split(",") if m.strip()]
    if not modes or set(modes) - set(PROMPT_MODES):
        ap.error(f"--prompts takes a comma list of {', '.join(PROMPT_MODES)}")
    try:
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error("--concurrency takes integers, e.g. 32 or 1,32")
    if not levels or min(levels) < 1:
        ap.error("--concurrency must be >= 1")
    out_path = Path(a.out)
    if not out_path.is_absolute():
        out_path = Path.cwd() / out_path
    log_dir = Path(a.log_dir) if a.log_dir else out_path.parent / (out_path.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    specs = router_specs(list(a.bin_dir))
    for r in routers:
        if r not in specs:
            policy, workers = _ours_variant(r)  # type: ignore[misc]
            specs[r] = _ours_with(specs["ours"], r, policy, workers)

    if any(r.startswith("ours") for r in routers) and specs["ours"].build is not None:
        md = Path(a.model_dir) if a.model_dir else REPO / ".cache" / "overhead-model"
        print(f"model dir for preble-router: {md}")
        model_dir = str(make_model_dir(md).resolve())
    else:
        model_dir = str(Path(a.model_dir).resolve()) if a.model_dir else "tiny"
    served_model = model_dir  # like vLLM's default served name: the --model argument

    suffix = max(50, a.prompt_words // 6)
    workloads: dict[str, Workload | UniqueBodies] = {}
    for mode in modes:
        if mode == "hot":
            workloads[mode] = build_hot_workload(served_model, a.prompt_words, a.max_tokens)
        elif mode in ("unique", "novel"):
            workloads[mode] = build_unique_bodies(served_model, a.prompt_words, a.max_tokens, novel=mode == "novel")
        else:
            workloads[mode] = build_workload(served_model, num_prefixes=a.num_prefixes,
                                             prefix_words=max(1, a.prompt_words - suffix), suffix_words=suffix,
                                             max_tokens=a.max_tokens)
    print(f"workloads: {', '.join(modes)} (~{a.prompt_words} words a prompt; shared: {a.num_prefixes} prefixes), "
          f"max_tokens {a.max_tokens}, concurrency {levels}, client {a.client}, {a.duration}s measured "
          f"(+{a.warmup}s warm-up) per level, segments of {a.segment}s")
    wl: Workload | UniqueBodies = workloads[modes[0]]

    env = child_env()
    backends: list[Proc] = []
    results: list[dict[str, Any]] = []
    bases: dict[tuple[str, int], list[dict[str, Any]]] = {(m, c): [] for m in modes for c in levels}
    try:
        ports = [free_port(), free_port()]
        while ports[0] == ports[1]:
            ports[1] = free_port()
        for p in ports:
            backends.append(Proc(f"fake-{p}", [sys.executable, "-m", "testkit.fake_backend", "--port", str(p),
                                               "--model", served_model], log_dir / f"fake-{p}.log", env))
        urls = [f"http://{HOST}:{p}" for p in ports]
        for u, b in zip(urls, backends):
            wait_http(u + "/health", 30, b)
        fake_stats = [ProcStats(b.pid) for b in backends]
        names = {str(p) for p in ports}
        print(f"fake backends: {', '.join(urls)}")

        def fakes_cpu() -> float | None:
            vals = [s.cpu_seconds() for s in fake_stats]
            return None if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]

        def measure(target: str, url_list: list[str], proc: Proc | None, conc: int) -> dict[str, Any]:
            run_load(url_list, wl, conc, a.warmup, a.client)
            stats = ProcStats(proc.pid) if proc else None
            rec: dict[str, Any] = {"target": target, "concurrency": conc}
            cpu0 = stats.cpu_seconds() if stats else None
            f0 = fakes_cpu()
            if stats:
                with RssSampler(stats, 1.0) as samp:
                    res = run_load(url_list, wl, conc, a.duration, a.client)
                rss = [s[1] for s in samp.samples]
                rec["rss"] = {"start_mb": _mb(rss[0]) if rss else None, "end_mb": _mb(rss[-1]) if rss else None,
                              "max_mb": _mb(max(rss)) if rss else None,
                              "samples": [[t, _mb(v)] for t, v in samp.samples]}
                cpu1 = stats.cpu_seconds()
            else:
                res = run_load(url_list, wl, conc, a.duration, a.client)
                cpu1 = None
            f1 = fakes_cpu()
            m = summarize(res, a.segment)
            rec["metrics"] = m
            rec["prompts"] = mode
            if m["requests"]:
                if cpu0 is not None and cpu1 is not None:
                    rec["router_cpu_s"] = round(cpu1 - cpu0, 3)
                    rec["router_cpu_ms_per_req"] = round((cpu1 - cpu0) * 1e3 / m["requests"], 3)
                if f0 is not None and f1 is not None:
                    rec["fakes_cpu_ms_per_req"] = round((f1 - f0) * 1e3 / m["requests"], 3)
            if m["errors"]:
                print(f"  {target} @{conc}: {m['errors']} errors, e.g. {m['error_samples'][:2]}")
            print(f"  {target} [{mode}] @{conc}: {m['rps']} req/s, p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms, "
                  f"mean {m['mean_ms']} ms, errors {m['errors']}, split {m['backend_counts']}"
                  + (f", segments {[g['rps'] for g in m['segments']]} req/s" if m["segments"] else "")
                  + (f", RSS {rec['rss']['start_mb']}->{rec['rss']['end_mb']} MB (max {rec['rss']['max_mb']})"
                     if rec.get("rss") else ""))
            return rec

        direct_urls = [u + "/v1/completions" for u in urls]

        def baseline(label: str) -> None:
            print(f"{label} (no router) [{mode}] ...")
            for conc in levels:
                rec = measure(label, direct_urls, None, conc)
                bases[(mode, conc)].append(rec)
                results.append(rec)

        def run_router(name: str, round_no: int) -> None:
            spec = specs[name]
            if spec.build is None:
                print(f"SKIP {name}: {spec.skip_reason}")
                results.append({"target": name, "skipped": spec.skip_reason, "prompts": mode})
                return
            port = free_port()
            cmd = spec.build(port, urls, model_dir)
            print(f"{name}: {' '.join(cmd)}")
            proc = Proc(name, cmd, log_dir / f"{name.replace(':', '-')}-{mode}-r{round_no}.log", env)
            version = dist_version(spec.binary if spec.binary and os.path.isfile(spec.binary) else None,
                                   ROUTER_DISTS.get(name, ROUTER_DISTS["ours"]))
            try:
                router_url = f"http://{HOST}:{port}"
                t0 = time.monotonic()
                seen = wait_routes_to_both(router_url, served_model, names, a.ready_timeout, proc)
                ready_s = time.monotonic() - t0
                print(f"  ready in {ready_s:.1f}s (probe split {seen}), version {version}")
                for conc in levels:
                    rec = measure(name, [router_url + "/v1/completions"], proc, conc)
                    rec.update(command=cmd, version=version, ready_s=round(ready_s, 2), probe_split=seen,
                               round=round_no)
                    if not proc.alive():
                        rec["died"] = f"exit {proc.p.returncode}"
                    results.append(rec)
            except Exception as e:  # noqa: BLE001 - one router failing must not sink the others
                msg = f"{type(e).__name__}: {str(e)[:1500]}"
                print(f"FAILED {name}: {msg}")
                results.append({"target": name, "skipped": f"failed: {msg.splitlines()[0][:200]}",
                                "command": cmd, "version": version, "error": msg, "prompts": mode})
            finally:
                proc.stop()

        for mode in modes:
            wl = workloads[mode]
            baseline("direct")
            for k in range(max(1, a.rounds)):
                for name in routers if k % 2 == 0 else routers[::-1]:  # no router always goes first
                    run_router(name, k + 1)
            if not a.no_final_baseline:
                baseline("direct (end)")
    finally:
        for b in backends:
            b.stop()

    # Overhead against the mean of the baseline runs at the same concurrency.
    baseline_summary: dict[str, Any] = {}
    def bmean(recs: list[dict[str, Any]], key: str) -> float | None:
        vals = [b["metrics"][key] for b in recs if b["metrics"].get(key) is not None]
        return round(statistics.fmean(vals), 3) if vals else None

    for (mode, conc), recs in bases.items():
        if not recs:
            continue
        bs = {k: bmean(recs, k) for k in ("rps", "p50_ms", "p99_ms", "mean_ms")}
        if len(recs) == 2 and recs[0]["metrics"]["mean_ms"] and recs[1]["metrics"]["mean_ms"]:
            bs["drift"] = round(recs[1]["metrics"]["mean_ms"] / recs[0]["metrics"]["mean_ms"] - 1, 3)
            if abs(bs["drift"]) > 0.2:
                print(f"warning: direct baseline @{conc} moved {bs['drift']:+.0%} between start and end "
                      f"(noisy machine)")
        baseline_summary[f"{mode}@{conc}"] = bs
        for r in results:
            if (r.get("skipped") or r["target"].startswith("direct") or r.get("concurrency") != conc
                    or r.get("prompts") != mode):
                continue
            m = r["metrics"]
            r["overhead"] = {k: (round(m[k] - bs[k], 3) if m.get(k) is not None and bs[k] is not None else None)
                             for k in ("p50_ms", "p99_ms", "mean_ms")}
            if bs["rps"]:
                r["overhead"]["rps_ratio"] = round(m["rps"] / bs["rps"], 3)

    print()
    print_table(results)
    rounds = {mode: summarize_rounds([r for r in results if r.get("prompts") == mode], routers, levels, mode)
              for mode in modes}
    report = {
        "benchmark": "router_overhead",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"duration_s": a.duration, "warmup_s": a.warmup, "concurrency": levels, "client": a.client,
                   "prompt_words": a.prompt_words, "num_prefixes": a.num_prefixes, "prompts": modes,
                   "segment_s": a.segment, "rounds": a.rounds, "max_tokens": a.max_tokens, "stream": False,
                   "routers": routers, "model_dir": model_dir},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "baseline": baseline_summary,
        "results": results,
        "rounds": rounds,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out_path} (logs in {log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
