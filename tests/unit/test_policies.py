from preble_router.policies import BackendState, CacheAwarePolicy, ClusterSnapshot, LeastLoadPolicy, RoundRobinPolicy, RouteRequest


def req(prompt_tokens=1000):
    return RouteRequest("r", prompt_tokens, (), 32)


def state(i, matched=0, in_flight=0, cached_blocks=0):
    return BackendState(i, f"http://b{i}", matched, in_flight, 0, 0, None, cached_blocks)


def pick(policy, snap, request=None):
    request = request or req()
    decision = policy.choose(request, snap)
    policy.on_dispatched(request, decision, snap)
    return decision


def test_round_robin_cycles_ids_and_survives_removal():
    p = RoundRobinPolicy()
    snap = ClusterSnapshot(0.0, (state(0), state(1), state(2)))
    assert p.choose(req(), snap).backend_id == p.choose(req(), snap).backend_id == 0  # choosing alone changes nothing
    assert [pick(p, snap).backend_id for _ in range(4)] == [0, 1, 2, 0]
    snap2 = ClusterSnapshot(0.0, (state(0), state(2)))
    assert pick(p, snap2).backend_id == 2


def test_least_load():
    snap = ClusterSnapshot(0.0, (state(0, in_flight=3), state(1, in_flight=1)))
    assert LeastLoadPolicy().choose(req(), snap).backend_id == 1


def test_cache_aware_prefers_longest_match_above_threshold():
    p = CacheAwarePolicy()
    snap = ClusterSnapshot(0.0, (state(0, matched=100), state(1, matched=600, in_flight=5)))
    d = p.choose(req(), snap)
    assert (d.backend_id, d.reason, d.matched_tokens) == (1, "cache_hit", 600)


def test_cache_aware_low_match_goes_to_smallest_tree():
    p = CacheAwarePolicy()
    snap = ClusterSnapshot(0.0, (state(0, matched=200, cached_blocks=50), state(1, cached_blocks=10)))
    d = p.choose(req(), snap)
    assert (d.backend_id, d.reason) == (1, "min_tree")


def test_cache_aware_imbalance_overrides_affinity():
    p = CacheAwarePolicy()
    snap = ClusterSnapshot(0.0, (state(0, matched=900, in_flight=100), state(1, in_flight=10)))
    d = p.choose(req(), snap)
    assert (d.backend_id, d.reason) == (1, "imbalanced")


def test_backend_leaving_mid_request_keeps_load_exact():
    from preble_router.router import Router

    router = Router(model="m", tokenizer=None, policy=LeastLoadPolicy(), clock=lambda: 0.0)
    for url in ("http://a", "http://b"):
        b = router.add_backend(url)
        b.healthy, b.block_size = True, 4
    prepared = router.prepare_tokens(list(range(12)))
    decision = router.decide(prepared)
    inflight = router.dispatch(prepared, decision)
    gone = router.backends[decision.backend_id].url
    import asyncio

    asyncio.run(router.remove_backend(gone))
    newcomer = router.add_backend("http://c")  # reuses the departed backend's id
    assert newcomer.backend_id == decision.backend_id
    router.finish(prepared, inflight, ok=True, output_tokens=3)
    load = router.load.get(newcomer.backend_id)
    assert (load.in_flight, load.pending_prefill_tokens, load.running_decode) == (0, 0, 0)
