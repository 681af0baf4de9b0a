"""The demo: real vLLM CPU replicas behind the router, one prefix-sharing workload, a table per policy.

    python -m benchmarks.demo [--policies round_robin,cache_aware,preble] [--requests 60] [--rate 0.8]

Builds a small random-weight model offline (~40 MB: a 4k-token prefill takes ~2 s on one core, so cache
hits show in latency), starts two vLLM replicas (one core each, KV events over ZMQ, KV cache capped so
eviction happens), then for each policy starts a fresh `preble-router`, empties both prefix caches, replays
the same workload (Zipf-popular tool prompts, multi-step agent histories, long documents) open loop, and
prints hit rate, latency and time to first token. Same replicas, same requests, one run: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from benchmarks.arrivals import poisson
from benchmarks.loadgen import live_summary, run_load_sync
from benchmarks.report import print_table
from benchmarks.vllm_replicas import start_replicas
from benchmarks.workloads import generate, with_arrivals
from testkit.router_process import router_argv, start_router
from testkit.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def demo_workload(n: int, rate: float, *, max_prompt: int, seed: int = 0, vocab: int = 2048):
    """Tool use (Zipf-popular prefixes), agents (growing histories) and long documents, shrunk to fit."""
    requests = generate("mix", n, seed=seed, scale=0.2, output_scale=0.5, vocab=vocab,
                        components="tool_use:0.4,embodied_agent:0.3,long_doc_qa:0.3")
    for r in requests:
        r.output_tokens = max(4, min(int(r.output_tokens), 32))
        if r.prompt_tokens > max_prompt:  # keep the (shared) front, cut the tail
            r.token_ids = r.tokens[:max_prompt]
    return with_arrivals(requests, poisson(len(requests), rate, seed=seed))


def prepare_run(out_dir: str, model_size: str, n: int, rate: float, seed: int, *, headroom: int = 64):
    """The live benchmarks' common setup: output folder, model (built offline), workload that fits it.
    Returns (out, model, max_model_len, requests); `headroom` tokens are left for the output."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(ROOT / ".cache" / "models" / model_size, size=model_size)
    max_len = 8192 if model_size == "small" else 4096
    requests = demo_workload(n, rate, max_prompt=max_len - headroom, seed=seed)
    print(f"workload: {len(requests)} requests, {sum(r.prompt_tokens for r in requests)} prompt tokens, "
          f"rate {rate}/s; model {model}")
    return out, model, max_len, requests


def reset_caches(replicas) -> None:
    """Empty each replica's prefix cache; a 1-token request makes the engine step and publish the event."""
    for rep in replicas:
        httpx.post(rep.url + "/reset_prefix_cache", timeout=30).raise_for_status()
        httpx.post(rep.url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 1},
                   timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="round_robin,cache_aware,preble")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=0.8, help="requests per second (Poisson)")
    ap.add_argument("--num-gpu-blocks", type=int, default=384, help="KV-cache cap per replica, in 32-token blocks")
    ap.add_argument("--model-size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    args = ap.parse_args(argv)

    out, model, max_len, requests = prepare_run(args.out, args.model_size, args.requests, args.rate, args.seed)
    results: dict[str, dict] = {}
    with start_replicas(model, 2, block_size=32, num_gpu_blocks=args.num_gpu_blocks, max_model_len=max_len,
                        log_dir=out) as replicas:
        for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
            reset_caches(replicas)
            argv_ = router_argv(replicas, model, policy=policy, extra=["--time-profile", f"{args.model_size}-cpu"])
            with start_router(argv_, log_path=out / f"router-{policy}.log") as url:
                print(f"\n== {policy}: {url}")
                started = time.perf_counter()
                records = run_load_sync(requests, url)
                summary = live_summary(records)
                summary["label"] = policy
                summary["wall_s"] = round(time.perf_counter() - started, 1)
                results[policy] = summary
                (out / f"{policy}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print_table(list(results.values()), title=f"demo: {len(requests)} requests at {args.rate}/s on 2 vLLM CPU replicas")
    print(f"records and logs: {out}")
    failed = sum(s.get("errors", 0) for s in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
