"""Several routers in front of one fleet, simulated (issue #16): one router against N routers (requests spread
round robin over them), with and without peer sync, on every Preble workload and several seeds.

    python -m benchmarks.multi_router_sim [--routers 4] [--gpus 8] [--requests 2000] [--seeds 0,1,2]

Each row gives a workload's average latency with one router and, per multi-router configuration, its ratio to
that (median over the seeds, then every seed) and its hit rate. The default policy throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import workloads as wl
from benchmarks.arrivals import make_arrivals
from benchmarks.sim import SimConfig, simulate
from preble_router.router import FLEET_LOAD_POLL_S

WORKLOADS = ("tool_use", "video_qa", "embodied_agent", "long_doc_qa", "program_generation")


def run_one(workload: str, seed: int, gpus: int, requests: int, routers: int, peer_sync: bool,
            policy: str) -> dict:
    reqs = wl.generate(workload, requests, seed=seed)
    rate = wl.DEFAULT_RATE_PER_GPU.get(workload, 5.0) * gpus
    wl.with_arrivals(reqs, make_arrivals("poisson", len(reqs), rate, seed))
    # Several routers poll the engines' load as the README tells routers that are not peered to.
    config = SimConfig(gpus=gpus, routers=routers, peer_sync=peer_sync,
                       load_poll_interval=FLEET_LOAD_POLL_S if routers > 1 else 0.0)
    s = simulate(reqs, policy, config).summary
    return {"latency_avg": s["latency_avg"], "hit_rate": s["hit_rate"], "errors": s["errors"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--routers", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--policy", default="preble")
    ap.add_argument("--configs", default="peer_sync,no_peer_sync", help="comma list: peer_sync, no_peer_sync")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    results: dict[str, dict] = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(w.strip(), seed) for w in args.workloads.split(",") for seed in seeds]
    bar = tqdm(total=len(jobs) * (1 + len(configs)), desc="sims", unit="sim") if tqdm else None
    for workload, seed in jobs:
        row = results.setdefault(workload, {"one": {}, **{c: {} for c in configs}})
        row["one"][seed] = run_one(workload, seed, args.gpus, args.requests, 1, False, args.policy)
        if bar:
            bar.update()
        for c in configs:
            row[c][seed] = run_one(workload, seed, args.gpus, args.requests, args.routers, c == "peer_sync",
                                   args.policy)
            if bar:
                bar.update()
    if bar:
        bar.close()
    print(f"\n{args.routers} routers over 1, {args.gpus} GPUs, {args.requests} requests, seeds {args.seeds}, "
          f"policy {args.policy}: average latency ratio (median; per seed) and hit rate")
    head = f"{'workload':20} {'one lat s':>9} " + " ".join(f"{c + ' ratio':>34}" for c in configs)
    print(head)
    for workload, row in results.items():
        one = row["one"]
        cells = []
        for c in configs:
            ratios = [row[c][s]["latency_avg"] / one[s]["latency_avg"] for s in seeds]
            row[c]["ratios"] = ratios
            hits = [row[c][s]["hit_rate"] - one[s]["hit_rate"] for s in seeds]
            cells.append(f"{statistics.median(ratios):6.3f} ({'/'.join(f'{r:.3f}' for r in ratios)}) "
                         f"hit {statistics.median(hits):+.3f}")
        print(f"{workload:20} {statistics.median(one[s]['latency_avg'] for s in seeds):9.3f} " + " ".join(
            f"{c:>34}" for c in cells))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
