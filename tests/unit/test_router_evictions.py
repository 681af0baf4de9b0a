"""The router tells its policy what the cache index drops (Policy.on_blocks_evicted), whatever the source."""

from __future__ import annotations

from preble_router.block_hash import chain_root, hash_blocks
from preble_router.policies import PrebleConfig, PreblePolicy, TimeModel
from preble_router.policies.base import StatelessPolicy
from preble_router.router import BlockSource, Router

BS = 4


class Recorder(StatelessPolicy):
    name = "recorder"

    def __init__(self):
        self.evicted = []

    def choose(self, request, snapshot):  # pragma: no cover - not routed here
        raise AssertionError

    def on_blocks_evicted(self, backend_id, keys):
        self.evicted.append((backend_id, list(keys)))


def _router(policy):
    router = Router(model="m", tokenizer=None, policy=policy, clock=lambda: 0.0)
    for url in ("http://a", "http://b"):
        backend = router.add_backend(url, blocks=BlockSource.EXTERNAL)
        backend.block_size, backend.healthy = BS, True
    return router


def test_router_forwards_kv_event_evictions_and_clears():
    policy = Recorder()
    router = _router(policy)
    tokens = list(range(12))
    keys = hash_blocks(tokens, BS, chain_root("m"))
    router.index.apply_stored(0, [1, 2, 3], None, tokens, BS, None, None)
    router.index.apply_removed(0, [3])
    assert policy.evicted == [(0, [keys[2]])]
    router.index.apply_cleared(0)
    assert policy.evicted[-1][0] == 0 and sorted(policy.evicted[-1][1]) == sorted(keys[:2])


def test_router_forwards_estimated_evictions():
    policy = Recorder()
    router = Router(model="m", tokenizer=None, policy=policy, clock=lambda: 0.0)
    router.add_backend("http://a").block_size = BS  # no KV events: the router's own LRU estimate
    router.index.set_capacity(0, 2)
    prepared = router.prepare_tokens(list(range(12)))
    router.index.record_routed(0, prepared.keys_by_block_size[BS], 0.0)
    # Evicted per window: a prompt's window larger than the whole capacity does not stay.
    assert policy.evicted == [(0, prepared.keys_by_block_size[BS])]


def test_preble_tree_follows_the_engine_through_the_router():
    policy = PreblePolicy(PrebleConfig(), TimeModel(a=1.0, b=0.1, d=0.0, e=0.0, decode_ms=1.0))
    router = _router(policy)
    tokens = list(range(40))
    prepared = router.prepare_tokens(tokens, max_tokens=4)
    decision = router.decide(prepared)
    router.dispatch(prepared, decision)
    b = decision.backend_id
    node = policy.tree.deepest_shared(prepared.keys_by_block_size[BS])
    assert b in node.last_use
    # the engine stores the prompt's blocks, then evicts the last three (engine hashes 101..110)
    router.index.apply_stored(b, list(range(101, 111)), None, tokens, BS, None, None)
    router.index.apply_removed(b, [108, 109, 110])
    assert node.held_keys(b) == 7
    router.index.apply_removed(b, [101])
    assert b not in node.last_use and list(policy.tree.lru_oldest_first(b)) == []
