"""Bytes per cached block in the router's cache index, fed like vLLM's KV events feed it.

    python -m benchmarks.index_memory [--blocks 200000] [--backends 2] [--shared] [--churn-seconds 60]

Stores `blocks` distinct blocks per backend (or, with --shared, the same blocks on every backend) as BlockStored
events (chains of 64 blocks, 16 tokens each), measures the index's memory with tracemalloc, then times
match() on a 100-block prompt. With --churn-seconds it then keeps the index at that size for that long, each
backend storing new chains and removing its oldest (half of the new chains go to every backend, each hashing
them its own way, as vLLM processes seeded apart do), and prints every few seconds the bytes reachable from the
index (tracemalloc would slow the churn ~10x; the fill prints both measures, which agree).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
import types
from collections import deque

from preble_router.block_hash import chain_root, hash_blocks
from preble_router.cache_index import CacheIndex

BLOCK_SIZE, CHAIN = 16, 64


def events(backend_seed: int, chains: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(engine hashes, token ids) of `chains` BlockStored events of 64 blocks each."""
    rng = random.Random(backend_seed)
    return [([rng.getrandbits(64) for _ in range(CHAIN)], [rng.randrange(32000) for _ in range(CHAIN * block_size)])
            for _ in range(chains)]


def deep_size(root: object) -> int:
    """Bytes of the objects reachable from root, each counted once (classes, modules and code are shared, not
    counted): what the index keeps alive. Cheap enough to run untraced, unlike tracemalloc."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.CodeType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def match_latency(index: CacheIndex, backends: int) -> str:
    """match() of a 100-block prompt whose first `depth` blocks backend 0 holds (and backend 1 half as many)."""
    rng = random.Random(7)
    root, prompt = chain_root("m"), [rng.randrange(32000) for _ in range(100 * BLOCK_SIZE)]
    index.apply_stored(0, [rng.getrandbits(64) for _ in range(100)], None, prompt, BLOCK_SIZE, None, None)
    if backends > 1:
        index.apply_stored(1, [rng.getrandbits(64) for _ in range(50)], None, prompt[:50 * BLOCK_SIZE], BLOCK_SIZE,
                           None, None)
    out = []
    for depth in (100, 50, 8, 0):
        tail = [rng.randrange(32000) for _ in range((100 - depth) * BLOCK_SIZE)]
        keys = hash_blocks(prompt[:depth * BLOCK_SIZE] + tail, BLOCK_SIZE, root)
        ids = list(range(backends))
        best = float("inf")
        for _ in range(20):  # the best of 20 runs: the least disturbed by other processes
            started = time.perf_counter()
            for _ in range(200):
                index.match(keys, ids, 0.0)
            best = min(best, (time.perf_counter() - started) / 200)
        out.append(f"{best * 1e6:.1f} us ({depth} held)")
    return ", ".join(out)


def churn(index: CacheIndex, backends: int, chains: int, seconds: float, every: float) -> None:
    """Store and remove chains for `seconds` at a fixed live size; print the index's memory every `every` s."""
    rng = random.Random(99)
    live: list[deque[list[int]]] = [deque() for _ in range(backends)]  # per backend: engine hashes, oldest first

    def store(b: int, tokens: list[int]) -> None:
        engine = [rng.getrandbits(64) for _ in range(CHAIN)]
        index.apply_stored(b, engine, None, tokens, BLOCK_SIZE, None, None)
        live[b].append(engine)

    for b in range(backends):  # the fill's chains were not kept: start from fresh ones
        index.apply_cleared(b)
        for _ in range(chains):
            store(b, [rng.randrange(32000) for _ in range(CHAIN * BLOCK_SIZE)])
    cached = sum(index.blocks_held(b) for b in range(backends))
    print(f"churn: {cached:,} cached blocks live; per new chain each backend storing it drops its oldest")
    print(f"{'t (s)':>6} {'stored blocks/s':>16} {'turnover':>9} {'cached blocks':>14} {'index MB':>9} {'B/block':>8}")
    started = last = time.perf_counter()
    stored = total = 0
    while (now := time.perf_counter()) - started < seconds:
        tokens = [rng.randrange(32000) for _ in range(CHAIN * BLOCK_SIZE)]
        for b in range(backends) if rng.random() < 0.5 else [rng.randrange(backends)]:
            index.apply_removed(b, live[b].popleft())
            store(b, tokens)
            stored += CHAIN
        if now - last >= every:
            total += stored
            cached = sum(index.blocks_held(b) for b in range(backends))
            used = deep_size(index)
            print(f"{now - started:6.0f} {stored / (now - last):16,.0f} {total / cached:8.1f}x {cached:14,} "
                  f"{used / 1e6:9.2f} {used / cached:8.1f}", flush=True)
            last, stored = time.perf_counter(), 0


def new_index(backends: int) -> CacheIndex:
    index = CacheIndex()
    for b in range(backends):
        index.add_backend(b, model="m", estimated=False, capacity_blocks=None)
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=200_000, help="distinct blocks per backend")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--shared", action="store_true", help="every backend stores the same blocks")
    ap.add_argument("--churn-seconds", type=float, default=0.0, help="then store and remove at a fixed size")
    ap.add_argument("--report-every", type=float, default=5.0, help="seconds between churn reports")
    args = ap.parse_args(argv)
    chains = args.blocks // CHAIN
    batches = [events(0 if args.shared else b, chains, BLOCK_SIZE) for b in range(args.backends)]
    # Time a fill untraced (tracemalloc slows every allocation, and the index's probes allocate ints)...
    index = new_index(args.backends)
    started = time.perf_counter()
    for b, batch in enumerate(batches):
        for engine, tokens in batch:
            index.apply_stored(b, engine, None, tokens, BLOCK_SIZE, None, None)
    applied_s = time.perf_counter() - started
    # ...then measure one: what tracemalloc sees the index keep.
    index = new_index(args.backends)
    growth = 0
    tracemalloc.start()
    for b, batch in enumerate(batches):
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for engine, tokens in batch:
            index.apply_stored(b, engine, None, tokens, BLOCK_SIZE, None, None)
        gc.collect()
        growth += tracemalloc.get_traced_memory()[0] - base
    del batches
    tracemalloc.stop()
    cached = sum(index.blocks_held(b) for b in range(args.backends))
    print(f"cached blocks (backend x block): {cached:,}; distinct keys: {len(index):,}")
    print(f"index memory: {growth / cached:.1f} bytes per cached block ({deep_size(index) / cached:.1f} reachable)")
    print(f"applied {cached / applied_s:,.0f} stored blocks/s (hashing their token ids included; untraced)")
    if args.churn_seconds > 0:
        churn(index, args.backends, chains, args.churn_seconds, args.report_every)
    print(f"match() of a 100-block prompt: {match_latency(index, args.backends)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
