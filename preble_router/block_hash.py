"""The router's own chained block keys.

Each full block of token ids gets a key that chains on the previous block's key, so equal keys mean equal
prefixes (as in vLLM's prefix cache). The chain's root depends on the model, the LoRA adapter and the
cache_salt, so requests that vLLM would never share a cache entry between never match here either.
We hash with xxh3 rather than reproduce the engine's hash: routing then survives any change of the engine's
hash algorithm or seed (the engine's hashes are kept only to apply its removals).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

import xxhash

_ROOT_SEED = 0x5052_4542_4C45  # "PREBLE": any fixed value; only equality within one router fleet matters.


def chain_root(model: str, lora: str | None = None, cache_salt: str | None = None) -> int:
    """The parent key of block 0 for one (model, adapter, salt) namespace."""
    namespace = f"{model}\x00{lora or ''}\x00{cache_salt or ''}".encode()
    return xxhash.xxh3_64_intdigest(namespace, seed=_ROOT_SEED)


def _as_u32_view(token_ids: Sequence[int]) -> memoryview:
    # The tokenizer hands out array("I") (read as is); a list costs a conversion (~8 ns a token).
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return memoryview(token_ids)
    return memoryview(array("I", token_ids))


def _chain(data: memoryview, first_block: int, n_full: int, block_size: int, parent: int, keys: list[int]) -> None:
    """Append the keys of blocks first_block..n_full-1 of data to keys, chained from parent."""
    # One copy of the blocks to hash as bytes, then a bytes slice a block: cheaper than a memoryview slice, whose
    # buffer export each hash call pays. Binding the hash function once saves an attribute lookup a block.
    raw = data[first_block * block_size : n_full * block_size].tobytes()
    xxh3 = xxhash.xxh3_64_intdigest
    append = keys.append
    step = block_size * data.itemsize
    for start in range(0, len(raw), step):
        parent = xxh3(raw[start : start + step], parent)
        append(parent)


def hash_blocks(token_ids: Sequence[int], block_size: int, parent: int) -> list[int]:
    """Keys of every full block of token_ids, chained from parent. The partial tail is never hashed."""
    n_full = len(token_ids) // block_size
    keys: list[int] = []
    if n_full:
        _chain(_as_u32_view(token_ids), 0, n_full, block_size, parent, keys)
    return keys


class BlockKeyCache:
    """hash_blocks with a memory of recent prompt prefixes: prompts that share a long prefix (the case this
    router exists for) hash only what follows it.

    Keys are remembered in segments of SEGMENT_BLOCKS blocks. A segment is found by a 128-bit digest of
    (parent, block size, every token up to the segment's end), so a hit means the whole prefix is the same and
    so are its keys. One streaming digest pass over the prompt costs about what hashing two blocks does.
    Bounded: at most max_segments segments (about 0.7 KB each), least recently used dropped first.
    """

    SEGMENT_BLOCKS = 16

    def __init__(self, max_segments: int = 16384) -> None:
        self.max_segments = max_segments
        self._segments: OrderedDict[int, list[int]] = OrderedDict()
        self.hit_blocks = 0
        self.hashed_blocks = 0

    def __len__(self) -> int:
        return len(self._segments)

    def keys(self, token_ids: Sequence[int], block_size: int, parent: int) -> list[int]:
        """Exactly hash_blocks(token_ids, block_size, parent)."""
        n_full = len(token_ids) // block_size
        seg_blocks = self.SEGMENT_BLOCKS
        if n_full < seg_blocks:
            return hash_blocks(token_ids, block_size, parent)
        data = _as_u32_view(token_ids)
        seg_tokens = seg_blocks * block_size
        digest = xxhash.xxh3_128(block_size.to_bytes(4, "little"), seed=parent)
        segments = self._segments
        keys: list[int] = []
        missed: list[tuple[int, int]] = []  # (segment number, digest) to remember once the keys are known
        for s in range(n_full // seg_blocks):
            digest.update(data[s * seg_tokens : (s + 1) * seg_tokens])
            d = digest.intdigest()
            if not missed:
                seg = segments.get(d)
                if seg is not None:
                    segments.move_to_end(d)
                    keys += seg
                    continue
            missed.append((s, d))
        self.hit_blocks += len(keys)
        self.hashed_blocks += n_full - len(keys)
        _chain(data, len(keys), n_full, block_size, keys[-1] if keys else parent, keys)
        for s, d in missed:
            segments[d] = keys[s * seg_blocks : (s + 1) * seg_blocks]
        while len(segments) > self.max_segments:
            segments.popitem(last=False)
        return keys
