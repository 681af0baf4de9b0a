"""Several routers, one fleet (issue #16), live: the default router as one process, as `--workers 2`, and as two
router processes that each take every other request (alone, or told of each other with --peer-bind/--peers), on
the same real vLLM CPU replicas and requests.

    python -m benchmarks.multi_router [--requests 200] [--rate 1.5] [--rounds 2]

The workload, replicas and warm-up are compare_routers' (two replicas with KV events over ZMQ, KV capped so
eviction happens, a prefix-sharing mix of tool prompts, agent histories and long documents sent as text). Caches
are emptied before each configuration; with --rounds N the configurations run N times, in reverse order every
other round, and the table gives medians. Prints hit rate (vLLM's own cached tokens over prompt tokens) and
latency per configuration, and each one's ratio to the single process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
from pathlib import Path

from benchmarks.compare_routers import _median_summaries, live_replicas, text_workload
from benchmarks.demo import ROOT, reset_caches
from benchmarks.loadgen import live_summary, run_load_sync
from benchmarks.report import print_table
from testkit.ports import free_ports
from preble_router.router import FLEET_LOAD_POLL_S
from testkit.router_process import router_argv, start_router

# workers2: --workers 2 (peer sync between the workers, the default); workers2_nosync: the same with --peer-sync off;
# two_routers: two processes that know nothing of each other; two_peered: the same with --peer-bind/--peers.
CONFIGS = ("one", "workers2", "two_routers", "two_peered", "workers2_nosync")


def _run_config(name: str, replicas, model: Path, requests, args: argparse.Namespace, out: Path,
                tag: str) -> list[dict]:
    reset_caches(replicas)
    extra = ["--time-profile", f"{args.model_size}-cpu", "--log-level", args.router_log_level,
             *shlex.split(args.router_args)]
    base = router_argv(replicas, model, policy="preble", extra=extra)
    with contextlib.ExitStack() as stack:
        if name == "one":
            urls = [stack.enter_context(start_router(base, log_path=out / f"router-{name}{tag}.log"))]
        elif name in ("workers2", "workers2_nosync"):
            # Unpeered workers poll the engines' load, as the README tells routers that are not peered to.
            sync = ["--peer-sync", "off", "--load-poll-interval", str(FLEET_LOAD_POLL_S)] if name == "workers2_nosync" else []
            urls = [stack.enter_context(start_router([*base, "--workers", "2", *sync], ready_timeout=120.0,
                                                     log_path=out / f"router-{name}{tag}.log"))]
        elif name == "two_peered":
            ports = free_ports(2)
            peers = [f"tcp://127.0.0.1:{p}" for p in ports]
            urls = [stack.enter_context(start_router([*base, "--peer-bind", peers[i], "--peers", peers[1 - i]],
                                                     log_path=out / f"router-{name}{i}{tag}.log"))
                    for i in range(2)]
        else:
            fleet = [*base, "--load-poll-interval", str(FLEET_LOAD_POLL_S)]  # unpeered: as the README says
            urls = [stack.enter_context(start_router(fleet, log_path=out / f"router-{name}{i}{tag}.log"))
                    for i in range(2)]
        print(f"\n== {name}{tag}: {', '.join(urls)}")
        return run_load_sync(requests, urls, model="tiny", prompt_format="text")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="one,workers2,two_routers,two_peered",
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    ap.add_argument("--num-gpu-blocks", type=int, default=384, help="KV-cache cap per replica, in 32-token blocks")
    ap.add_argument("--model-size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--router-log-level", default="info", help="the routers' log level (debug logs every decision)")
    ap.add_argument("--router-args", default="", help="more router flags for every configuration, one string")
    ap.add_argument("--out", default=str(ROOT / "runs" / "multi_router"))
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs: {', '.join(sorted(unknown))}")
    out, model, max_len, requests = text_workload(args)
    rounds: list[dict[str, dict]] = []
    with live_replicas(model, max_len, out, args.num_gpu_blocks) as replicas:
        for k in range(args.rounds):
            tag = f"-r{k + 1}" if args.rounds > 1 else ""
            summaries = {}
            for name in configs if k % 2 == 0 else configs[::-1]:
                records = _run_config(name, replicas, model, requests, args, out, tag)
                summary = live_summary(records)
                summary["label"] = name
                summaries[name] = summary
                (out / f"{name}{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            rounds.append(summaries)
            if args.rounds > 1:
                print_table(list(summaries.values()), title=f"round {k + 1} of {args.rounds}")
    summaries = rounds[0] if len(rounds) == 1 else _median_summaries(rounds, configs)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    medians = f", medians of {len(rounds)} rounds" if len(rounds) > 1 else ""
    print_table(list(summaries.values()), title=f"preble, {len(requests)} requests at {args.rate}/s, 2 vLLM CPU "
                                                f"replicas, {args.num_gpu_blocks} blocks each{medians}")
    one = summaries.get("one")
    if one and one.get("latency_avg"):
        for name, s in summaries.items():
            if name != "one" and s.get("latency_avg"):
                print(f"{name} / one: avg {s['latency_avg'] / one['latency_avg']:.2f}x, hit rate "
                      f"{(s.get('hit_rate') or 0) - (one.get('hit_rate') or 0):+.3f}, errors {s.get('errors')}, "
                      f"tokens over-predicted {s.get('over_predicted_tokens')} (one: "
                      f"{one.get('over_predicted_tokens')}), under-predicted {s.get('under_predicted_tokens')} "
                      f"(one: {one.get('under_predicted_tokens')})")
    return 1 if any(s.get("errors") for r in rounds for s in r.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
