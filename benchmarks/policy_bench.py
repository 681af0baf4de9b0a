"""Policy micro-benchmark: microseconds per routing decision as the policies' history windows fill.

    python -m benchmarks.policy_bench [--policies preble,cache_aware] [--rates 100,1000,10000]
        [--max-decisions 60000] [--segments 6] [--duration S] [--seed 0] [--out runs/policy_bench.json]
    preble-bench policy-bench ...   (the same flags)

No HTTP and no engines: every registered policy (preble_router.policies.POLICIES) drives the real
``preble_router.router.Router`` (model "bench", no tokenizer, 4 backends routed on the estimated index, block
size 16, the simulator's default KV capacity) on a simulated clock. Request i arrives at i / rate simulated
seconds; its prompt is one of 200 shared prefixes (1-2k tokens, Zipf a=1.1) plus a unique ~100-token suffix.
What is timed (perf_counter_ns) is the request path's routing cost, ``router.decide`` + ``router.dispatch``.
The rest of each request's life runs on the simulated clock, untimed, in time order (a heap): first token
0.2-0.5 s after dispatch (``router.first_token``), finish 1-2 s after that (``router.finish``).

Each (policy, rate) cell runs for --duration simulated seconds (default 1.5 x the longest policy window, so
the windows fill) or --max-decisions decisions, whichever is fewer, cut into --segments equal segments. Per
cell it prints the median us per decision of each segment (growth with the window shows left to right);
then a table: the last segment's median per rate, last/first segment (worst rate) and max-rate/min-rate (last
segments), and whether the policy is flat within 20% on both. Wall times are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim import SimConfig, available_policies
from benchmarks.workloads import DEFAULT_VOCAB, RESERVED_IDS, segment_tokens
from preble_router.load import InFlight
from preble_router.policies import Policy, make_policy
from preble_router.router import BlockSource, PreparedRequest, Router

FLAT = 1.2  # the target: last/first segment and max-rate/min-rate within 20%
DEFAULT_WINDOW = 180.0  # used when no policy exposes config.window (PrebleConfig's H)
LONG = 5000  # decisions from which a cell shows a progress bar and starts from a collected heap


class SimClock:
    """The router's clock: simulated seconds, advanced by the benchmark."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def history_window(policy: Policy) -> float | None:
    """The policy's history window in seconds (config.window), if it has one."""
    window = getattr(getattr(policy, "config", None), "window", None)
    return float(window) if isinstance(window, (int, float)) else None


def build_router(policy: Policy, clock: SimClock, backends: int) -> Router:
    """A Router as the simulator sets one up, but with estimated backends (no KV events)."""
    cfg = SimConfig(gpus=backends, block_size=16)
    router = Router(model="bench", tokenizer=None, policy=policy, predicted_ttl=cfg.predicted_ttl,  # type: ignore[arg-type]
                    clock=clock)
    for i in range(cfg.gpus):
        router.add_backend(f"http://bench-{i}:8000", blocks=BlockSource.ESTIMATED, block_size=cfg.block_size,
                           capacity_blocks=cfg.capacity(), healthy=True)
    return router


class Prompts:
    """Token-id prompts: a Zipf-chosen shared prefix (1-2k tokens) + a unique suffix (~100 tokens)."""

    def __init__(self, seed: int, prefixes: int = 200, zipf_a: float = 1.1, vocab: int = DEFAULT_VOCAB) -> None:
        self.rng = np.random.default_rng(seed)
        lengths = self.rng.integers(1000, 2001, size=prefixes)
        self.prefixes = [array("I", segment_tokens(seed, f"bench-prefix-{i}", int(n), vocab).astype(np.uint32).tobytes())
                         for i, n in enumerate(lengths)]
        p = np.arange(1, prefixes + 1, dtype=float) ** -zipf_a
        self.probs = p / p.sum()
        self.vocab = vocab

    def draw(self, n: int) -> list[tuple[array, int]]:
        """n (prompt, output tokens) pairs."""
        which = self.rng.choice(len(self.prefixes), size=n, p=self.probs)
        suffix_len = self.rng.integers(80, 121, size=n)
        outputs = self.rng.integers(16, 257, size=n)
        out = []
        for w, s, o in zip(which, suffix_len, outputs):
            suffix = self.rng.integers(RESERVED_IDS, self.vocab, size=int(s), dtype=np.uint32)
            out.append((self.prefixes[w] + array("I", suffix.tobytes()), int(o)))
        return out


def run_cell(policy_name: str, rate: float, decisions: int, *, segments: int, seed: int, backends: int = 4,
             prefixes: int = 200, progress: bool = True) -> dict[str, Any]:
    """Time `decisions` decide+dispatch calls at `rate` per simulated second; per-segment statistics."""
    clock = SimClock()
    policy = make_policy(policy_name)
    router = build_router(policy, clock, backends)
    prompts = Prompts(seed, prefixes)
    rng = np.random.default_rng(seed + 1)
    to_first = rng.uniform(0.2, 0.5, size=decisions)
    to_finish = rng.uniform(1.0, 2.0, size=decisions)
    events: list[tuple[float, int, int, PreparedRequest, InFlight, int]] = []  # (t, seq, kind 0/1, ...)
    ns = np.empty(decisions, dtype=np.int64)
    bar = None
    if progress and decisions >= LONG:
        from tqdm import tqdm

        bar = tqdm(total=decisions, desc=f"{policy_name}@{rate:g}/s", unit="dec", mininterval=0.5, file=sys.stderr)
    batch = 2000  # prompts drawn a batch at a time: memory stays flat
    pending: list[tuple[array, int]] = []
    if decisions >= LONG:
        gc.collect()  # the previous cell's cycles: not inside this one's timings
    wall = time.perf_counter()
    perf = time.perf_counter_ns
    for i in range(decisions):
        t = i / rate
        while events and events[0][0] <= t:  # the simulated lives of earlier requests, in time order
            te, seq, kind, prepared, inflight, output = heapq.heappop(events)
            clock.now = te
            if kind == 0:
                router.first_token(inflight)
                heapq.heappush(events, (te + float(to_finish[seq]), seq, 1, prepared, inflight, output))
            else:
                router.finish(prepared, inflight, ok=True, output_tokens=output)
        clock.now = t
        if not pending:
            pending = prompts.draw(min(batch, decisions - i))[::-1]
        tokens, output = pending.pop()
        prepared = router.prepare_tokens(tokens, max_tokens=output)
        start = perf()
        decision = router.decide(prepared)
        assert decision is not None
        inflight = router.dispatch(prepared, decision)
        ns[i] = perf() - start
        heapq.heappush(events, (t + float(to_first[i]), i, 0, prepared, inflight, output))
        if bar is not None and i % 1000 == 999:
            bar.update(1000)
    wall_s = time.perf_counter() - wall
    if bar is not None:
        bar.update(decisions - bar.n)
        bar.close()
    segs = []
    for idx in np.array_split(np.arange(decisions), segments):
        if not len(idx):
            continue
        us = ns[idx] / 1000.0
        segs.append({"first_decision": int(idx[0]), "last_decision": int(idx[-1]),
                     "sim_t_end": float(idx[-1] / rate), "median_us": float(np.median(us)),
                     "mean_us": float(us.mean()), "p99_us": float(np.percentile(us, 99))})
    return {"policy": policy_name, "rate": rate, "decisions": decisions, "sim_seconds": decisions / rate,
            "window_s": history_window(policy), "wall_s": wall_s, "segments": segs,
            "first_median_us": segs[0]["median_us"], "last_median_us": segs[-1]["median_us"],
            "growth": segs[-1]["median_us"] / segs[0]["median_us"]}


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy: last-segment medians by rate, worst last/first growth, max-rate/min-rate, flat or not."""
    out: dict[str, dict[str, Any]] = {}
    for policy in dict.fromkeys(c["policy"] for c in cells):
        mine = sorted((c for c in cells if c["policy"] == policy), key=lambda c: c["rate"])
        growth = max(c["growth"] for c in mine)
        rate_ratio = mine[-1]["last_median_us"] / mine[0]["last_median_us"]
        out[policy] = {"last_median_us": {f"{c['rate']:g}": c["last_median_us"] for c in mine},
                       "growth": growth, "rate_ratio": rate_ratio,
                       "flat": bool(growth <= FLAT and rate_ratio <= FLAT)}
    return out


def format_table(summary: dict[str, dict[str, Any]], rates: Sequence[float]) -> str:
    cols = [f"{r:g}/s" for r in rates]
    head = f"{'policy':<14}" + "".join(f"{c:>11}" for c in cols) + f"{'last/first':>12}{'max/min rate':>14}  flat<=20%"
    lines = ["us per decision (median of the last segment), decide + dispatch", head, "-" * len(head)]
    for policy, s in summary.items():
        vals = "".join(f"{s['last_median_us'].get(f'{r:g}', float('nan')):>11.1f}" for r in rates)
        lines.append(f"{policy:<14}{vals}{s['growth']:>12.2f}{s['rate_ratio']:>14.2f}  "
                     f"{'yes' if s['flat'] else 'NO'}")
    return "\n".join(lines)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.policy_bench", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=None,
                   help=f"Comma-separated policies (default: all registered: {','.join(available_policies())}).")
    p.add_argument("--rates", type=_floats, default=[100.0, 1000.0, 10000.0],
                   help="Comma-separated decisions per simulated second.")
    p.add_argument("--max-decisions", type=int, default=60_000, help="Cap on decisions per (policy, rate) cell.")
    p.add_argument("--duration", type=float, default=None,
                   help=f"Simulated seconds per cell (default: 1.5 x the longest policy window, else {DEFAULT_WINDOW:g}).")
    p.add_argument("--segments", type=int, default=6, help="Segments per cell (first ... last).")
    p.add_argument("--backends", type=int, default=4, help="Backends behind the router.")
    p.add_argument("--prefixes", type=int, default=200, help="Shared prefixes (Zipf a=1.1).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", default=None, help="Write the cells and the summary to this JSON file.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = args.policies.split(",") if args.policies else sorted(available_policies(), key=lambda n: n != "preble")
    windows = [w for w in (history_window(make_policy(n)) for n in names) if w]  # make_policy: fails on a typo
    duration = args.duration if args.duration is not None else 1.5 * (max(windows) if windows else DEFAULT_WINDOW)
    rates = sorted(args.rates)
    cells = []
    for name in names:
        for rate in rates:
            n = max(args.segments, min(args.max_decisions, int(round(duration * rate))))
            cell = run_cell(name, rate, n, segments=args.segments, seed=args.seed, backends=args.backends,
                            prefixes=args.prefixes, progress=not args.no_progress)
            cells.append(cell)
            segs = " ".join(f"{s['median_us']:8.1f}" for s in cell["segments"])
            print(f"{name:>12} @ {rate:>7g}/s  {n:>6} decisions over {cell['sim_seconds']:7.1f} sim s "
                  f"(wall {cell['wall_s']:5.1f} s)  median us per segment: {segs}", flush=True)
    summary = summarize(cells)
    print()
    print(format_table(summary, rates))
    result = {"config": {"policies": names, "rates": rates, "duration_s": duration,
                         "max_decisions": args.max_decisions, "segments": args.segments, "backends": args.backends,
                         "prefixes": args.prefixes, "seed": args.seed, "flat_target": FLAT},
              "cells": cells, "summary": summary}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as exc:  # an unknown policy name
        print(f"policy_bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
