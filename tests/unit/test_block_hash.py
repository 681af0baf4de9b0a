from preble_router.block_hash import chain_root, hash_blocks


def test_full_blocks_only_and_chained():
    root = chain_root("m")
    keys = hash_blocks(list(range(10)), 4, root)
    assert len(keys) == 2  # the 2-token tail is never hashed
    # A chain: block 1's key depends on block 0's tokens.
    other = hash_blocks([99] + list(range(1, 10)), 4, root)
    assert other[0] != keys[0] and other[1] != keys[1]
    # Prefix property: a longer prompt shares the leading keys.
    assert hash_blocks(list(range(20)), 4, root)[:2] == keys


def test_namespace_separates_model_lora_and_salt():
    tokens = list(range(8))
    roots = {chain_root("m"), chain_root("m2"), chain_root("m", lora="a"), chain_root("m", cache_salt="s")}
    assert len(roots) == 4
    assert len({hash_blocks(tokens, 4, r)[0] for r in roots}) == 4


def test_deterministic():
    assert hash_blocks([1, 2, 3, 4], 4, chain_root("m")) == hash_blocks([1, 2, 3, 4], 4, chain_root("m"))


def test_key_cache_gives_exactly_hash_blocks():
    """Prompts sharing prefixes of every length (segment boundaries included), list or array input, several
    parents and block sizes: the cache's keys always equal hash_blocks'."""
    import random
    from array import array

    from preble_router.block_hash import BlockKeyCache

    rng = random.Random(5)
    cache = BlockKeyCache()
    docs = [[rng.randrange(50_000) for _ in range(3000)] for _ in range(3)]
    roots = [chain_root("m"), chain_root("m", cache_salt="s")]
    for i in range(150):
        doc = docs[i % 3]
        cut = rng.choice([0, 15, 16, 255, 256, 257, 1024, 2999, 3000, rng.randrange(3000)])
        prompt = doc[:cut] + [rng.randrange(50_000) for _ in range(rng.randrange(0, 700))]
        bs, root = rng.choice([16, 32]), rng.choice(roots)
        tokens = array("I", prompt) if i % 2 else prompt
        assert cache.keys(tokens, bs, root) == hash_blocks(prompt, bs, root)
    assert cache.hit_blocks > cache.hashed_blocks  # the shared documents were mostly not hashed again


def test_key_cache_is_bounded():
    from preble_router.block_hash import BlockKeyCache

    cache = BlockKeyCache(max_segments=10)
    root = chain_root("m")
    for i in range(20):
        prompt = [i] * (16 * 16 * 3)  # three segments each
        assert cache.keys(prompt, 16, root) == hash_blocks(prompt, 16, root)
        assert len(cache) <= 10
