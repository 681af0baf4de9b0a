"""Routers side by side on the same real vLLM CPU replicas, in one run: our policies, SGLang's router (`smg`,
cache_aware) and vllm-router (kv_aware, fed the replicas' KV events).

    python -m benchmarks.compare_routers [--routers preble,cache_aware,smg,vllm-router] [--requests 80] [--rounds 3]

Two replicas (one core each, KV cache capped so eviction happens, KV events over ZMQ), a prefix-sharing
workload (Zipf-popular tool prompts, multi-turn agent histories, long documents) sent as text so every
router tokenizes or matches it its own way, the same arrivals for each router, prefix caches emptied
between routers. Prints hit rate, latency and TTFT per router and writes a latency CDF. With --rounds N the
routers run N times (in reverse order every other round) and the table gives each metric's median over the
rounds: where the five documents land early can swing one run of a router by 2x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from benchmarks.demo import ROOT, prepare_run, reset_caches
from benchmarks.loadgen import live_summary, run_load_sync
from benchmarks.report import plot_latency_cdf, print_table
from benchmarks.vllm_replicas import start_replicas
from testkit.ports import free_port
from benchmarks.overhead import ProcStats
from testkit.router_process import router_argv, router_process, server_process

ONE_REPLICA = "one_replica"
OURS = {"preble", "cache_aware", "least_load", "round_robin", "lmetric", ONE_REPLICA}


def _binary(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def peer_command(name: str, replicas, model: Path, port: int) -> list[str]:
    urls = [r.url for r in replicas]
    metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    if name == "smg":
        return [_binary("smg") or "smg", "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                *urls, "--policy", "cache_aware", *metrics, "--log-level", "warn"]
    if name == "vllm-router":
        sources = [arg for r in replicas for arg in ("--kv-event-source", f"{r.url}={r.kv_endpoint}",
                                                      "--kv-event-replay-source", f"{r.url}={r.replay_endpoint}")]
        return [_binary("vllm-router") or "vllm-router", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                *urls, "--policy", "kv_aware", *sources, "--kv-event-block-size", "32", "--kv-event-model", "tiny",
                *metrics, "--log-level", "warning"]
    raise ValueError(f"unknown router {name!r}")


@contextlib.contextmanager
def start_peer(cmd: Sequence[str], port: int, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """(URL, process) of a peer router, once it serves a completion (its health endpoints differ)."""
    def serves(url: str) -> bool:
        return httpx.post(url + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "warm up", "max_tokens": 1}).status_code == 200

    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, url, serves, ready_timeout=90.0, log_path=log_path) as proc:
        yield url, proc


def warm_up(replicas, lengths: Sequence[int] = (256, 1024, 3072, 6144), vocab: int = 2048) -> None:
    """Run a few prompts of increasing length on each replica (then empty the caches): the first forward
    passes of each shape are slow on a fresh CPU engine, which would otherwise penalize whichever router
    runs first."""
    import random

    rng = random.Random(12345)
    for rep in replicas:
        for n in lengths:
            ids = [rng.randrange(16, vocab) for _ in range(n)]
            httpx.post(rep.url + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": ids, "max_tokens": 8, "ignore_eos": True})
    reset_caches(replicas)


def text_workload(args: argparse.Namespace) -> tuple[Path, Path, int, list]:
    """(out, model, max_model_len, requests) of the live workload, prompts as text that re-tokenizes to (about)
    the same ids, so shared prefixes stay shared for routers that match text."""
    out, model, max_len, requests = prepare_run(args.out, args.model_size, args.requests, args.rate, args.seed,
                                                headroom=200)  # re-tokenized text may run a little longer
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    for r in requests:
        r.text = tokenizer.decode(r.tokens[1:] if r.tokens and r.tokens[0] == tokenizer.bos_token_id else r.tokens)
    return out, model, max_len, requests


@contextlib.contextmanager
def live_replicas(model: Path, max_len: int, out: Path, num_gpu_blocks: int, pin: bool = False):
    """Two warmed-up vLLM CPU replicas with KV events over tcp and a capped KV cache (pin: start_replicas)."""
    with start_replicas(model, 2, block_size=32, num_gpu_blocks=num_gpu_blocks, max_model_len=max_len,
                        log_dir=out, kv_transport="tcp", pin=pin) as replicas:
        warm_up(replicas)
        yield replicas


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="preble,cache_aware,smg,vllm-router")
    ap.add_argument("--requests", type=int, default=200,
                    help="200 at 1.5/s: five ~5k-token documents (their working set fills both capped caches) "
                         "among tool and agent prompts; about 2.3 min per router")
    ap.add_argument("--rate", type=float, default=1.5,
                    help="requests per second (Poisson); 1.5/s keeps both replicas busy (2/s overloads them)")
    ap.add_argument("--num-gpu-blocks", type=int, default=384, help="KV-cache cap per replica, in 32-token blocks")
    ap.add_argument("--model-size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="run every router this many times; report medians")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one uncounted round-robin pass of the requests first (the first pass runs slower)")
    ap.add_argument("--router-log-level", default="info", help="our routers' log level (debug logs every decision)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    args = ap.parse_args(argv)
    out, model, max_len, requests = text_workload(args)
    routers = [name.strip() for name in args.routers.split(",") if name.strip()]
    (out / "params.json").write_text(json.dumps({  # what benchmarks.sim_vs_live needs to rebuild this run
        "requests": args.requests, "rate": args.rate, "seed": args.seed, "model_size": args.model_size,
        "num_gpu_blocks": args.num_gpu_blocks, "block_size": 32, "headroom": 200, "prompt_format": "text",
        "time_profile": f"{args.model_size}-cpu", "routers": routers}, indent=2))
    rounds: list[dict[str, dict]] = []
    records_by: dict[str, list[dict]] = {}
    with live_replicas(model, max_len, out, args.num_gpu_blocks) as replicas:
        if args.warmup:
            warm_up_pass(replicas, model, requests, args, out)
        for k in range(args.rounds):
            tag = f"-r{k + 1}" if args.rounds > 1 else ""
            summaries = {}
            for name in routers if k % 2 == 0 else routers[::-1]:  # alternate order: no router always goes first
                ran = run_router(name, replicas, model, requests, args, out, tag)
                if ran is None:
                    continue
                records = ran.records
                summary = live_summary(records)
                summary["router_cpu_ms_per_req"] = ran.router_cpu_ms_per_request
                summary["label"] = name
                summaries[name] = summary
                records_by.setdefault(name, []).extend(records)
                lines = "".join(json.dumps(r) + "\n" for r in records)
                (out / f"{name}{tag}.jsonl").write_text(lines)
                if k == 0 and tag:  # benchmarks.sim_vs_live replays <name>.jsonl: round 1
                    (out / f"{name}.jsonl").write_text(lines)
            rounds.append(summaries)
            if args.rounds > 1:
                print_table(list(summaries.values()), title=f"round {k + 1} of {args.rounds}")
                _print_ratio(summaries)
    summaries = rounds[0] if len(rounds) == 1 else _median_summaries(rounds, routers)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    medians = f", medians of {len(rounds)} rounds" if len(rounds) > 1 else ""
    print_table(list(summaries.values()), title=f"{len(requests)} requests at {args.rate}/s, 2 vLLM CPU replicas, "
                                                f"{args.num_gpu_blocks} blocks each{medians}")
    plot_latency_cdf(records_by, out / "latency_cdf.png", title="end-to-end latency per router")
    _print_ratio(summaries)
    return 1 if any(s.get("errors") for r in rounds for s in r.values()) else 0


def ours_variant(name: str) -> tuple[str, list[str]] | None:
    """(policy, extra flags) of one of our routers named `policy` or `policy+flag=value+...` (a variant: e.g.
    `preble+load-poll-interval=0` is `--policy preble --load-poll-interval 0`); None for a peer's name."""
    policy, *flags = name.split("+")
    if policy not in OURS:
        return None
    extra = []
    for flag in flags:
        key, _, value = flag.partition("=")
        extra += [f"--{key}", value] if value else [f"--{key}"]
    return policy, extra


@dataclass(slots=True)
class RouterPass:
    """One router's pass over a workload: the client's records, and the CPU seconds the router's processes used
    during it (None if unreadable). On this testbed the router shares the machine's cores with the replicas, so
    its CPU is time the engines may lose."""
    records: list[dict]
    router_cpu_s: float | None

    @property
    def router_cpu_ms_per_request(self) -> float | None:
        return self.router_cpu_s * 1e3 / len(self.records) if self.router_cpu_s is not None and self.records else None


def run_router(name: str, replicas, model: Path, requests, args: argparse.Namespace, out: Path,
               tag: str) -> RouterPass | None:
    """One router's pass over the workload on freshly emptied caches; None if it is missing or cannot start.
    name: one of our policies (or a variant of one: ours_variant), smg or vllm-router."""
    ours = ours_variant(name)
    if ours is None and _binary(name) is None:
        print(f"SKIP {name}: not installed (pip install '.[peers]')")
        return None
    reset_caches(replicas)
    if ours is not None:
        policy, extra = ours
        # one_replica: every request to the first replica, through our router (the concentration baseline: on a
        # cell where it wins, spreading load does not pay on this testbed)
        routed = replicas[:1] if policy == ONE_REPLICA else replicas
        policy = "round_robin" if policy == ONE_REPLICA else policy
        argv_ = router_argv(routed, model, policy=policy, extra=["--time-profile", f"{args.model_size}-cpu",
                                                                 "--log-level", args.router_log_level, *extra])
        ctx = router_process(argv_, log_path=out / f"router-{name}{tag}.log")
    else:
        port = free_port()
        ctx = start_peer(peer_command(name, replicas, model, port), port, out / f"router-{name}{tag}.log")
    try:
        with ctx as (url, proc):
            print(f"\n== {name}{tag}: {url}")
            stats = ProcStats(proc.pid)
            cpu0 = stats.cpu_seconds()
            records = run_load_sync(requests, url, model="tiny", prompt_format="text")
            cpu1 = stats.cpu_seconds()
            return RouterPass(records, cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
    except (RuntimeError, TimeoutError) as exc:  # a router that cannot start is reported, not fatal
        print(f"FAILED {name}: {exc}")
        return None


def warm_up_pass(replicas, model: Path, requests, args: argparse.Namespace, out: Path, label: str = "") -> None:
    """An uncounted pass of the workload through round robin. The first pass of a set of requests runs slower on
    these replicas than every later pass of the same requests, whatever the router (BENCHMARKS.md, session 24):
    without this, whichever router goes first pays for it (the caches are emptied again before each router)."""
    print(f"\n== warm-up pass{label} (round_robin, not counted)", flush=True)
    run_router("round_robin", replicas, model, requests, args, out, "-warmup")


def _median_summaries(rounds: list[dict[str, dict]], routers: Sequence[str]) -> dict[str, dict]:
    """Per router, the median of each numeric metric over the rounds it ran in; errors are summed."""
    out = {}
    for name in routers:
        runs = [r[name] for r in rounds if name in r]
        if not runs:
            continue
        merged: dict = {"label": name, "rounds": len(runs)}
        for key, value in runs[0].items():
            if key == "errors":
                merged[key] = sum(r.get(key) or 0 for r in runs)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                m = statistics.median(values) if values else None
                # counts stay counts (the median of two runs of 200 requests is 200, not 200.0)
                merged[key] = int(m) if m is not None and all(isinstance(v, int) for v in values) and m == int(m) else m
            elif key != "label":
                merged[key] = value
        out[name] = merged
    return out


def _print_ratio(summaries: dict[str, dict]) -> None:
    """preble's average and p99 latency over the best other router's (issue #5's yardstick)."""
    others = {k: v for k, v in summaries.items() if k != "preble" and v.get("latency_avg")}
    if "preble" not in summaries or not others:
        return
    best_avg = min(others, key=lambda k: others[k]["latency_avg"])
    best_p99 = min(others, key=lambda k: others[k]["latency_p99"])
    p = summaries["preble"]
    print(f"preble / best other: avg {p['latency_avg'] / others[best_avg]['latency_avg']:.2f}x ({best_avg}), "
          f"p99 {p['latency_p99'] / others[best_p99]['latency_p99']:.2f}x ({best_p99})")


if __name__ == "__main__":
    raise SystemExit(main())
