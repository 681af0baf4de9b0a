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
