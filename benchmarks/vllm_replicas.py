"""Launch real vLLM CPU replicas (OpenAI API servers) for tests, demos and benchmarks.

    with start_replicas(model_dir, n=2) as reps:
        reps[0].url            # http://127.0.0.1:PORT
        reps[0].kv_endpoint    # ipc://... ZMQ PUB (topic "kv") the router SUBscribes to
        reps[0].replay_endpoint  # ipc://... ZMQ ROUTER, query it with a DEALER

CLI (prints the endpoints, serves until Ctrl-C):

    python -m benchmarks.vllm_replicas MODEL_DIR -n 2 [--block-size 32] [--num-gpu-blocks N]

Every replica runs in its own session (process group), led by a tiny supervisor process: vLLM
spawns EngineCore and Worker children (plus a multiprocessing resource tracker) that survive the API
server's death, so teardown signals the whole group, never just the API server.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testkit.ports import free_ports

# Each replica runs under this small supervisor, the leader of the replica's process group. Why:
# EngineCore and its Worker do NOT exit when the API server dies (measured: still alive 10 s after
# SIGKILL of the server), and no finally/atexit runs if the launching process is SIGKILLed. The
# supervisor polls its parent and SIGKILLs the whole group once the launcher is gone (polling, not
# PR_SET_PDEATHSIG, which fires when the forking *thread* exits). On the group-wide SIGTERM of a
# normal stop it just waits, so vLLM shuts down gracefully, and it exits with the server's code.
_SUPERVISOR = """\
import os, signal, subprocess, sys
launcher = int(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: None)
if os.getppid() != launcher:
    sys.exit(1)
child = subprocess.Popen(sys.argv[2:])
while True:
    try:
        sys.exit(child.wait(timeout=0.5))
    except subprocess.TimeoutExpired:
        pass
    if os.getppid() != launcher:
        os.killpg(0, signal.SIGKILL)
"""

_live: set[Replica] = set()
_live_lock = threading.Lock()


def _kill_live_at_exit() -> None:
    # Last line of defence (e.g. a generator that was never closed); normal paths stop replicas earlier.
    with _live_lock:
        reps = list(_live)
    for rep in reps:
        rep.kill()


atexit.register(_kill_live_at_exit)


def _raise_nofile_limit(want: int = 65536) -> None:
    # vLLM's API server wants many fds (it warns at the default); children inherit our limits.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _descendants(pid: int) -> list[int]:
    """All descendants of pid (via /proc), to catch children that left the process group."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may itself hold spaces.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


_ERROR_LINE = re.compile(r"(Error|Exception|error:|ERROR)")
# Startup attempts per replica: ports are picked free but only bound seconds later, so another process
# (a sibling replica's engine picking its own ZMQ ports) can take one first; a retry gets fresh ports.
_START_ATTEMPTS = 3


@dataclass(eq=False)
class Replica:
    """One vLLM API server (+ its EngineCore) on 127.0.0.1:port."""

    index: int
    url: str
    port: int
    kv_endpoint: str | None
    replay_endpoint: str | None
    log_path: Path
    served_model_name: str
    cmd: list[str]
    env: dict[str, str]
    ready_timeout: float = 180.0
    # CPUs the whole replica (API server, EngineCore, its threads) may run on; None: the OMP threads alone are
    # bound (VLLM_CPU_OMP_THREADS_BIND) and the rest floats over every core
    cpus: frozenset[int] | None = None
    process: subprocess.Popen | None = None  # the supervisor: group leader, parent of the API server
    started_at: float = field(default=0.0, repr=False)
    startup_s: float | None = None  # Popen -> /health 200 and model listed, of the latest start

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the server (does not wait; see wait_ready)."""
        if self.alive():
            raise RuntimeError(f"replica {self.index} is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # append: a restart keeps the earlier log
            log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *self.cmd],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches EngineCore too
                preexec_fn=(lambda cpus=self.cpus: os.sched_setaffinity(0, cpus)) if self.cpus else None,
            )
        self.started_at = time.monotonic()
        self.startup_s = None
        with _live_lock:
            _live.add(self)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_ready(self) -> bool:
        """One readiness probe: /health is 200 and /v1/models lists served_model_name."""
        try:
            status, _ = _http_get(f"{self.url}/health")
            if status != 200:
                return False
            status, body = _http_get(f"{self.url}/v1/models")
            if status != 200:
                return False
            ids = [m.get("id") for m in json.loads(body).get("data", [])]
            return self.served_model_name in ids
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        _wait_all_ready([self], self.ready_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group right away (fault injection; also the last resort)."""
        self._signal_group(signal.SIGKILL)
        self._reap(timeout=10.0)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group (lets vLLM release its shared memory), SIGKILL after `grace` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # always: EngineCore may outlive the API server by a moment

    def pause(self) -> None:
        """SIGSTOP the group (fault injection: a hung replica, its sockets still accepting)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def restart(self, timeout: float | None = None) -> None:
        """Kill and start again on the same port and ZMQ endpoints, then wait until ready.

        The KV-event sequence number restarts at 0 and the new engine's cache is empty.
        """
        self.kill()
        self.start()
        self.wait_ready(timeout)

    # --- helpers ---------------------------------------------------------------------------
    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        extra = _descendants(pid)  # children that might have left the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # pgid == pid thanks to start_new_session
        for c in extra:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(c, sig)

    def _reap(self, timeout: float) -> None:
        if self.process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        # The group outlives its leader until init reaps the (re-parented) children.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                break
            time.sleep(0.05)
        with _live_lock:
            _live.discard(self)

    def _log_lines(self) -> list[str] | None:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None

    def log_tail(self, n: int = 60) -> str:
        lines = self._log_lines()
        return "<no log>" if lines is None else "\n".join(lines[-n:])

    def log_errors(self, n: int = 12) -> str:
        """The log's last lines that name an error (a child's root cause is often far above the tail)."""
        hits = [ln for ln in self._log_lines() or () if _ERROR_LINE.search(ln)][-n:]
        return "error lines:\n" + "\n".join(hits) + "\n--- tail:\n" if hits else ""

    def rss_bytes(self) -> int:
        """Resident memory of the API server and all its descendants (EngineCore included)."""
        if not self.alive():
            return 0
        total = 0
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
        return total


class ReplicaDied(RuntimeError):
    """A replica exited before it was ready; `.replica` says which."""

    def __init__(self, rep: Replica) -> None:
        code = None if rep.process is None else rep.process.returncode
        super().__init__(
            f"vLLM replica {rep.index} ({rep.url}) exited with code {code} during startup; "
            f"log {rep.log_path}:\n{rep.log_errors()}{rep.log_tail()}"
        )
        self.replica = rep


def _wait_all_ready(replicas: Sequence[Replica], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(replicas)
    while pending:
        for rep in list(pending):
            if not rep.alive():
                raise ReplicaDied(rep)
            if rep.check_ready():
                rep.startup_s = time.monotonic() - rep.started_at
                pending.remove(rep)
        if not pending:
            return
        if time.monotonic() > deadline:
            rep = pending[0]
            raise TimeoutError(
                f"vLLM replica {rep.index} ({rep.url}) not ready after {timeout:.0f}s; "
                f"log {rep.log_path}:\n{rep.log_tail()}"
            )
        time.sleep(0.5)


def _replica_core(i: int) -> int:
    """The core replica i's OMP threads are bound to, and (pin) its whole process tree."""
    return i % (os.cpu_count() or 1)


def _replica_env(i: int, base: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONHASHSEED, if set, replaces vLLM's fixed NONE_HASH seed: keep the documented default so a
    # router can recompute block hashes (pass it in `env` on purpose if wanted).
    env.pop("PYTHONHASHSEED", None)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; unset, the CPU worker grabs ~92% of RAM
            "VLLM_CPU_OMP_THREADS_BIND": str(_replica_core(i)),  # one core per replica
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # with one bound core, reserve none for the frontend
            "VLLM_SERVER_DEV_MODE": "1",  # exposes POST /reset_prefix_cache
            "PYTHONUNBUFFERED": "1",
        }
    )
    if base:
        env.update(base)
    return env


@contextlib.contextmanager
def start_replicas(
    model_dir: str | os.PathLike,
    n: int = 2,
    *,
    block_size: int = 32,
    num_gpu_blocks: int | None = None,
    max_model_len: int = 4096,
    kv_events: bool = True,
    served_model_name: str = "tiny",
    python: str = sys.executable,
    log_dir: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    kv_transport: str = "ipc",
    pin: bool = False,
) -> Iterator[list[Replica]]:
    """Start n vLLM CPU replicas concurrently, yield them once all are ready, tear all down on exit.

    block_size must be a multiple of 32 on CPU. num_gpu_blocks caps the KV cache (eviction tests).
    Logs go to log_dir (kept) or to a temp dir (removed at exit). `env` overrides per-replica env.
    pin: each replica's whole process tree on the core its OMP threads use (_replica_core), not only those
    threads: the replicas are then independent machines, as GPUs would be, instead of two engines whose API
    servers and schedulers share every core (where a busy second replica slows the first).
    """
    if block_size % 32:
        raise ValueError("the vLLM CPU attention backend needs block_size to be a multiple of 32")
    if num_gpu_blocks is not None and (num_gpu_blocks - 1) * block_size < max_model_len:
        # One block is vLLM's reserved null block; the engine refuses to start (after ~20 s) if a
        # max_model_len request cannot fit, so fail fast here.
        raise ValueError(
            f"num_gpu_blocks={num_gpu_blocks} holds {(num_gpu_blocks - 1) * block_size} tokens "
            f"(one block is reserved), less than max_model_len={max_model_len}"
        )
    _raise_nofile_limit()
    model_dir = str(Path(model_dir).resolve())
    # ipc paths must stay short (sun_path is 108 bytes), hence a short prefix under /tmp.
    run_dir = Path(tempfile.mkdtemp(prefix="vllmrep-", dir="/tmp" if os.path.isdir("/tmp") else None))
    logs = Path(log_dir) if log_dir is not None else run_dir
    attempt_of = [0] * n
    taken: set[int] = set()  # every port handed out in this call, so no two replicas share one

    def fresh_ports(k: int) -> list[int]:
        while True:
            ports = free_ports(k)
            if taken.isdisjoint(ports):
                taken.update(ports)
                return ports

    def make(i: int) -> Replica:
        """Replica i with freshly picked ports (a retry after a lost port race picks new ones)."""
        attempt_of[i] += 1
        (port,) = fresh_ports(1)
        if kv_transport in ("tcp", "tcp-connect"):  # for consumers that only speak tcp (vllm-router)
            kv_port, replay_port = fresh_ports(2)
            bind_kv, bind_replay = f"tcp://*:{kv_port}", f"tcp://*:{replay_port}"  # '*' makes vLLM bind
            kv_ep, replay_ep = f"tcp://127.0.0.1:{kv_port}", f"tcp://127.0.0.1:{replay_port}"
            if kv_transport == "tcp-connect":  # a user's easy mistake: no '*', so vLLM's publisher connects
                bind_kv = kv_ep
        else:
            kv_ep = bind_kv = f"ipc://{run_dir}/kv{i}"
            replay_ep = bind_replay = f"ipc://{run_dir}/replay{i}"
        if not kv_events:
            kv_ep = replay_ep = None
        cmd = [
            python, "-m", "vllm.entrypoints.openai.api_server",  # the `vllm` script is broken in vllm-cpu
            "--model", model_dir,
            "--served-model-name", served_model_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", "bfloat16",
            "--enforce-eager",  # skips torch.compile warmup: ~25 s startup
            "--block-size", str(block_size),
            "--max-model-len", str(max_model_len),
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        ]  # fmt: skip
        if num_gpu_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(num_gpu_blocks)]
        if kv_events:
            # ipc:// endpoints make the publisher bind (tcp without '*' would connect instead).
            cfg = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": bind_kv,
                "replay_endpoint": bind_replay,
                "topic": "kv",
            }
            cmd += ["--kv-events-config", json.dumps(cfg)]
        cmd += list(extra_args)
        return Replica(
            index=i,
            url=f"http://127.0.0.1:{port}",
            port=port,
            kv_endpoint=kv_ep,
            replay_endpoint=replay_ep,
            log_path=logs / f"replica{i}-{port}.log",
            served_model_name=served_model_name,
            cmd=cmd,
            env=_replica_env(i, env),
            ready_timeout=ready_timeout,
            cpus=frozenset({_replica_core(i)}) if pin else None,
        )

    replicas: list[Replica] = []
    try:
        for i in range(n):
            replicas.append(make(i))
            replicas[-1].start()  # all start at once; startup is mostly per-replica single-core work
        while True:
            try:
                _wait_all_ready(replicas, ready_timeout)
                break
            except ReplicaDied as died:
                i = died.replica.index
                if attempt_of[i] >= _START_ATTEMPTS:
                    raise
                print(f"[vllm_replicas] {died}\n[vllm_replicas] starting replica {i} again on new ports",
                      file=sys.stderr)  # fmt: skip
                died.replica.stop(grace=1.0)
                replicas[i] = make(i)
                replicas[i].start()
        yield replicas
    finally:
        # Runs on normal exit, exceptions and KeyboardInterrupt alike. Stop all at once, then reap.
        for rep in replicas:
            if rep.alive():
                rep._signal_group(signal.SIGTERM)
        for rep in replicas:
            rep.stop(grace=10.0)
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start vLLM CPU replicas and print their endpoints until Ctrl-C.")
    ap.add_argument("model_dir")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--served-model-name", default="tiny")
    ap.add_argument("--no-kv-events", action="store_true")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    args, extra = ap.parse_known_args(argv)  # unknown flags go to vLLM verbatim

    # SIGTERM -> exception, so the context manager's teardown runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with start_replicas(
            args.model_dir,
            args.n,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            max_model_len=args.max_model_len,
            kv_events=not args.no_kv_events,
            served_model_name=args.served_model_name,
            log_dir=args.log_dir,
            extra_args=extra,
            ready_timeout=args.ready_timeout,
        ) as reps:
            for r in reps:
                print(
                    json.dumps(
                        {
                            "url": r.url,
                            "kv_endpoint": r.kv_endpoint,
                            "replay_endpoint": r.replay_endpoint,
                            "log": str(r.log_path),
                            "startup_s": round(r.startup_s or 0, 1),
                        }
                    ),
                    flush=True,
                )
            print("ready; Ctrl-C to stop", flush=True)
            while all(r.alive() for r in reps):
                time.sleep(1.0)
            dead = [r for r in reps if not r.alive()]
            print(f"replica {dead[0].index} exited:\n{dead[0].log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
