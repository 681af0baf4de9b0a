from preble_router.block_hash import chain_root, hash_blocks
from preble_router.cache_index import CacheIndex

BS = 4
ROOT = chain_root("m")


def stored(index, backend, tokens, engine_hashes, parent=None, salt=None):
    extra = [[salt]] + [None] * (len(engine_hashes) - 1) if salt else None
    index.apply_stored(backend, engine_hashes, parent, tokens, BS, None, extra)


def make(estimated=False, capacity=None):
    index = CacheIndex(predicted_ttl=2.0)
    index.add_backend(0, model="m", estimated=estimated, capacity_blocks=capacity)
    index.add_backend(1, model="m", estimated=estimated, capacity_blocks=capacity)
    return index


def test_stored_events_key_like_requests():
    index = make()
    prompt = list(range(12))
    stored(index, 0, prompt[:8], [101, 102])
    stored(index, 0, prompt[8:12], [103], parent=102)  # extends the chain from its parent's engine hash
    keys = hash_blocks(prompt, BS, ROOT)
    assert index.match(keys, [0, 1], now=0.0) == {0: 3, 1: 0}
    assert index.blocks_held(0) == 3


def test_removed_and_refcounted_duplicates():
    index = make()
    stored(index, 0, list(range(8)), [1, 2])
    stored(index, 0, list(range(8)), [1, 2])  # vLLM may store the same hash twice (no dedup)
    keys = hash_blocks(list(range(8)), BS, ROOT)
    index.apply_removed(0, [2])
    assert index.match(keys, [0], 0.0) == {0: 2}  # one copy of block 2 remains
    index.apply_removed(0, [2])
    assert index.match(keys, [0], 0.0) == {0: 1}
    index.apply_removed(0, [1, 1])
    assert index.match(keys, [0], 0.0) == {0: 0}
    assert len(index) == 0 and index.blocks_held(0) == 0


def test_cleared_only_touches_one_backend():
    index = make()
    stored(index, 0, list(range(8)), [1, 2])
    stored(index, 1, list(range(8)), [1, 2])
    index.apply_cleared(0)
    keys = hash_blocks(list(range(8)), BS, ROOT)
    assert index.match(keys, [0, 1], 0.0) == {0: 0, 1: 2}
    index.apply_removed(1, [1, 2])  # the engine-hash map survives for backend 1
    assert len(index) == 0


def test_bytes_hashes_and_orphans():
    index = make()
    stored(index, 0, list(range(4)), [b"\x00" * 24 + (7).to_bytes(8, "big")])
    stored(index, 0, list(range(4, 8)), [8], parent=7)  # parent given as the int form of the same hash
    assert index.match(hash_blocks(list(range(8)), BS, ROOT), [0], 0.0) == {0: 2}
    stored(index, 0, list(range(4)), [9], parent=12345)  # never-seen parent: cannot be keyed
    assert index.orphan_blocks(0) == 1


def test_salt_changes_namespace():
    index = make()
    stored(index, 0, list(range(4)), [1], salt="tenantA")
    assert index.match(hash_blocks(list(range(4)), BS, ROOT), [0], 0.0) == {0: 0}
    assert index.match(hash_blocks(list(range(4)), BS, chain_root("m", cache_salt="tenantA")), [0], 0.0) == {0: 1}


def test_predicted_blocks_expire():
    index = make()
    keys = hash_blocks(list(range(8)), BS, ROOT)
    index.record_routed(1, keys, now=10.0)
    assert index.match(keys, [0, 1], now=11.0) == {0: 0, 1: 2}
    assert index.match(keys, [0, 1], now=12.5) == {0: 0, 1: 0}
    assert index.blocks_held(1) == 0  # predictions are not confirmed blocks


def test_prediction_renewed_is_not_expired_by_older_entry():
    index = make()
    keys = hash_blocks(list(range(4)), BS, ROOT)
    index.record_routed(0, keys, now=0.0)
    index.record_routed(0, keys, now=1.5)
    assert index.match(keys, [0], now=2.5) == {0: 1}


def test_estimated_mode_is_lru_bounded():
    index = make(estimated=True, capacity=3)
    a = hash_blocks(list(range(8)), BS, ROOT)
    b = hash_blocks(list(range(100, 108)), BS, ROOT)
    index.record_routed(0, a, 0.0)
    index.record_routed(0, b, 1.0)  # 4 blocks > capacity 3: a's oldest block goes
    assert index.blocks_held(0) == 3
    assert index.match(b, [0], 2.0) == {0: 2}
    assert index.match(a, [0], 2.0) == {0: 0}  # its first block was evicted, so no prefix match
    index.remove_backend(0)
    assert len(index) == 0


def test_match_stops_per_backend():
    index = make()
    stored(index, 0, list(range(12)), [1, 2, 3])
    stored(index, 1, list(range(4)), [1])
    keys = hash_blocks(list(range(16)), BS, ROOT)
    assert index.match(keys, [0, 1], 0.0) == {0: 3, 1: 1}


def test_cleared_drops_predictions_too():
    index = make()
    keys = hash_blocks(list(range(8)), BS, ROOT)
    index.record_routed(0, keys, now=0.0)
    index.record_routed(1, keys, now=0.0)
    index.apply_cleared(0)
    assert index.match(keys, [0, 1], now=0.5) == {0: 0, 1: 2}
