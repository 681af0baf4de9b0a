"""The router's own chained block keys.

Each full block of token ids gets a key that chains on the previous block's key, so equal keys mean equal
prefixes (as in vLLM's prefix cache). The chain's root depends on the model, the LoRA adapter and the
cache_salt, so requests that vLLM would never share a cache entry between never match here either.
We hash with xxh3 rather than reproduce the engine's hash: routing then survives any change of the engine's
hash algorithm or seed (the engine's hashes are kept only to apply its removals).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

_ROOT_SEED = 0x5052_4542_4C45  # "PREBLE": any fixed value; only equality within one router fleet matters.


def chain_root(model: str, lora: str | None = None, cache_salt: str | None = None) -> int:
    """The parent key of block 0 for one (model, adapter, salt) namespace."""
    namespace = f"{model}\x00{lora or ''}\x00{cache_salt or ''}".encode()
    return xxhash.xxh3_64_intdigest(namespace, seed=_ROOT_SEED)


def hash_blocks(token_ids: Sequence[int], block_size: int, parent: int) -> list[int]:
    """Keys of every full block of token_ids, chained from parent. The partial tail is never hashed."""
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    # The tokenizer hands out array("I") (read as is); a list costs a conversion (~8 ns a token). Slicing a
    # memoryview copies nothing; binding the hash function once saves an attribute lookup a block.
    data = memoryview(token_ids if isinstance(token_ids, array) and token_ids.typecode == "I"
                      else array("I", token_ids))
    xxh3 = xxhash.xxh3_64_intdigest
    keys: list[int] = []
    append = keys.append
    for start in range(0, n_full * block_size, block_size):
        parent = xxh3(data[start : start + block_size], parent)
        append(parent)
    return keys
