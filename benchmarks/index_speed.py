"""Cache-index speed on the request path: match() + record_routed() per request, in-process (no HTTP).

    python -m benchmarks.index_speed [--requests 20000] [--rate 1000] [--blocks 183] [--shared 150]

Prompts of `--blocks` blocks (the overhead benchmark's ~3000 words at 32 tokens a block) share one of four
`--shared`-block prefixes, as in benchmarks/overhead.py, and go to two backends in turn, `--rate` requests per
simulated second. Two modes:
- kv-events: blocks count as held through the router's own TTL predictions (what a burst relies on before the
  engine's BlockStored events arrive; the slowest case, since nothing is confirmed yet);
- estimated: backends without KV events (an LRU of what was routed, in 16-block prompt windows, bounded by
  capacity).
Prints the best of --repeats passes in microseconds per request (this machine is noisy: compare within a run).
"""

from __future__ import annotations

import argparse
import random
import time

from preble_router.cache_index import CacheIndex


def run(mode: str, requests: int, rate: float, blocks: int, shared: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    index = CacheIndex(predicted_ttl=3.0)
    for b in (0, 1):
        index.add_backend(b, model="m", estimated=mode == "estimated", capacity_blocks=4096)
    prefixes = [[rng.getrandbits(64) for _ in range(shared)] for _ in range(4)]
    prompts = [p + [rng.getrandbits(64) for _ in range(blocks - shared)] for p in prefixes for _ in range(64)]
    now, step = 0.0, 1.0 / rate
    start = time.perf_counter()
    for i in range(requests):
        now += step
        keys = prompts[i % len(prompts)]
        held = index.match(keys, (0, 1), now)
        index.record_routed(i % 2, keys, now, held[i % 2])  # as the router does: what match() found there
    return (time.perf_counter() - start) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--blocks", type=int, default=183)
    ap.add_argument("--shared", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    for mode in ("kv-events", "estimated"):
        best = min(run(mode, a.requests, a.rate, a.blocks, a.shared) for _ in range(a.repeats))
        print(f"{mode:10s} match + record_routed: {best:6.1f} us per request "
              f"({a.blocks} blocks, {a.shared} shared, {a.rate:g} req/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
