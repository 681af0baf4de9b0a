"""`preble-router`: start the router in front of vLLM replicas."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import uvicorn

from preble_router.discovery import add_discovery_args, check_discovery_args, start_discovery
from preble_router.policies import POLICIES, Policy, PrebleConfig, PreblePolicy, TimeModel, make_policy
from preble_router.policies.time_model import PROFILES
from preble_router.proxy import Proxy, ProxyConfig
from preble_router.router import Router
from preble_router.tokens import PromptTokenizer

# --workers N: each worker process rebuilds the router from the same arguments, passed in the environment.
ENV_ARGV = "PREBLE_ROUTER_ARGV"


def _split_list(values: Sequence[str]) -> list[str]:
    """Accept both `--backends a b` and `--backends a,b`."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


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
    p.add_argument("--policy", default="preble", choices=sorted(POLICIES), help="Routing policy.")
    p.add_argument("--kv-events", nargs="+", default=["auto"], metavar="auto|off|URL=ENDPOINT[|REPLAY]",
                   help="Where each backend's vLLM KV events come from. 'auto': subscribe to what each engine "
                        "advertises at GET /kv_event_sources (a wildcard host becomes the backend's host; also for "
                        "backends found by discovery). 'off': no events. Or a ZMQ publisher (and optional replay "
                        "endpoint) per backend, e.g. http://127.0.0.1:8001=tcp://127.0.0.1:5557|tcp://127.0.0.1:5558 "
                        "(may be combined with auto). Backends without events use an estimated index (what the "
                        "router sent, LRU-bounded by capacity).")
    p.add_argument("--kv-events-silence", type=float, default=5.0,
                   help="Seconds requests that store new blocks may wait for a KV event before that backend's "
                        "events count as silent: a WARNING, the preble_kv_event_feed metric and /debug/backends "
                        "say so, and the backend is routed on the estimated index until events flow again.")
    p.add_argument("--predicted-ttl", type=float, default=3.0,
                   help="A routed request's new blocks count as cached on its backend from dispatch until the "
                        "engine's events confirm them, or until the request ends plus this many seconds (events "
                        "still in flight).")
    pre = p.add_argument_group("preble policy (docs/design.md)")
    pre.add_argument("--preble-window", type=float, default=PrebleConfig.window,
                     help="H: seconds of history behind load, prefix-use and TTFT figures.")
    pre.add_argument("--preble-bal-threshold", type=float, default=PrebleConfig.bal_threshold,
                     help="Th_bal: rebalance when the heaviest backend's load is this many times the lightest's.")
    pre.add_argument("--preble-warmup", type=int, default=PrebleConfig.warmup_per_backend,
                     help="Requests per backend before rebalancing starts.")
    pre.add_argument("--preble-replicate-ttft-ratio", type=float, default=PrebleConfig.replicate_ttft_ratio,
                     help="Replicate a prefix group when its mean TTFT over the newer half of H is this many "
                          "times the older half's (and it dominates a heavy backend).")
    pre.add_argument("--preble-replicate-share", type=float, default=PrebleConfig.replicate_share,
                     help="Share of a heavy backend's load one prefix group must hold to be replicated.")
    pre.add_argument("--preble-pd-hit-ratio", type=float, default=PrebleConfig.pd_hit_ratio,
                     help="Recent cache-hit ratio above which a backend is decode-heavy and takes prefill-heavy "
                          "requests.")
    pre.add_argument("--preble-pd-window", type=float, default=PrebleConfig.pd_window,
                     help="Seconds of history for that hit ratio.")
    pre.add_argument("--preble-chain-tokens", type=int, default=PrebleConfig.chain_tokens,
                     help="Prefix groups longer than this (multi-turn chains) are never moved by rebalancing.")
    pre.add_argument("--preble-rebalance-recompute", type=float, default=PrebleConfig.rebalance_recompute,
                     help="Rebalancing moves a prefix group only when this many times the prefill of its prefix on "
                          "the light backend (what it lacks there) is at most the group's recurring load on the "
                          "heavy one, and counts that recompute on the light side; inf: the paper's rule.")
    pre.add_argument("--preble-eviction-pending", type=int, default=int(PrebleConfig.eviction_pending), choices=[0, 1],
                     help="1: M counts the KV blocks our in-flight prefills on a backend are about to store (they "
                          "evict its least recently used blocks first); 0: free = what the KV events report.")
    pre.add_argument("--preble-load-signal", default=PrebleConfig.load_signal, choices=["window", "both", "outstanding"],
                     help="L: compute sent within H (the paper's), plus the work still outstanding (both), or the "
                          "outstanding work alone (prefill not yet done and decode still ahead of what was sent; "
                          "reacts to queues, not history). Rebalancing always compares the window loads.")
    pre.add_argument("--preble-exploit-ratio", type=float, default=PrebleConfig.exploit_ratio,
                     help="Exploit when the best match covers more than this share of the prompt (0.5: cached > missed).")
    pre.add_argument("--preble-exploit-overflow", type=float, default=PrebleConfig.exploit_overflow,
                     help="Leave the longest match when its queued prefill + P is more than this many times the "
                          "best other backend's queued prefill + M + P (recomputing there, evictions included, beats "
                          "its prefill queue); "
                          "inf: the paper's exploit, which never looks at load.")
    pre.add_argument("--time-profile", default="llama3-8b-h100",
                     help=f"Prefill/decode time model: a built-in profile ({', '.join(PROFILES)}) or a JSON file "
                          '{"prefill": {"a", "b", "d", "e"}, "decode_ms_per_token"}; refined online.')
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on.")
    p.add_argument("--workers", type=int, default=1,
                   help="Router processes sharing the port (one Python process saturates one core near 1,700 "
                        "prefix-routed requests/s). Each keeps its own index and load view: with --kv-events all "
                        "indexes follow the engines; without, each estimates from the requests it routed. "
                        "Counters and histograms in /metrics add up across workers.")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="Larger requests get 413.")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="Backends tried per request when one fails before the first byte.")
    p.add_argument("--request-timeout", type=float, default=600.0, help="Seconds for a whole backend request.")
    p.add_argument("--health-interval", type=float, default=2.0, help="Seconds between backend health probes.")
    p.add_argument("--probe-timeout", type=float, default=ProxyConfig.probe_timeout,
                   help="Seconds each health-probe request may take: a backend that accepts connections but does not "
                        "answer (paused, hung) leaves the healthy set within --health-interval plus this.")
    p.add_argument("--first-byte-timeout", type=float, default=ProxyConfig.first_byte_timeout,
                   help="Seconds a streamed request waits for its backend's first chunk (its first token, after "
                        "prefill: set it a few seconds above the longest prefill). Past it the backend is marked "
                        "down and the request goes to another (up to --max-attempts). Non-streamed replies arrive "
                        "only once generated, so they have no such limit (those a backend has not begun to answer when "
                        "it fails a health probe go elsewhere). 0: no limit.")
    p.add_argument("--stream-idle-timeout", type=float, default=ProxyConfig.stream_idle_timeout,
                   help="Seconds a stream may go without a chunk once started; then the backend is marked down and "
                        "the client's stream ends with an error event and [DONE]. 0: no limit.")
    p.add_argument("--api-key", default=os.environ.get("PREBLE_API_KEY"),
                   help="Require `Authorization: Bearer KEY` on /v1/* (default: $PREBLE_API_KEY; none: open).")
    p.add_argument("--admin-key", default=os.environ.get("PREBLE_ADMIN_KEY"),
                   help="Require this key on /debug/* and /reset_prefix_cache (default: $PREBLE_ADMIN_KEY). "
                        "Without it (and without --admin-open) they answer 403.")
    p.add_argument("--admin-open", action="store_true", default=ProxyConfig.admin_open,
                   help="UNSAFE: without --admin-key, serve /debug/* and /reset_prefix_cache to anyone who can reach "
                        "the port (one request empties every replica's prefix cache). Without either they answer "
                        "403. For local experiments only.")
    p.add_argument("--backend-api-key", default=os.environ.get("PREBLE_BACKEND_API_KEY"),
                   help="API key of the vLLM backends (their --api-key); replaces the client's Authorization.")
    p.add_argument("--max-concurrency", type=int, default=0,
                   help="Requests forwarded at once; more wait in a queue (0: unbounded).")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="Requests that may wait for a slot; beyond this they get 429.")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="On SIGTERM, seconds to let in-flight requests (streams included) finish.")
    p.add_argument("--startup-wait", type=float, default=10.0,
                   help="Seconds to wait at startup for every backend to pass a first health probe.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_discovery_args(p)
    return p


def build_policy(args: argparse.Namespace) -> Policy:
    if args.policy != "preble":
        return make_policy(args.policy)
    config = PrebleConfig(window=args.preble_window, bal_threshold=args.preble_bal_threshold,
                          warmup_per_backend=args.preble_warmup, replicate_ttft_ratio=args.preble_replicate_ttft_ratio,
                          replicate_share=args.preble_replicate_share, pd_hit_ratio=args.preble_pd_hit_ratio,
                          pd_window=args.preble_pd_window, chain_tokens=args.preble_chain_tokens,
                          load_signal=args.preble_load_signal, exploit_ratio=args.preble_exploit_ratio,
                          exploit_overflow=args.preble_exploit_overflow,
                          rebalance_recompute=args.preble_rebalance_recompute,
                          eviction_pending=bool(args.preble_eviction_pending))
    return PreblePolicy(config, TimeModel.from_profile(args.time_profile))


def build_proxy(args: argparse.Namespace) -> Proxy:
    tokenizer = PromptTokenizer(args.tokenizer or args.model)
    modes = {m for m in args.kv_events if m in ("auto", "off")}
    if modes == {"auto", "off"}:
        raise SystemExit("--kv-events: 'auto' and 'off' exclude each other")
    router = Router(model=args.served_model_name or args.model, tokenizer=tokenizer,
                    policy=build_policy(args), predicted_ttl=args.predicted_ttl, kv_events_auto="auto" in modes,
                    events_silence=args.kv_events_silence)
    kv = {url: (endpoint, replay)
          for url, endpoint, replay in map(parse_kv_source, [m for m in args.kv_events if m not in modes])}
    backends = _split_list(args.backends)
    unknown = set(kv) - {b.rstrip("/") for b in backends}
    if unknown:
        raise SystemExit(f"--kv-events names backends not in --backends: {', '.join(sorted(unknown))}")
    for url in backends:
        endpoint, replay = kv.get(url.rstrip("/"), (None, None))
        router.add_backend(url, endpoint, replay)
    return Proxy(router, ProxyConfig(max_body_bytes=args.max_body_bytes, max_attempts=args.max_attempts,
                                     request_timeout=args.request_timeout, health_interval=args.health_interval,
                                     startup_wait=args.startup_wait, api_key=args.api_key,
                                     admin_key=args.admin_key, backend_api_key=args.backend_api_key,
                                     max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                                     admin_open=args.admin_open, probe_timeout=args.probe_timeout,
                                     first_byte_timeout=args.first_byte_timeout,
                                     stream_idle_timeout=args.stream_idle_timeout),
                 discovery=lambda r: start_discovery(args, r))


def _setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: on a proxy that is one line per forwarded request and health probe.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _uvicorn_kwargs(args: argparse.Namespace) -> dict:
    # No Server/Date headers of our own: relayed responses carry the backend's. No X-Forwarded-* rewriting of the
    # client address either: nothing here reads it, and the middleware runs on every request.
    return {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
            "timeout_graceful_shutdown": args.drain_timeout, "server_header": False, "date_header": False,
            "proxy_headers": False}


def worker_app():  # noqa: ANN201 (an ASGI app)
    """uvicorn factory for --workers N, run in each worker process."""
    args = build_parser().parse_args(json.loads(os.environ[ENV_ARGV]))
    _setup_logging(args)
    app = build_proxy(args).app()
    tune_gc()
    return app


def tune_gc() -> None:
    """Freeze what start-up built (tokenizer, policy tables) and collect the young generation 28x less often.

    Routing allocates many short-lived containers per request. Under 32 clients (benchmarks.overhead, timed with
    gc.callbacks) the default thresholds spent ~6% of the router's CPU in the collector. That included full
    collections of ~190 ms, each of which stalls every request in flight. With this, the collector ran once in
    12 s. Reference counting still frees everything acyclic at once; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


@contextlib.contextmanager
def _multiprocess_metrics_dir() -> Iterator[None]:
    """prometheus_client's multiprocess mode (counters shared through files in this directory); the workers
    read the variable when they import prometheus_client."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="preble-router-metrics-") as d:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


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
    with _multiprocess_metrics_dir():
        uvicorn.run("preble_router.cli:worker_app", factory=True, workers=args.workers, **_uvicorn_kwargs(args))


if __name__ == "__main__":
    sys.exit(main())
