"""Bytes per cached block in the router's cache index, fed like vLLM's KV events feed it.

    python -m benchmarks.index_memory [--blocks 200000] [--backends 2]

Stores `blocks` distinct blocks per backend as BlockStored events (chains of 64 blocks, 16 tokens each),
measures the index's memory with tracemalloc, then removes them all and checks it returns to empty.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

from preble_router.cache_index import CacheIndex


def events(backend_seed: int, chains: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(engine hashes, token ids) of `chains` BlockStored events of 64 blocks each."""
    rng = random.Random(backend_seed)
    return [([rng.getrandbits(64) for _ in range(64)], [rng.randrange(32000) for _ in range(64 * block_size)])
            for _ in range(chains)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=200_000, help="distinct blocks per backend")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--shared", action="store_true", help="every backend stores the same blocks")
    args = ap.parse_args(argv)
    block_size, chains = 16, args.blocks // 64
    index = CacheIndex()
    for b in range(args.backends):
        index.add_backend(b, model="m", estimated=False, capacity_blocks=None)
    applied_s, growth = 0.0, 0
    tracemalloc.start()
    for b in range(args.backends):
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        batch = events(0 if args.shared else b, chains, block_size)
        started = time.perf_counter()
        for engine, tokens in batch:
            index.apply_stored(b, engine, None, tokens, block_size, None, None)
        applied_s += time.perf_counter() - started
        del batch, engine, tokens  # what survives is what the index keeps (its dicts and the hashes it holds)
        gc.collect()
        growth += tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    cached = sum(index.blocks_held(b) for b in range(args.backends))
    print(f"cached blocks (backend x block): {cached:,}; distinct keys: {len(index):,}")
    print(f"index memory: {growth / cached:.1f} bytes per cached block")
    print(f"applied {cached / applied_s:,.0f} stored blocks/s (hashing their token ids included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
