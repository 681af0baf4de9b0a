"""Plain vLLM against vLLM with Preble's local scheduler (vllm_patches), both behind the router (preble policy).

    python -m benchmarks.plugin_compare [--requests 40] [--rate 0.8] [--max-num-seqs N] [--max-wait-s 10]
                                        [--mode together|sequential]

Same as the demo (benchmarks/demo.py): two vLLM CPU replicas of the small model, KV cache capped, the demo's
prefix-sharing workload (tool use, agents, long documents) replayed open loop through `preble-router
--policy preble`. Two variants on fresh replicas: vLLM's own FCFS scheduler, and `--scheduler-cls
vllm_patches.scheduler.PrebleScheduler` (cache-hit priority groups + age bound); same flags otherwise.

--mode together (default) runs both variants at the same time, each replica pair pinned to the same two
cores (replica i of each variant on core i), the same workload sent to both routers at once: on a shared
machine whose speed drifts, both see the same contention. --mode sequential runs one after the other
(each alone, but at different moments). Prints average / p50 / p99 latency and TTFT per variant, the median
time per output token (a check that both ran at the same machine speed), and for the plugin variant the
admissions per cache-hit group and the longest queue wait reported by each replica's `GET /preble/load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import engine_metrics
from benchmarks.demo import prepare_run
from benchmarks.loadgen import live_summary, run_load, run_load_sync
from benchmarks.report import print_table
from benchmarks.vllm_replicas import start_replicas
from testkit.router_process import router_argv, start_router
from vllm_patches.launch import plugin_args, plugin_env

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def variant(name: str, model: Path, *, args, out: Path, plugin: bool):
    """Two replicas and a preble-policy router; yields (router url, replicas)."""
    extra = ["--enable-per-request-metrics"]
    env = None
    if plugin:
        extra = plugin_args()
        env = plugin_env(tempfile.mkdtemp(prefix="preble-plugin-"), max_wait_s=args.max_wait_s)
    if args.max_num_seqs:
        extra += ["--max-num-seqs", str(args.max_num_seqs)]
    max_len = 8192 if args.model_size == "small" else 4096
    with start_replicas(model, 2, block_size=32, num_gpu_blocks=args.num_gpu_blocks, max_model_len=max_len,
                        log_dir=out / name, extra_args=extra, env=env, ready_timeout=300) as replicas:
        argv = router_argv(replicas, model, policy="preble", extra=["--time-profile", "tiny-cpu"])
        with start_router(argv, log_path=out / name / "router.log") as url:
            print(f"== {name}: router {url}, replicas {[r.url for r in replicas]}", flush=True)
            yield url, replicas


def summarize_variant(name: str, records, replicas, wall: float, out: Path) -> dict:
    summary = live_summary(records)
    summary.update(label=name, wall_s=round(wall, 1))
    with contextlib.suppress(httpx.HTTPError):
        # since the replicas started: each variant runs on replicas of its own
        summary.update(engine_metrics.scrape(replicas).mean_times())
    tpots = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
             for r in records if len(r.get("token_times") or []) > 2]
    summary["tpot_median_ms"] = round(1000 * statistics.median(tpots), 2) if tpots else None
    loads = []
    for rep in replicas:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(rep.url + "/preble/load", timeout=10)
            if r.status_code == 200:
                loads.append(r.json())
    if loads:
        summary["admitted_by_group"] = [sum(x) for x in zip(*(ld["admitted_by_group"] for ld in loads))]
        summary["admitted_aged"] = sum(ld["admitted_aged"] for ld in loads)
        summary["max_waited_s"] = max(ld["max_waited_s"] for ld in loads)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return summary


async def _load_both(requests, urls: list[str]) -> tuple[list[list[dict]], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(run_load(requests, url, progress=False) for url in urls))
    return list(results), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=0.8, help="requests per second (Poisson)")
    ap.add_argument("--num-gpu-blocks", type=int, default=384, help="KV-cache cap per replica, in 32-token blocks")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="vLLM --max-num-seqs for both variants")
    ap.add_argument("--max-wait-s", type=float, default=10.0, help="the plugin's age bound (PREBLE_MAX_WAIT_S)")
    ap.add_argument("--model-size", default="small", choices=["tiny", "small"])
    ap.add_argument("--variants", default="vllm,preble-plugin")
    ap.add_argument("--mode", choices=["together", "sequential"], default="together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "plugin_compare"))
    args = ap.parse_args(argv)

    out, model, max_len, requests = prepare_run(args.out, args.model_size, args.requests, args.rate, args.seed)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = []
    if args.mode == "together":
        with contextlib.ExitStack() as stack:
            started = [stack.enter_context(variant(n, model, args=args, out=out, plugin=n != "vllm")) for n in names]
            records, wall = asyncio.run(_load_both(requests, [url for url, _ in started]))
            for n, (_, replicas), recs in zip(names, started, records):
                results.append(summarize_variant(n, recs, replicas, wall, out))
    else:
        for n in names:
            with variant(n, model, args=args, out=out, plugin=n != "vllm") as (url, replicas):
                t0 = time.perf_counter()
                recs = run_load_sync(requests, url, progress=False)
                results.append(summarize_variant(n, recs, replicas, time.perf_counter() - t0, out))
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print_table(results, title=f"plugin_compare ({args.mode}): {len(requests)} requests at {args.rate}/s, "
                               f"2 vLLM CPU replicas per variant, router policy preble")
    for s in results:
        line = (f"{s['label']:>14}: latency avg {s.get('latency_avg') or float('nan'):.3f}s "
                f"p99 {s.get('latency_p99') or float('nan'):.3f}s | ttft avg {s.get('ttft_avg') or float('nan'):.3f}s "
                f"p99 {s.get('ttft_p99') or float('nan'):.3f}s | tpot median {s.get('tpot_median_ms')} ms "
                f"| engine avg: queued {s.get('engine_queue_avg_s')}s, prefill {s.get('engine_prefill_avg_s')}s, "
                f"decode {s.get('engine_decode_avg_s')}s | errors {s.get('errors', 0)}")
        if "admitted_by_group" in s:
            line += (f" | admitted by group {s['admitted_by_group']} aged {s['admitted_aged']}, "
                     f"longest queue wait {s['max_waited_s']}s")
        print(line)
    print(f"records and logs: {out}")
    return 1 if any(s.get("errors") for s in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
