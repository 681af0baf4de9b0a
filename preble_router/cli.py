"""`preble-router`: start the router in front of vLLM replicas."""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import uvicorn

from preble_router.discovery import add_discovery_args, check_discovery_args, start_discovery
from preble_router.peer_sync import ENV_PEER_DIR, PeerSync
from preble_router.policies import POLICIES, Policy, PrebleConfig, PreblePolicy, TimeModel, make_policy
from preble_router.policies.time_model import PROFILES
from preble_router.proxy import Proxy, ProxyConfig
from preble_router.router import EVENTS_SILENCE_S, LOAD_POLL_INTERVAL_S, PREDICTED_TTL_S, Router
from preble_router.settings import add_flags, from_args
from preble_router.tokens import PromptTokenizer

# --workers N: each worker process rebuilds the router from the same arguments, passed in the environment.
ENV_ARGV = "PREBLE_ROUTER_ARGV"
WORKER_HEALTHCHECK_TIMEOUT_S = 60  # seconds a --workers process may miss its supervisor's ping


def _split_list(values: Sequence[str]) -> list[str]:
    """Accept both `--backends a b` and `--backends a,b`."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_model_dir(spec: str) -> tuple[str, str]:
    """`SERVED_NAME=TOKENIZER_DIR` -> (name, dir)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected SERVED_NAME=DIRECTORY, got {spec!r}")
    return name, path


def parse_kv_source(spec: str) -> tuple[str, str, str | None]:
    """`BACKEND_URL=ENDPOINT` or `BACKEND_URL=ENDPOINT|REPLAY_ENDPOINT` -> (url, endpoint, replay)."""
    url, sep, endpoints = spec.rpartition("=")
    if not sep or not url or not endpoints:
        raise argparse.ArgumentTypeError(f"expected BACKEND_URL=ZMQ_ENDPOINT[|REPLAY_ENDPOINT], got {spec!r}")
    endpoint, _, replay = endpoints.partition("|")
    return url.rstrip("/"), endpoint, replay or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preble-router",
        description="Prefix-aware OpenAI-compatible router in front of vLLM replicas.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backends", nargs="*", default=[], metavar="URL",
                   help="vLLM OpenAI server base URLs (space- or comma-separated), e.g. http://10.0.0.5:8000. "
                        "Required with --discovery static (the default); with --discovery k8s, fixed extras.")
    p.add_argument("--model", required=True, help="The served model: a local directory or a model name. Its "
                   "tokenizer (and chat template) is loaded from here unless --tokenizer is given.")
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory or name, if not the model's.")
    p.add_argument("--served-model-name", default=None,
                   help="The model name clients send (default: what the backends' /v1/models reports first).")
    p.add_argument("--model-dir", action="append", default=[], type=parse_model_dir, metavar="NAME=DIR",
                   help="Another model some backends serve (repeatable): requests naming NAME go only to backends "
                        "whose /v1/models lists it, tokenized with the tokenizer in DIR (loaded on first use).")
    p.add_argument("--policy", default="preble", choices=sorted(POLICIES), help="Routing policy.")
    p.add_argument("--kv-events", nargs="+", default=["auto"], metavar="auto|off|URL=ENDPOINT[|REPLAY]",
                   help="Where each backend's vLLM KV events come from. 'auto': subscribe to what each engine "
                        "advertises at GET /kv_event_sources (a wildcard host becomes the backend's host; also for "
                        "backends found by discovery). 'off': no events. Or a ZMQ publisher (and optional replay "
                        "endpoint) per backend, e.g. http://127.0.0.1:8001=tcp://127.0.0.1:5557|tcp://127.0.0.1:5558 "
                        "(may be combined with auto). Backends without events use an estimated index (what the "
                        "router sent, LRU-bounded by capacity).")
    p.add_argument("--kv-events-silence", type=float, default=EVENTS_SILENCE_S,
                   help="Seconds requests that store new blocks may wait for a KV event before that backend's "
                        "events count as silent: a WARNING, the preble_kv_event_feed metric and /debug/backends "
                        "say so, and the backend is routed on the estimated index until events flow again.")
    p.add_argument("--predicted-ttl", type=float, default=PREDICTED_TTL_S,
                   help="A routed request's new blocks count as cached on its backend from dispatch until the "
                        "engine's events confirm them, or until the request ends plus this many seconds (events "
                        "still in flight).")
    p.add_argument("--load-poll-interval", type=float, default=LOAD_POLL_INTERVAL_S,
                   help="Seconds between polls of each backend's own load report (its load feed: one GET of the "
                        "Preble plugin's /preble/load, else of vLLM's /metrics gauges). Policies see the engine's "
                        "last report plus what this router sent there since, minus what of that finished "
                        "(README: several routers), so routers and --workers agree. A feed that fails or goes stale "
                        "(no report for max(1 s, 4 intervals)) logs a WARNING and falls back to this router's own "
                        "counts. 0 (the default): off, own counts only, exact behind a lone router or a peered "
                        "fleet; set 0.25 for several routers that are not peered (each polled /metrics costs the "
                        "engine's API server CPU).")
    pre = p.add_argument_group("preble policy (docs/design.md)")
    add_flags(pre, PrebleConfig)
    pre.add_argument("--time-profile", default="llama3-8b-h100",
                     help=f"Prefill/decode time model: a built-in profile ({', '.join(PROFILES)}) or a JSON file "
                          '{"prefill": {"a", "b", "d", "e"}, "decode_ms_per_token"}; refined online.')
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on.")
    p.add_argument("--workers", type=int, default=1,
                   help="Router processes sharing the port (one Python process is bound to one core; BENCHMARKS.md "
                        "gives its throughput). Each keeps its own index and load view: with --kv-events all "
                        "indexes follow the engines; without, each estimates from the requests it routed. The "
                        "workers tell each other what they dispatch (--peer-sync), so each routes on all of their "
                        "traffic. Counters and histograms in /metrics add up across workers.")
    peers = p.add_argument_group("several routers (README: several routers in front of one fleet)")
    peers.add_argument("--peer-sync", default="on", choices=["on", "off"],
                       help="Tell peer routers what this one dispatches, and count theirs as its own (predicted "
                            "blocks, load, the policy's history): automatic between --workers, and with "
                            "--peer-bind/--peers between router processes. off: each router sees other routers' "
                            "requests only through the engines' KV events and load reports.")
    peers.add_argument("--peer-bind", default=None, metavar="ZMQ_ADDR",
                       help="Where this router publishes its dispatches for its peers, e.g. tcp://*:5600.")
    peers.add_argument("--peers", nargs="*", default=[], metavar="ZMQ_ADDR",
                       help="The peer routers' --peer-bind addresses (space- or comma-separated), e.g. "
                            "tcp://router-0.router:5600; the same list on every router is fine (a router ignores "
                            "its own events). dns:NAME:PORT: every address NAME resolves to, resolved again each "
                            "second (a headless Service of the router pods: routers that come and go join and "
                            "leave).")
    add_flags(p, ProxyConfig)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="On SIGTERM, seconds to let in-flight requests (streams included) finish.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_discovery_args(p)
    return p


def build_policy(args: argparse.Namespace) -> Policy:
    if args.policy != "preble":
        return make_policy(args.policy)
    return PreblePolicy(from_args(PrebleConfig, args), TimeModel.from_profile(args.time_profile))


def build_proxy(args: argparse.Namespace) -> Proxy:
    tokenizer = PromptTokenizer(args.tokenizer or args.model)
    modes = {m for m in args.kv_events if m in ("auto", "off")}
    if modes == {"auto", "off"}:
        raise SystemExit("--kv-events: 'auto' and 'off' exclude each other")
    router = Router(model=args.served_model_name or args.model, tokenizer=tokenizer,
                    policy=build_policy(args), predicted_ttl=args.predicted_ttl, kv_events_auto="auto" in modes,
                    events_silence=args.kv_events_silence, load_poll_interval=args.load_poll_interval,
                    models=dict(args.model_dir))
    kv = {url: (endpoint, replay)
          for url, endpoint, replay in map(parse_kv_source, [m for m in args.kv_events if m not in modes])}
    backends = _split_list(args.backends)
    unknown = set(kv) - {b.rstrip("/") for b in backends}
    if unknown:
        raise SystemExit(f"--kv-events names backends not in --backends: {', '.join(sorted(unknown))}")
    for url in backends:
        endpoint, replay = kv.get(url.rstrip("/"), (None, None))
        router.add_backend(url, endpoint, replay)
    config = from_args(ProxyConfig, args)
    if args.peer_sync == "on":
        peer_dir = os.environ.get(ENV_PEER_DIR) if args.workers > 1 else None
        try:
            sync = PeerSync(router, bind=args.peer_bind, peers=_split_list(args.peers), peer_dir=peer_dir)
        except ValueError as exc:
            raise SystemExit(f"--peers: {exc}") from None
        if sync.enabled:
            router.peer_flight_ttl = config.request_timeout
            router.peer_sync = sync  # started and stopped with the router's event consumers
    return Proxy(router, config, discovery=lambda r: start_discovery(args, r))


def _setup_logging(args: argparse.Namespace) -> None:
    worker = " [%(process)d]" if args.workers > 1 else ""  # --workers: whose line it is (each routes on its own)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s{worker} %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: on a proxy that is one line per forwarded request and health probe.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _uvicorn_kwargs(args: argparse.Namespace) -> dict:
    # No Server/Date headers of our own: relayed responses carry the backend's. No X-Forwarded-* rewriting of the
    # client address either: nothing here reads it, and the middleware runs on every request.
    kwargs = {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
              "timeout_graceful_shutdown": args.drain_timeout, "server_header": False, "date_header": False,
              "proxy_headers": False}
    if args.workers > 1 and "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters:
        # uvicorn's supervisor kills a worker that misses a 5 s ping. A worker starting on a busy machine (importing
        # the tokenizer stack holds the interpreter for seconds) missed it and was killed, again and again: a
        # restart loop that took the CPU the engines needed. A hung worker is still replaced, later.
        kwargs["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_TIMEOUT_S
    return kwargs


def worker_app():  # noqa: ANN201 (an ASGI app)
    """uvicorn factory for --workers N, run in each worker process."""
    args = build_parser().parse_args(json.loads(os.environ[ENV_ARGV]))
    _setup_logging(args)
    app = build_proxy(args).app()
    tune_gc()
    return app


def tune_gc() -> None:
    """Freeze what start-up built (tokenizer, policy tables) and collect the young generation far less often.

    Routing allocates many short-lived containers per request, so with the default thresholds the collector runs
    all the time and takes a visible share of the router's CPU, and each full collection walks everything start-up
    built while every request in flight waits. Frozen objects are never walked again, and the higher thresholds
    make collections rare. Reference counting still frees everything acyclic at once; only cycles wait longer.
    BENCHMARKS.md has the measurements (benchmarks.overhead, the collector timed with gc.callbacks).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


@contextlib.contextmanager
def _temp_dir_in_env(variable: str, prefix: str) -> Iterator[None]:
    """A fresh temporary directory named in the environment variable while the workers run (they read it)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        os.environ[variable] = d
        try:
            yield
        finally:
            del os.environ[variable]


def _multiprocess_metrics_dir() -> contextlib.AbstractContextManager[None]:
    """prometheus_client's multiprocess mode (counters shared through files in this directory); the workers
    read the variable when they import prometheus_client. A directory the user named is kept."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return contextlib.nullcontext()
    return _temp_dir_in_env("PROMETHEUS_MULTIPROC_DIR", "preble-router-metrics-")


def _peer_dir() -> contextlib.AbstractContextManager[None]:
    """--workers: the directory the workers' peer-sync sockets go in (peer_sync.py)."""
    return _temp_dir_in_env(ENV_PEER_DIR, "preble-router-peers-")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_discovery_args(parser, args)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    _setup_logging(args)
    if args.workers == 1:
        app = build_proxy(args).app()
        tune_gc()
        uvicorn.run(app, **_uvicorn_kwargs(args))
        return
    build_proxy(args)  # fail here, once, on bad arguments (model, backends), before starting workers
    os.environ[ENV_ARGV] = json.dumps(list(sys.argv[1:] if argv is None else argv))
    with _multiprocess_metrics_dir(), _peer_dir():
        uvicorn.run("preble_router.cli:worker_app", factory=True, workers=args.workers, **_uvicorn_kwargs(args))


if __name__ == "__main__":
    sys.exit(main())
