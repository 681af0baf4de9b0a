"""Router.add_backend: where a backend's blocks come from (BlockSource), and what a caller knows up front."""

from __future__ import annotations

import pytest

from preble_router.policies import make_policy
from preble_router.router import BlockSource, Router

BS = 4


def _router(**kw) -> Router:
    return Router(model="m", tokenizer=None, policy=make_policy("cache_aware"), clock=lambda: 0.0, **kw)


def test_the_default_source_follows_the_endpoint_and_kv_events_auto():
    router = _router()
    plain = router.add_backend("http://a")
    assert router.index.is_estimated(plain.backend_id) and not plain.kv_auto and not plain.healthy
    assert plain.block_size is None and plain.capacity_blocks is None  # learned by the probes
    auto = _router(kv_events_auto=True).add_backend("http://a")
    assert auto.kv_auto
    assert not _router(kv_events_auto=True).add_backend("http://a", blocks=BlockSource.ESTIMATED).kv_auto
    assert router.add_backend("http://b", blocks=BlockSource.EVENTS).kv_auto  # the advertised endpoint
    with pytest.raises(ValueError):
        router.add_backend("http://c", "tcp://127.0.0.1:1", blocks=BlockSource.ESTIMATED)


def test_external_and_estimated_backends_known_up_front():
    router = _router()
    ext = router.add_backend("http://a", blocks=BlockSource.EXTERNAL, block_size=BS, capacity_blocks=2, healthy=True)
    est = router.add_backend("http://b", blocks=BlockSource.ESTIMATED, block_size=BS, capacity_blocks=2,
                             healthy=True)
    assert not router.index.is_estimated(ext.backend_id) and router.index.is_estimated(est.backend_id)
    assert (ext.healthy, ext.block_size, ext.capacity_blocks) == (True, BS, 2)
    prepared = router.prepare_tokens(list(range(3 * BS)))
    assert set(prepared.keys_by_block_size) == {BS}
    router.index.record_routed(est.backend_id, prepared.keys_by_block_size[BS], 0.0)
    assert router.index.blocks_held(est.backend_id) <= 2  # the capacity bounds the estimate from the start
    assert {s.backend_id for s in router.snapshot(prepared).backends} == {ext.backend_id, est.backend_id}
