"""Several routers in front of one fleet (#16): another router's requests, seen in the engine's KV events before
its load report, count in this router's load view; a lone router is unchanged; routers that cannot see each
other's latest dispatches still send a new prefix to the same backend."""

from __future__ import annotations

from preble_router.block_hash import chain_root, hash_blocks
from preble_router.load import EngineReport
from preble_router.policies import BackendState, ClusterSnapshot, PrebleConfig, PreblePolicy, RouteRequest, make_policy
from preble_router.router import BlockSource, Router

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def router(clock: Clock, policy: str = "preble", backends: int = 2) -> Router:
    r = Router(model="m", tokenizer=None, policy=make_policy(policy), clock=clock)
    for i in range(backends):
        r.add_backend(f"http://gpu{i}", blocks=BlockSource.EXTERNAL, block_size=BS, capacity_blocks=1000,
                      healthy=True)
    return r


def store(r: Router, backend: int, tokens: list[int], start_block: int = 0, blocks: int | None = None) -> None:
    """The engine stores blocks start_block.. of `tokens` (as a BlockStored run), keyed as the router keys them:
    engine hashes are the router's own keys here (the index maps them anyway)."""
    keys = hash_blocks(tokens, BS, chain_root("m"))
    end = len(keys) if blocks is None else start_block + blocks
    parent = keys[start_block - 1] if start_block else None
    r.index.apply_stored(backend, keys[start_block:end], parent, tokens[start_block * BS:end * BS], BS, None, None)


def unseen(r: Router, backend: int) -> int:
    return r.load.view(backend, r.clock()).unseen_dispatches


def test_another_routers_stored_run_counts_once_until_the_next_report():
    clock = Clock()
    r = router(clock)
    before = r.load.view(0, 0.0).in_flight
    prompt = list(range(1000, 1000 + 40))  # 10 blocks, sent by another router
    store(r, 0, prompt, 0, 4)  # its first chunk
    assert unseen(r, 0) == 1 and r.load.view(0, 0.0).in_flight == before + 1
    clock.now = 0.05
    store(r, 0, prompt, 4, 4)  # its next chunks continue the same request
    store(r, 0, prompt, 8)
    assert unseen(r, 0) == 1 and unseen(r, 1) == 0
    assert r.snapshot(r.prepare_tokens(list(range(8)))).shared
    # The engine's next report includes it: counted there, no longer unseen.
    r.load.apply_report(0, EngineReport(running=1, waiting=0), r.load.mark(0), 0.1)
    assert unseen(r, 0) == 0 and r.load.view(0, 0.1).in_flight == 1


def test_unseen_requests_age_out_after_the_mean_latency_without_a_report():
    clock = Clock()
    r = router(clock)
    store(r, 1, list(range(500, 540)))
    assert unseen(r, 1) == 1
    clock.now = r.load.mean_latency + 0.01
    assert unseen(r, 1) == 0


def test_our_own_requests_and_their_continuations_never_count():
    clock = Clock()
    r = router(clock)
    prompt = list(range(2000, 2000 + 40))
    prepared = r.prepare_tokens(prompt)
    decision = r.decide(prepared)
    inflight = r.dispatch(prepared, decision)
    b = decision.backend_id
    store(r, b, prompt, 0, 4)  # its prefill, in chunks
    clock.now = 0.05
    store(r, b, prompt, 4)
    # Its decode fills blocks after the prompt: they continue our request.
    keys = hash_blocks(prompt, BS, chain_root("m"))
    out = [9, 9, 9, 9]
    r.index.apply_stored(b, hash_blocks(out, BS, keys[-1]), keys[-1], out, BS, None, None)
    assert unseen(r, b) == 0 and not r.load.foreign_recent(clock.now)
    # A block recomputed after an eviction, while it runs, is ours too.
    r.index.apply_removed(b, keys[2:4])
    store(r, b, prompt, 2, 2)
    assert unseen(r, b) == 0
    r.first_token(inflight)
    r.finish(prepared, inflight, ok=True, output_tokens=4)
    # Replayed batches are the engine's past, not requests sent now.
    r.index.replaying = True
    store(r, 1 - b, list(range(7000, 7040)))
    r.index.replaying = False
    assert unseen(r, 1 - b) == 0


def test_a_lone_router_decides_as_before():
    """Every decision and load a lone router makes, with the engine storing each request's blocks, equals the one
    it makes when foreign-run tracking is off (the behaviour before it existed)."""
    def run(track: bool) -> list[tuple[int, str, tuple]]:
        clock = Clock()
        r = router(clock, backends=3)
        if not track:
            r.index.on_foreign_stored = None
        out, flights = [], []
        for i in range(60):
            clock.now = i * 0.02
            prompt = [i % 5] * 8 + list(range(100 * i, 100 * i + 24))  # 5 shared prefixes, unique tails
            prepared = r.prepare_tokens(prompt, max_tokens=4)
            d = r.decide(prepared)
            loads = tuple((b.in_flight, b.unseen_dispatches) for b in prepared.snapshot.backends)
            assert not prepared.snapshot.shared
            flights.append((prepared, r.dispatch(prepared, d), prompt, d.backend_id))
            store(r, d.backend_id, prompt, prepared.matched_blocks.get(d.backend_id, 0))
            out.append((d.backend_id, d.reason, loads))
            if len(flights) > 6:
                p, f, _, _ = flights.pop(0)
                r.first_token(f)
                r.finish(p, f, ok=True, output_tokens=4)
        return out

    assert run(True) == run(False)


def test_two_routers_send_the_same_new_prefix_to_the_same_backend():
    """Routers that cannot see each other's latest dispatch (it is not in the index nor the load yet), each with
    a different view of the load, agree on the backend of a new prefix when other routers' traffic shows."""
    cfg = PrebleConfig()
    a, b = PreblePolicy(cfg), PreblePolicy(cfg)
    picks: dict[str, set[int]] = {"a": set(), "b": set()}
    for prefix in range(20):
        keys = tuple(hash_blocks(list(range(prefix * 1000, prefix * 1000 + 64 * BS)), BS, chain_root("m")))
        req = RouteRequest(f"r{prefix}", len(keys) * BS + 1, keys, BS, 8)
        # Router a has nothing in flight; router b has a request of its own on gpu2 (a does not know it).
        view_a = ClusterSnapshot(0.0, tuple(BackendState(i, f"http://gpu{i}", 0, 0, 0, 0) for i in range(4)),
                                 shared=True)
        view_b = ClusterSnapshot(0.0, tuple(BackendState(i, f"http://gpu{i}", 0, 1 if i == 2 else 0, 0, 0)
                                            for i in range(4)), shared=True)
        da, db = a.choose(req, view_a), b.choose(req, view_b)
        assert db.backend_id != 2
        if da.backend_id != 2:
            assert da.backend_id == db.backend_id
        picks["a"].add(da.backend_id)
        picks["b"].add(db.backend_id)
    assert len(picks["a"]) == 4 and len(picks["b"]) == 3  # different new prefixes spread over the idle backends
    # Without other routers' traffic the tie goes as before (lowest id), not by the prefix.
    alone = ClusterSnapshot(0.0, tuple(BackendState(i, f"http://gpu{i}", 0, 0, 0, 0) for i in range(4)))
    assert a.choose(req, alone).backend_id == 0


def test_another_routers_requests_seen_only_in_kv_events_steer_as_its_own_would():
    """The issue's test, before the engine's next load report: router `fed` sent nothing, but backend 0's KV
    events show 6 requests another router sent there; router `own` sent them itself. Same load, same decision."""
    clock = Clock()
    own, fed = router(clock), router(clock)
    prompts = [[1000 * i + j for j in range(64)] for i in range(6)]
    for p in prompts:
        prepared = own.prepare_tokens(p)
        decision = own.decide(prepared)
        own.dispatch(prepared, decision.__class__(0, decision.reason, 0, decision.costs))
        store(own, 0, p)
        store(fed, 0, p)
    new = [7] * 64
    p_own, p_fed = own.prepare_tokens(new), fed.prepare_tokens(new)
    d_own, d_fed = own.decide(p_own), fed.decide(p_fed)
    assert [b.in_flight for b in p_own.snapshot.backends] == [b.in_flight for b in p_fed.snapshot.backends] == [6, 0]
    assert d_own.backend_id == d_fed.backend_id == 1


def test_another_routers_prefill_in_progress_counts_as_matched():
    """Another router's request is prefilling a prefix on gpu0 (its first chunk stored, more to come): a request
    of this router sharing that prefix sees it as held there, as it would its own request's prediction."""
    clock = Clock()
    r = router(clock)
    video = list(range(3000, 3000 + 64))  # 16 blocks
    store(r, 0, video + [1, 2, 3, 4], 0, 4)  # the other router's first chunk: 4 blocks of the shared prefix
    mine = r.prepare_tokens(video + [5, 6, 7, 8, 9])
    r.decide(mine)
    held = {b.backend_id: b.matched_tokens for b in mine.snapshot.backends}
    assert held == {0: 17 * BS, 1: 0}  # the whole prompt's full blocks, as our own prediction would be
    assert mine.matched_blocks[0] == 4  # what the index holds (and what this router's own prediction starts from)
    clock.now = 1.0  # its prefill went quiet long ago: only what was stored counts
    late = r.prepare_tokens(video + [5, 6, 7, 8, 9])
    r.decide(late)
    assert {b.backend_id: b.matched_tokens for b in late.snapshot.backends} == {0: 4 * BS, 1: 0}


def test_replayed_batches_never_count_as_other_routers_requests():
    """The subscriber marks the sink while it applies a replayed batch (the engine's past); live ones count."""
    import msgspec

    from preble_router.kv_events import KvEventSubscriber

    clock = Clock()
    r = router(clock)
    sub = KvEventSubscriber(0, "tcp://127.0.0.1:1", r.index)
    tokens = list(range(9000, 9000 + 4 * BS))

    def payload(first_hash: int) -> bytes:
        event = {"type": "BlockStored", "block_hashes": [first_hash + i for i in range(4)],
                 "parent_block_hash": None, "token_ids": tokens, "block_size": BS, "lora_name": None}
        return msgspec.msgpack.encode([1.0, [event], 0])

    sub._apply_batch(0, payload(100), replayed=True)
    assert r.index.blocks_held(0) == 4 and unseen(r, 0) == 0 and not r.index.replaying
    tokens = list(range(9100, 9100 + 4 * BS))
    sub._apply_batch(1, payload(200), replayed=False)
    assert unseen(r, 0) == 1
