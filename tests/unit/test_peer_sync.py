"""Peer sync (#16): routers of one fleet replay each other's dispatches, so a peer's request changes this router's
decisions as its own would; lost events and silent peers are logged and counted, never leaked. The last test runs
the real ZMQ transport between two routers on one loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from preble_router.load import EngineReport
from preble_router.peer_sync import PEER_SILENCE_S, PeerEvent, PeerEventKind, PeerSync
from preble_router.policies import make_policy
from preble_router.router import BlockSource, Router
from tests.unit.test_several_routers import Clock

BS = 4


class FakeBus:
    """A fake transport: every event goes straight to the other routers' apply_peer (no sockets)."""

    def __init__(self) -> None:
        self.routers: list[Router] = []
        self.sent: list[PeerEvent] = []
        self.drop_next = 0  # events to lose (a full queue) before delivering again

    def join(self, router: Router, router_id: str) -> None:
        bus = self

        class Link:
            def __init__(self) -> None:
                self.router_id, self.seq = router_id, 0

            def publish(self, kind: PeerEventKind, **fields: object) -> None:
                self.seq += 1
                event = PeerEvent(kind, self.router_id, self.seq, **fields)
                bus.sent.append(event)
                if bus.drop_next:
                    bus.drop_next -= 1
                    return
                for other in bus.routers:
                    if other is not router:
                        other.apply_peer(event)

        self.routers.append(router)
        router.attach_peers(Link())


def make_router(clock: Clock, policy: str = "preble", backends: int = 2, estimated: bool = False) -> Router:
    r = Router(model="m", tokenizer=None, policy=make_policy(policy), clock=clock)
    for i in range(backends):
        r.add_backend(f"http://gpu{i}", blocks=BlockSource.ESTIMATED if estimated else BlockSource.EXTERNAL,
                      block_size=BS, capacity_blocks=1000, healthy=True)
    return r


def peered(clock: Clock, **kwargs: object) -> tuple[Router, Router, FakeBus]:
    """Two routers a and b, joined by a FakeBus."""
    a, b = make_router(clock, **kwargs), make_router(clock, **kwargs)
    bus = FakeBus()
    bus.join(a, "a")
    bus.join(b, "b")
    return a, b, bus


def send(r: Router, tokens: list[int], max_tokens: int = 8):
    prepared = r.prepare_tokens(tokens, max_tokens=max_tokens)
    decision = r.decide(prepared)
    assert decision is not None
    return prepared, decision, r.dispatch(prepared, decision)


def test_a_peers_dispatch_counts_here_as_this_routers_own_would():
    """Router b sees a's requests in its load view and its predicted blocks at once, and routes a request of the
    same prefix to a's backend, exactly as a lone router would have; a's first token and end reach b too."""
    clock = Clock()
    a, b, lone = make_router(clock), make_router(clock), make_router(clock)
    bus = FakeBus()
    bus.join(a, "a")
    bus.join(b, "b")
    prompt = list(range(100, 100 + 64))  # 16 blocks
    pa, da, fa = send(a, prompt)
    _, dl, fl = send(lone, prompt)  # the same request on a lone router, for comparison
    target = da.backend_id
    assert b.load.view(target, 0.0).in_flight == 1
    assert b.load.view(target, 0.0).pending_prefill_tokens == lone.load.view(target, 0.0).pending_prefill_tokens
    assert b.index.match(pa.keys_by_block_size[BS], [0, 1], 0.0)[target] == 16
    assert b.peer_states["a"].flights and b.peer_load() == {target: (1, fa.uncached_tokens)}

    follow = prompt + list(range(500, 508))  # the same prefix and a new question
    clock.now = 0.01
    blind = make_router(clock)  # no peer sync: it knows nothing of a's request
    seen = b.snapshot(b.prepare_tokens(follow)).backends
    assert seen == lone.snapshot(lone.prepare_tokens(follow)).backends
    assert seen != blind.snapshot(blind.prepare_tokens(follow)).backends
    _, db, _ = send(b, follow)
    _, dl2, _ = send(lone, follow)
    assert (db.backend_id, db.reason, db.matched_tokens, db.costs) == (dl2.backend_id, dl2.reason,
                                                                       dl2.matched_tokens, dl2.costs)

    clock.now = 0.2
    a.first_token(fa)
    assert b.load.view(target, 0.2).running_decode == 1  # a's request decodes (b's own has no token yet)
    a.finish(pa, fa, ok=True, output_tokens=8)
    assert not b.peer_states["a"].flights
    assert [b.load.get(i).in_flight for i in (0, 1)] == [int(db.backend_id == i) for i in (0, 1)]  # b's own left
    assert [e.kind for e in bus.sent if e.router == "a"] == [PeerEventKind.DISPATCHED, PeerEventKind.FIRST_TOKEN,
                                                             PeerEventKind.FINISHED]


def test_without_peers_the_second_router_cannot_see_the_first_ones_request():
    """The control for the test above: no peer sync, no knowledge (until engine events or reports)."""
    clock = Clock()
    a, b = make_router(clock), make_router(clock)
    prompt = list(range(100, 164))
    send(a, prompt)
    assert all(b.load.view(i, 0.0).in_flight == 0 for i in (0, 1))
    assert not any(b.index.match(b.prepare_tokens(prompt).keys_by_block_size[BS], [0, 1], 0.0).values())


def test_peer_requests_merge_with_the_engines_report_like_own_ones():
    """The engine's report includes a peer's request once polled after it: counted once, not twice."""
    clock = Clock()
    a, b, bus = peered(clock)
    _, d, _ = send(a, list(range(64)))
    clock.now = 0.25
    b.load.apply_report(d.backend_id, EngineReport(running=1, waiting=0), b.load.mark(d.backend_id), 0.25)
    assert b.load.view(d.backend_id, 0.25).in_flight == 1


def test_late_peer_events_are_timed_as_the_peer_timed_them():
    """A dispatch and its first token that reach b together (its loop was busy) still show b the peer's own time
    to first token: the policy's time model calibrates on it as a's does, instead of on an instant prefill."""
    clock = Clock()
    a, b = make_router(clock), make_router(clock)
    bus = FakeBus()
    bus.join(a, "a")
    held: list[PeerEvent] = []
    a.peers.publish = lambda kind, _p=a.peers.publish, **f: (held.append(PeerEvent(kind, "a", len(held) + 1, **f)))
    pa, _, fa = send(a, list(range(64)))
    clock.now = 0.5
    a.first_token(fa)
    clock.now = 0.6
    for event in held:
        b.apply_peer(event)
    assert a.policy.time._scale != 1.0 and b.policy.time._scale == pytest.approx(a.policy.time._scale)


def test_lost_events_are_counted_and_logged(caplog):
    clock = Clock()
    a, b, bus = peered(clock)
    pa, _, fa = send(a, list(range(64)))
    bus.drop_next = 2  # its first token and its end are lost
    a.first_token(fa)
    a.finish(pa, fa, ok=True, output_tokens=8)
    with caplog.at_level(logging.WARNING, logger="preble_router.router"):
        send(a, list(range(1000, 1064)))
    assert b.peer_states["a"].lost == 2
    assert any("2 events lost" in r.message for r in caplog.records)
    # The request whose end was lost is forgotten after the TTL, not kept forever.
    b.peer_flight_ttl = 10.0
    clock.now = 11.0
    b.apply_peer(PeerEvent(PeerEventKind.HEARTBEAT, "a", bus.sent[-1].seq + 1))
    b.check_peers()
    assert not b.peer_states["a"].flights
    assert all(b.load.get(i).in_flight == 0 for i in (0, 1))


def test_one_router_of_a_peered_fleet_moves_groups():
    """Moves are each router's own state: of peered routers only the least id rebalances (the others follow its
    dispatches); a lone router always does, and the next in line takes over when the mover goes silent."""
    clock = Clock()
    a, b = make_router(clock), make_router(clock)
    assert a.snapshot(a.prepare_tokens(list(range(8)))).rebalancer
    bus = FakeBus()
    bus.join(a, "a")
    bus.join(b, "b")
    send(a, list(range(64)))
    send(b, list(range(100, 164)))
    assert a.snapshot(a.prepare_tokens(list(range(8)))).rebalancer
    assert not b.snapshot(b.prepare_tokens(list(range(8)))).rebalancer
    clock.now = PEER_SILENCE_S + 1
    b.check_peers()
    assert b.snapshot(b.prepare_tokens(list(range(8)))).rebalancer


def test_peers_adopt_the_movers_moves():
    """The mover's REBALANCE dispatch names its group (Decision.group_blocks): a peer replaying it moves the group
    too, so a request of that group goes to the move's target whichever router takes it."""
    from preble_router.policies import Reason
    from preble_router.policies.preble import _Move

    clock = Clock()
    a, b, bus = peered(clock)
    doc = list(range(1000, 1000 + 128))  # 32 blocks: a document both routers have seen go to one backend
    for i, question in enumerate(([1, 2, 3, 4], [5, 6, 7, 8])):  # two questions: the tree splits at the doc
        clock.now = float(i)
        pa, first, fa = send(a, doc + question)
        a.first_token(fa)
        a.finish(pa, fa, ok=True, output_tokens=8)
    other = 1 - first.backend_id
    group = a.policy.tree.deepest_shared(a.prepare_tokens(doc + [13, 14, 15, 16]).keys_by_block_size[BS])
    assert group is not None and group.end_blocks == 32
    a.policy._moved[id(group)] = _Move(group, other, clock.now + 100)  # the mover's rebalancing moved it
    clock.now = 2.0
    _, moved, _ = send(a, doc + [13, 14, 15, 16])
    assert moved.reason == Reason.REBALANCE and moved.backend_id == other and moved.group_blocks == group.end_blocks
    clock.now = 3.0
    _, follow, _ = send(b, doc + [9, 10, 11, 12])
    assert (follow.reason, follow.backend_id) == (Reason.REBALANCE, other)


def test_a_silent_peer_is_forgotten_with_its_requests(caplog):
    clock = Clock()
    a, b, bus = peered(clock)
    _, d, _ = send(a, list(range(64)))
    assert b.load.get(d.backend_id).in_flight == 1
    clock.now = PEER_SILENCE_S + 0.1
    with caplog.at_level(logging.WARNING, logger="preble_router.router"):
        b.check_peers()
    assert "a" not in b.peer_states
    assert b.load.get(d.backend_id).in_flight == 0
    assert any("silent" in r.message and "forgot" in r.message for r in caplog.records)


def test_a_dispatch_to_a_backend_unknown_here_is_skipped():
    clock = Clock()
    a, b = make_router(clock, policy="round_robin", backends=3), make_router(clock, backends=2)
    bus = FakeBus()
    bus.join(a, "a")
    bus.join(b, "b")
    for i in range(12):  # round robin over a's three backends: some go to gpu2, which b does not route to
        send(a, list(range(i * 100, i * 100 + 64)))
    assert b.peer_states["a"].skipped > 0
    assert sum(b.load.get(i).in_flight for i in (0, 1)) == 12 - b.peer_states["a"].skipped


def test_estimated_backends_learn_a_peers_blocks():
    """Without KV events the estimate is all a router knows: a peer's dispatch adds to it as its own would."""
    clock = Clock()
    a, b, bus = peered(clock, estimated=True)
    prompt = list(range(64))
    pa, d, _ = send(a, prompt)
    assert b.index.match(pa.keys_by_block_size[BS], [0, 1], 0.0)[d.backend_id] == 16


def test_zmq_transport_between_two_routers():
    """Two routers, each with its PeerSync over tcp on localhost: a's dispatch reaches b."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    async def main() -> None:
        pa_port, pb_port = free_port(), free_port()
        a, b = make_router(Clock()), make_router(Clock())
        sa = PeerSync(a, bind=f"tcp://127.0.0.1:{pa_port}", peers=[f"tcp://127.0.0.1:{pb_port}"])
        sb = PeerSync(b, bind=f"tcp://127.0.0.1:{pb_port}", peers=[f"tcp://127.0.0.1:{pa_port}",
                                                                    f"tcp://127.0.0.1:{pb_port}"])
        sa.start()
        sb.start()
        try:
            for _ in range(100):  # PUB/SUB: wait until the subscription is through (heartbeats arrive)
                if sa.router_id in b.peer_states:
                    break
                await asyncio.sleep(0.05)
            assert sa.router_id in b.peer_states
            _, d, _ = send(a, list(range(64)))
            for _ in range(100):
                if b.load.get(d.backend_id).in_flight:
                    break
                await asyncio.sleep(0.02)
            assert b.load.get(d.backend_id).in_flight == 1
            assert sb.router_id not in b.peer_states  # its own events (it subscribes to itself too) are ignored
            assert b.peers_debug()["peers"][sa.router_id]["in_flight"] == 1
        finally:
            await sa.stop()
            await sb.stop()

    asyncio.run(main())


def test_peers_found_by_dns():
    """--peers dns:NAME:PORT subscribes to every address the name resolves to (here localhost)."""
    from testkit.ports import free_ports

    async def main() -> None:
        (port,) = free_ports(1)
        a, b = make_router(Clock()), make_router(Clock())
        sa = PeerSync(a, bind=f"tcp://127.0.0.1:{port}")
        sb = PeerSync(b, peers=[f"dns:localhost:{port}"])
        sa.start()
        sb.start()
        try:
            for _ in range(100):
                if sa.router_id in b.peer_states:
                    break
                await asyncio.sleep(0.05)
            assert sa.router_id in b.peer_states
            assert f"tcp://127.0.0.1:{port}" in b.peers_debug()["subscribed"]
        finally:
            await sa.stop()
            await sb.stop()

    asyncio.run(main())


def test_a_malformed_dns_peer_is_refused():
    with pytest.raises(ValueError, match="dns:NAME:PORT"):
        PeerSync(make_router(Clock()), peers=["dns:nohost"])
