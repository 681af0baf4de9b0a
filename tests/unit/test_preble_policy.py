"""Preble's rules, each pinned on a small constructed cluster (pure policy objects, simulated time)."""

from __future__ import annotations

import math

import pytest

from preble_router.policies import BackendState, ClusterSnapshot, PrebleConfig, PreblePolicy, RouteRequest, TimeModel

BS = 16


def request(rid, keys, prompt_tokens=None, max_tokens=10):
    keys = tuple(keys)
    return RouteRequest(str(rid), prompt_tokens or len(keys) * BS + 1, keys, BS, max_tokens)


def backend(i, matched=0, in_flight=0, capacity=None, cached=0):
    return BackendState(i, f"gpu{i}", matched, in_flight, 0, 0, capacity, cached)


def snap(now, *backends):
    return ClusterSnapshot(now, tuple(backends))


def send(policy, req, snapshot):
    d = policy.choose(req, snapshot)
    policy.on_dispatched(req, d, snapshot)
    return d


def policy(**cfg):
    # Most rules tested here (L, the exploit overflow, prefill/decode balance, M as seen in the explore costs) are
    # the queue cost model's, the paper's E2; the default, sharing, is tested by test_sharing_* and the simulator.
    cfg.setdefault("cost_model", "queue")
    return PreblePolicy(PrebleConfig(**cfg), TimeModel(a=1.0, b=0.1, d=0.0, e=0.0, decode_ms=1.0))


def test_exploit_when_cached_outweighs_missed():
    p = policy()
    r = request(1, range(10))  # 161 tokens
    d = p.choose(r, snap(0, backend(0, matched=96), backend(1)))  # 96 cached > 65 missed
    assert (d.backend_id, d.reason) == (0, "exploit")
    d = p.choose(r, snap(0, backend(0, matched=64), backend(1)))  # 64 cached < 97 missed
    assert d.reason == "explore"


def test_exploit_ties_go_to_least_load():
    p = policy(load_signal="window")  # the paper's L: what was sent within H
    send(p, request("warm", range(100, 120)), snap(0, backend(0), backend(1)))  # loads backend 0 (explore tie -> 0)
    d = p.choose(request(1, range(10)), snap(1, backend(0, matched=144), backend(1, matched=144)))
    assert (d.backend_id, d.reason) == (1, "exploit")


def test_explore_load_term_avoids_busy_backend():
    p = policy(load_signal="window")  # the paper's L (the default, outstanding work: test_outstanding_*)
    first = send(p, request("a", range(50)), snap(0, backend(0), backend(1)))
    d = p.choose(request("b", range(100, 150)), snap(1, backend(0), backend(1)))
    assert d.reason == "explore" and d.backend_id != first.backend_id
    assert d.costs[first.backend_id] > d.costs[d.backend_id]


def test_explore_prefill_term_prefers_partial_match():
    p = policy()
    r = request(1, range(10))  # 161 tokens
    d = p.choose(r, snap(0, backend(0), backend(1, matched=48)))  # 48 cached: not enough to exploit
    assert (d.backend_id, d.reason) == (1, "explore")
    assert d.costs[0] - d.costs[1] == pytest.approx(48 * 0.1)


def test_eviction_term_values_hot_prefixes():
    p = policy(load_signal="window", eviction_pending=False)  # M as the events report it (these dispatches stay queued)
    # Backend 0 caches a hot prefix (used 5 times recently), backend 1 a cold one (used once).
    for t in range(5):
        p.on_dispatched(request(f"h{t}", range(20)), _decision(0, 0), snap(t, backend(0), backend(1)))
    p.on_dispatched(request("c", range(200, 220)), _decision(1, 0), snap(5, backend(0), backend(1)))
    # Both full (capacity 20 blocks, 20 cached): a new 20-block prompt must evict 20 blocks on either.
    full = dict(capacity=20, cached=20)
    d = p.choose(request("n", range(500, 520)), snap(6, backend(0, **full), backend(1, **full)))
    assert d.reason == "explore" and d.backend_id == 1
    loads = {i: p.load_ms(i, 6) for i in (0, 1)}
    evict0 = d.costs[0] - loads[0] - d.costs[1] + loads[1]
    assert evict0 > 0  # backend 0 pays for evicting 5 recent uses of its prefix, backend 1 for 1


def test_no_eviction_cost_when_it_fits():
    p = policy(load_signal="window")  # costs minus load_ms() isolate M
    p.on_dispatched(request("h", range(20)), _decision(0, 0), snap(0, backend(0), backend(1)))
    d = p.choose(request("n", range(500, 510)), snap(1, backend(0, capacity=100, cached=20), backend(1)))
    assert d.costs[0] - p.load_ms(0, 1) == pytest.approx(d.costs[1] - p.load_ms(1, 1))


def test_load_window_expires():
    p = policy(window=10.0)
    send(p, request("a", range(50)), snap(0, backend(0), backend(1)))
    assert p.load_ms(0, 5) > 0
    assert p.load_ms(0, 11) == 0


def test_rebalancing_moves_cheapest_group_after_warmup():
    # The paper's rule (moves ignore the recompute; the default gate: test_rebalancing_*recompute*).
    p = policy(rebalance_moves=True, warmup_per_backend=5, bal_threshold=1.5, rebalance_interval=0.0,
               rebalance_recompute=math.inf)
    groups = {g: [10_000 * g + j for j in range(40)] for g in range(4)}
    t, reasons, targets = 0.0, [], {}
    # Four prefix groups all cached on backend 0 keep exploiting it; backend 1 idles.
    for i in range(40):
        t += 0.1
        g = i % 4
        r = request(i, groups[g] + [1000 + i], prompt_tokens=41 * BS + 1)
        d = send(p, r, snap(t, backend(0, matched=40 * BS), backend(1)))
        reasons.append(d.reason)
        targets.setdefault(g, []).append(d.backend_id)
    assert reasons[:10] == ["exploit"] * 10  # warm-up: 5 requests per backend
    assert "rebalance" in reasons
    moved = [g for g, ts in targets.items() if ts[-1] == 1]
    assert 0 < len(moved) < 4  # some groups moved, never all (that would just swap the imbalance)


def test_single_dominant_group_is_not_moved_by_rebalancing():
    p = policy(rebalance_moves=True, warmup_per_backend=1, rebalance_interval=0.0)
    hot = list(range(40))
    for i in range(20):
        d = send(p, request(i, hot + [i + 500], prompt_tokens=41 * BS + 1), snap(i * 0.1, backend(0, matched=640), backend(1)))
        assert d.reason == "exploit" and d.backend_id == 0


def test_replication_when_ttft_doubles_and_undo():
    p = policy(window=20.0, rebalance_interval=0.0, warmup_per_backend=10_000)
    hot = list(range(30))
    t, reasons = 0.0, []
    for i in range(24):  # TTFT grows: 0.1 s in the older half of the window, 1 s in the newer
        t += 0.8
        r = request(i, hot + [2000 + i], prompt_tokens=31 * BS + 1)
        d = send(p, r, snap(t, backend(0, matched=30 * BS), backend(1)))
        reasons.append(d.reason)
        p.on_first_token(r, d.backend_id, t + (0.1 if i < 12 else 1.0))
        p.on_finished(r, d.backend_id, t + 1.5, output_tokens=10)
    assert reasons[:12] == ["exploit"] * 12
    assert reasons[-1] == "replica"
    r = request("x", hot + [9999], prompt_tokens=31 * BS + 1)
    d = p.choose(r, snap(t + 0.5, backend(0, matched=30 * BS), backend(1, matched=0)))
    assert d.reason == "replica" and set(d.costs) == {0, 1}
    # The group cools down: no traffic for two windows; then the extra holder is dropped.
    t += 40.0
    send(p, request("y", range(7000, 7030)), snap(t, backend(0), backend(1)))
    d = p.choose(request("z", hot + [1], prompt_tokens=31 * BS + 1), snap(t + 1, backend(0, matched=30 * BS), backend(1)))
    assert d.reason == "exploit"


def test_prefill_decode_balance_sends_prefill_heavy_work_to_decode_heavy_backend():
    p = policy()
    # Backend 1 recently served high-hit (decode-heavy) requests; backend 0 cache misses. Equal-ish loads.
    for i in range(4):
        p.on_dispatched(request(f"d{i}", range(10)), _decision(1, 150), snap(i, backend(0), backend(1)))
        p.on_dispatched(request(f"p{i}", range(100 + 10 * i, 110 + 10 * i)), _decision(0, 0), snap(i, backend(0), backend(1)))
    d = p.choose(request("new", range(900, 910)), snap(5, backend(0), backend(1)))
    assert (d.backend_id, d.reason) == (1, "pd_balance")


def test_choose_has_no_side_effects():
    p = policy()
    r = request(1, range(10))
    s = snap(0, backend(0), backend(1))
    assert p.choose(r, s) == p.choose(r, s)
    assert p.load_ms(0, 0) == p.load_ms(1, 0) == 0 and p.tree.nodes == 0


def test_time_model_learns_from_idle_prefills():
    tm = TimeModel(a=0.0, b=1.0, d=0.0, e=0.0)
    for n in range(1, 40):
        for c in (n, n + 100):
            tm.observe_prefill(n * 10, c * 10, 5.0 + 0.02 * n * 10 + 0.001 * c * 10)
    assert tm.prefill_ms(1000, 2000) == pytest.approx(5 + 20 + 2, rel=0.05)


def _decision(backend_id, matched):
    from preble_router.policies import Decision

    return Decision(backend_id, "test", matched)


def test_outstanding_work_counts_in_load():
    p = policy()
    busy = BackendState(0, "gpu0", 0, 3, 3000, 2, None, 0)  # 3000 prompt tokens still to prefill
    d = p.choose(request(1, range(100, 110)), snap(0, busy, backend(1)))
    assert (d.backend_id, d.reason) == (1, "explore") and d.costs[0] > d.costs[1]
    window_only = policy(load_signal="window")
    d = window_only.choose(request(1, range(100, 110)), snap(0, busy, backend(1)))
    assert d.costs[0] == d.costs[1]  # the paper's L sees only what was sent within H


def test_prefill_decode_balance_never_evicts_hot_prefixes():
    p = policy()
    for i in range(4):  # backend 1 is decode-heavy and full of a prefix used 4 times recently
        p.on_dispatched(request(f"d{i}", range(10)), _decision(1, 150), snap(i, backend(0), backend(1)))
        p.on_dispatched(request(f"p{i}", range(100 + 10 * i, 110 + 10 * i)), _decision(0, 0), snap(i, backend(0), backend(1)))
    full = dict(capacity=10, cached=10)
    d = p.choose(request("new", range(900, 910)), snap(5, backend(0), backend(1, **full)))
    assert d.reason == "explore"


def test_time_model_calibrates_from_the_first_idle_prefill():
    tm = TimeModel(a=0.0, b=0.01, d=0.0, e=0.0)  # a profile 10x too fast
    tm.observe_prefill(1000, 1000, 100.0)
    assert tm.prefill_ms(2000, 2000) == pytest.approx(200.0)


def test_time_model_ignores_a_zero_time_to_first_token():
    """A TTFT of 0 ms (a clock that did not tick between dispatch and first token) is no measurement: it once set
    the calibration scale to 0 (every prefill free) and the next sample divided by it."""
    tm = TimeModel(a=0.0, b=0.01, d=0.0, e=0.0)
    tm.observe_prefill(1000, 1000, 0.0)
    tm.observe_prefill(1000, 1000, 100.0)
    assert tm.prefill_ms(2000, 2000) == pytest.approx(200.0)


def test_a_long_running_prefill_counts_only_what_is_left():
    p = policy(load_signal="outstanding")
    big = request("big", range(1000, 1100))  # 1601 tokens: 161 ms of prefill at 0.1 ms/token
    s0 = snap(0.0, backend(0), backend(1))
    p.on_dispatched(big, _decision(0, 0), s0)
    busy = BackendState(0, "gpu0", 0, 1, big.prompt_tokens, 0, None, 0)
    early = p._remaining_prefill_ms(busy, 0.0)
    late = p._remaining_prefill_ms(busy, 0.1)  # 100 ms later
    assert early == pytest.approx(p.time.prefill_ms(big.prompt_tokens, big.prompt_tokens))
    assert late == pytest.approx(early - 100.0)
    assert p._remaining_prefill_ms(busy, 5.0) == 0.0
    p.on_first_token(big, 0, 0.2)
    done = BackendState(0, "gpu0", 0, 1, 0, 1, None, 0)
    assert p._remaining_prefill_ms(done, 0.2) == 0.0


def test_default_load_is_outstanding_work_not_history():
    p = policy()
    assert p.config.load_signal == "outstanding"
    # Backend 0 served a lot within H, all finished; backend 1 got one big request that is still prefilling.
    for i in range(20):
        r = request(f"old{i}", range(1000 * i, 1000 * i + 50))
        p.on_dispatched(r, _decision(0, 0), snap(i, backend(0), backend(1)))
        p.on_first_token(r, 0, i + 0.5)
        p.on_finished(r, 0, i + 0.6, output_tokens=10)
    big = request("big", range(90_000, 90_300))  # 4801 tokens: 481 ms of prefill
    p.on_dispatched(big, _decision(1, 0), snap(30, backend(0), backend(1)))
    busy = BackendState(1, "gpu1", 0, 1, big.prompt_tokens, 0, None, 0)
    d = p.choose(request("new", range(5000, 5010)), snap(30.1, backend(0), busy))
    assert p.load_ms(0, 30.1) > p.load_ms(1, 30.1)  # the paper's window L would pick backend 1
    assert (d.backend_id, d.reason) == (0, "explore")


def test_outstanding_decode_counts_only_what_is_left():
    p = policy()  # decode 1 ms per token
    r = request("r", range(50), max_tokens=100)
    p.on_dispatched(r, _decision(0, 0), snap(0, backend(0), backend(1)))
    p.on_first_token(r, 0, 1.0)
    running = BackendState(0, "gpu0", 0, 1, 0, 1, None, 0)
    assert p._remaining_decode_ms(running, 1.0) == pytest.approx(100.0)
    assert p._remaining_decode_ms(running, 1.06) == pytest.approx(40.0)
    assert p._remaining_decode_ms(running, 2.0) == 0.0
    other = BackendState(0, "gpu0", 0, 2, 0, 2, None, 0)  # plus one request another router sent
    assert p._remaining_decode_ms(other, 2.0) == pytest.approx(p.config.default_output_tokens / 2)
    p.on_finished(r, 0, 2.0, output_tokens=100)
    assert p._remaining_decode_ms(BackendState(0, "gpu0", 0, 0, 0, 0, None, 0), 2.0) == 0.0


def _backed_up(p, backend_id, tokens, now):
    """Send backend_id an uncached prompt of `tokens` tokens; return its state while that prefill is pending."""
    big = request(f"big{backend_id}", range(70_000, 70_000 + tokens // BS), prompt_tokens=tokens)
    p.on_dispatched(big, _decision(backend_id, 0), snap(now, backend(0), backend(1)))
    return big


def test_overflow_leaves_a_backed_up_holder():
    hot = list(range(30))
    r = request("q", hot + [999], prompt_tokens=31 * BS + 1)  # 480 of 497 tokens cached on backend 0
    p = policy()
    _backed_up(p, 0, 20_000, 0.0)  # ~2 s of prefill queued on backend 0
    busy = BackendState(0, "gpu0", 30 * BS, 1, 20_000, 0, None, 0)
    d = p.choose(r, snap(0.1, busy, backend(1)))
    assert (d.backend_id, d.reason) == (1, "overflow")
    assert d.costs[0] > d.costs[1]
    paper = policy(exploit_overflow=math.inf)  # the paper's exploit: the longest match whatever its queue
    _backed_up(paper, 0, 20_000, 0.0)
    assert paper.choose(r, snap(0.1, busy, backend(1))).reason == "exploit"
    # A short backlog: recomputing 497 tokens elsewhere costs more than waiting; stay.
    q = policy()
    _backed_up(q, 0, 400, 0.0)
    d = q.choose(r, snap(0.0, BackendState(0, "gpu0", 30 * BS, 1, 400, 0, None, 0), backend(1)))
    assert (d.backend_id, d.reason) == (0, "exploit")


def test_overflow_ignores_decode_work_on_the_holder():
    """Running decodes do not delay a new request's prefill (vLLM batches them together): a holder busy only
    decoding keeps its cache hits, however much decode is left there."""
    hot = list(range(30))
    r = request("q", hot + [999], prompt_tokens=31 * BS + 1)
    p = policy()
    for i in range(20):  # 20 of our requests decoding on backend 0, 2000 tokens each still to go
        long = request(f"d{i}", range(80_000 + 10 * i, 80_010 + 10 * i), max_tokens=2000)
        p.on_dispatched(long, _decision(0, 0), snap(0.0, backend(0), backend(1)))
        p.on_first_token(long, 0, 0.01)
    assert p._load_term(BackendState(0, "gpu0", 0, 20, 0, 20, None, 0), 0.02) > 10_000  # L sees ~40 s of decode
    d = p.choose(r, snap(0.02, BackendState(0, "gpu0", 30 * BS, 20, 0, 20, None, 0), backend(1)))
    assert (d.backend_id, d.reason) == (0, "exploit")


def test_overflow_counts_what_it_would_evict():
    hot = list(range(30))
    r = request("q", hot + [999], prompt_tokens=31 * BS + 1)
    p = policy()
    for i in range(50):  # backend 1 is full of a prefix used 50 times within H
        p.on_dispatched(request(f"h{i}", range(500, 540)), _decision(1, 0), snap(i * 0.01, backend(0), backend(1)))
    _backed_up(p, 0, 20_000, 0.5)
    busy = BackendState(0, "gpu0", 30 * BS, 1, 20_000, 0, None, 0)
    d = p.choose(r, snap(0.6, busy, backend(1, capacity=40, cached=40)))
    assert (d.backend_id, d.reason) == (0, "exploit")


def test_eviction_charges_only_the_part_of_a_node_that_must_go():
    p = policy(load_signal="window", eviction_pending=False)  # M as the events report it (these dispatches stay queued)
    for t in range(5):  # a 40-block prefix used 5 times on backend 0
        p.on_dispatched(request(f"h{t}", range(40)), _decision(0, 0), snap(t, backend(0), backend(1)))
    for need in (4, 40):
        d = p.choose(request(f"n{need}", range(500, 500 + need), prompt_tokens=need * BS),
                     snap(6, backend(0, capacity=40, cached=40), backend(1)))
        evict = d.costs[0] - p.load_ms(0, 6) - (d.costs[1] - p.load_ms(1, 6))
        # tail `need` blocks of the hot node, recomputed on a 40-block context, times its 5 uses
        assert evict == pytest.approx(5 * p.time.prefill_ms(need * BS, 40 * BS))


# ---- rebalancing pays for its moves (rebalance_recompute) ------------------------------------------------------

def _rebalance_workload(p, doc_blocks=200, steps=60):
    """Backend 0 holds a long document group (one cold prefill, then a few cheap questions) and four tool groups
    (cheap, frequent); backend 1 idles. Returns the backends each group was last sent to."""
    doc = [90_000 + j for j in range(doc_blocks)]
    tools = {g: [10_000 * (g + 1) + j for j in range(20)] for g in range(4)}
    last, t = {}, 0.0
    for i in range(steps):
        t += 0.1
        if i % 6 == 5:
            name, keys = "doc", doc
        else:
            name, keys = i % 4, tools[i % 4]
        r = request(i, keys + [1000 + i], prompt_tokens=(len(keys) + 1) * BS + 1, max_tokens=20)
        d = send(p, r, snap(t, backend(0, matched=len(keys) * BS if i >= 6 else 0), backend(1)))
        last[name] = d.backend_id
    return last


def test_rebalancing_moves_no_group_by_default():
    """Moves are off unless asked for (PrebleConfig.rebalance_moves): the workload that moves groups with them on
    leaves every group where its cache is."""
    p = policy(warmup_per_backend=5, rebalance_interval=0.0, rebalance_recompute=math.inf)
    last = _rebalance_workload(p)
    assert set(last.values()) == {0} and not p._moved


def test_rebalancing_never_moves_a_group_whose_recompute_exceeds_its_recurring_load():
    p = policy(rebalance_moves=True, warmup_per_backend=5, rebalance_interval=0.0)  # default rebalance_recompute=1
    last = _rebalance_workload(p)
    assert last["doc"] == 0  # 200 blocks to recompute on backend 1 for a few short questions: stays
    assert any(last[g] == 1 for g in range(4))  # cheap tool groups still move
    for move in p._moved.values():
        assert (p.config.rebalance_recompute * p.recompute_ms(move.group, move.target)
                <= p._group_load[0][id(move.group)].recurring_ms + 1e-9)


def test_paper_rebalancing_moves_the_long_group_too():
    p = policy(rebalance_moves=True, warmup_per_backend=5, rebalance_interval=0.0, rebalance_recompute=math.inf)
    last = _rebalance_workload(p)
    assert last["doc"] == 1  # the paper's rule: any group under chain_tokens moves, whatever its recompute


def test_recurring_load_excludes_the_groups_own_cold_prefill():
    p = policy()
    doc = list(range(100))
    send(p, request("cold", doc + [5000], prompt_tokens=101 * BS + 1, max_tokens=10), snap(0, backend(0), backend(1)))
    slot = next(iter(p._group_load[0].values()))
    assert slot.ms > p.time.prefill_ms(100 * BS, 100 * BS)  # the window load counts the cold prefill
    assert slot.recurring_ms < slot.ms / 10  # the recurring load does not: a move would not save it


def test_recompute_counts_only_what_the_light_backend_lacks():
    p = policy()
    sysp = list(range(30))
    send(p, request("a", sysp + list(range(100, 110))), snap(0, backend(0), backend(1)))
    send(p, request("b", sysp + list(range(200, 210))), snap(1, backend(0, matched=30 * BS), backend(1)))
    p.on_dispatched(request("c", sysp + list(range(300, 310))), _decision(1, 0), snap(2, backend(0), backend(1)))
    group = p.tree.deepest_shared(sysp + list(range(100, 110)))  # the 40-block path of "a"
    assert group.end_blocks == 40
    # backend 1 holds the shared 30-block system prompt: only the 10-block tail is recomputed there
    assert p.recompute_ms(group, 1) == pytest.approx(p.time.prefill_ms(10 * BS, 40 * BS))
    assert p.recompute_ms(group, 0) == 0.0


def test_prefix_group_is_the_deepest_shared_node_whatever_the_sequence_type():
    """RouteRequest.block_hashes is a tuple: its group must be the deepest whole node on its path, as for a list
    (a tuple slice never equals a list run, which once ended every path at its first node)."""
    from preble_router.policies.prefix_tree import PrefixTree

    tree = PrefixTree(60.0)
    tree.insert(list(range(10)), 0, 0.0)  # system prompt + tool A
    tree.insert(list(range(5)) + list(range(20, 26)), 0, 0.0)  # the same system prompt + tool B
    query = list(range(5)) + list(range(20, 26)) + [99, 98]  # tool B, a new question
    for keys in (query, tuple(query)):
        assert [len(n.keys) for n in tree.path(keys)] == [5, 6]
        assert tree.deepest_shared(keys).end_blocks == 11
    assert tree.deepest_shared(range(10)).end_blocks == 10


# ---- the tree learns evictions (on_blocks_evicted) -----------------------------------------------------------------

def test_evicted_blocks_leave_the_tree_and_m():
    p = policy(load_signal="window", eviction_pending=False)  # M as the events report it (these dispatches stay queued)
    for t in range(5):  # a hot 40-block prefix on backend 0
        p.on_dispatched(request(f"h{t}", range(40)), _decision(0, 0), snap(t, backend(0), backend(1)))
    full = dict(capacity=40, cached=40)

    def evict_cost(now):
        d = p.choose(request(f"n{now}", range(500, 540), prompt_tokens=40 * BS), snap(now, backend(0, **full), backend(1)))
        return d.costs[0] - p.load_ms(0, now) - (d.costs[1] - p.load_ms(1, now))

    assert evict_cost(6) == pytest.approx(5 * p.time.prefill_ms(40 * BS, 40 * BS))
    p.on_blocks_evicted(0, list(range(30, 40)))  # the engine evicted the tail (its LRU end): 30 blocks left
    node = p.tree.deepest_shared(range(40))
    assert node.held_keys(0) == 30
    assert evict_cost(7) == pytest.approx(5 * p.time.prefill_ms(30 * BS, 30 * BS))
    p.on_blocks_evicted(0, [0])  # the first block: nothing of the prefix is usable there any more
    assert list(p.tree.lru_oldest_first(0)) == []
    assert evict_cost(8) == 0.0


def test_eviction_cuts_a_node_at_its_earliest_evicted_block_whatever_the_order():
    from preble_router.policies.prefix_tree import PrefixTree

    tree = PrefixTree(window=100.0)
    tree.insert(list(range(40)), 0, 0.0)
    tree.evict(0, [35, 36, 20, 37])  # a window, then a block nearer the start, out of order
    assert tree.deepest_shared(range(40)).held_keys(0) == 20
    tree.evict(0, [38, 39])  # below the cut already: nothing changes
    assert tree.deepest_shared(range(40)).held_keys(0) == 20


def test_eviction_batches_in_any_order_cut_each_node_at_its_earliest_evicted_block():
    """Runs in chain order, reversed (an engine frees a request's tail first), mixed with unknown keys, or
    shuffled past the run detection's limit: each node keeps exactly the blocks before its earliest evicted
    one, as a key-by-key reference computes it."""
    import random

    from preble_router.policies.prefix_tree import PrefixTree

    rng = random.Random(7)
    for trial in range(200):
        tree = PrefixTree(window=100.0)
        prompts = [[1000 * (p + 1) + i for i in range(rng.randrange(5, 60))] for p in range(4)]
        shared = list(range(rng.randrange(1, 30)))  # a common prefix, so nodes split
        for p, keys in enumerate(prompts):
            tree.insert(shared + keys, 0, float(p))
        nodes = {id(n): n for n in tree.lru_oldest_first(0)}
        batch: list[int] = []
        for keys in rng.sample([shared] + prompts, 3):
            lo = rng.randrange(len(keys))
            run = keys[lo : lo + rng.randrange(1, 20)]
            batch += run[::-1] if rng.random() < 0.4 else run
        batch += [-1, -2][: rng.randrange(3)]  # keys the tree never saw
        if trial % 4 == 0:
            rng.shuffle(batch)
        evicted = set(batch)
        want = {}
        for node_id, node in nodes.items():
            first = next((i for i, k in enumerate(node.keys) if k in evicted), None)
            want[node_id] = node.held_keys(0) if first is None else min(first, node.held_keys(0))
        tree.evict(0, batch)
        for node_id, node in nodes.items():  # a node cut above, or at its first block, loses the backend
            ancestors_cut, up = False, node.parent
            while up is not None and up.parent is not None:
                ancestors_cut |= want[id(up)] < len(up.keys)
                up = up.parent
            if ancestors_cut or want[node_id] == 0:
                assert 0 not in node.last_use, (trial, batch)
            else:
                assert node.held_keys(0) == want[node_id], (trial, batch)


def test_eviction_of_a_parent_block_drops_the_subtree_and_routing_restores_it():
    from preble_router.policies.prefix_tree import PrefixTree

    tree = PrefixTree(window=100.0)
    tree.insert(list(range(10)) + [100, 101], 0, 0.0)
    tree.insert(list(range(10)) + [200, 201], 0, 1.0)
    tree.insert(list(range(10)) + [200, 201], 1, 1.0)
    shared = tree.deepest_shared(list(range(10)))
    assert shared.end_blocks == 10 and len(shared.children) == 2
    assert tree.evict(0, [5]) == 2  # both tails lose backend 0; the shared node keeps blocks 0-4 there
    assert shared.held_keys(0) == 5 and shared.held_keys(1) == 10
    assert {id(n) for n in tree.lru_oldest_first(0)} == {id(shared)}
    assert tree.deepest_shared(list(range(10)) + [100, 101]).end_blocks == 10  # tail 100 was held by 0 only: gone
    tree.evict(0, [7, 8])  # already cut below: no change
    assert shared.held_keys(0) == 5
    tree.insert(list(range(10)) + [100, 101], 0, 2.0)  # routed there again: the engine recomputes it
    assert shared.held_keys(0) == 10 and len(list(tree.lru_oldest_first(0))) == 2
    tree.evict(1, list(range(10)))
    assert all(1 not in n.last_use for n in tree.lru_oldest_first(0))
    tree.evict(0, [0])
    assert tree.nodes == 0 and not tree._by_key


def test_split_keeps_a_partial_hold_on_the_right_side():
    from preble_router.policies.prefix_tree import PrefixTree

    tree = PrefixTree(window=100.0)
    tree.insert(list(range(10)), 0, 0.0)
    tree.insert(list(range(10)), 1, 0.0)
    tree.evict(0, [3])  # backend 0 keeps blocks 0-2
    tree.insert(list(range(6)) + [50], 1, 1.0)  # splits the node after block 6
    upper = tree.deepest_shared(list(range(6)))
    lower = tree.deepest_shared(list(range(10)))
    assert upper.end_blocks == 6 and lower.start_blocks == 6
    assert upper.held_keys(0) == 3 and 0 not in lower.last_use and lower.held_keys(1) == 4
    assert tree._by_key[2] is upper and tree._by_key[8] is lower


def test_stateless_policies_accept_evictions():
    """The Router reports every eviction to its policy; the stateless ones keep no block history, so evicting the
    very blocks a request matches, between dispatches, leaves each decision as it is without evictions."""
    from preble_router.policies import make_policy

    expected = {
        "cache_aware": [(0, "cache_hit")] * 4,  # backend 0 holds 8 of the request's 10 blocks
        "least_load": [(0, "least_load"), (1, "least_load")] * 2,  # backend 0 has one in flight every other step
        "round_robin": [(0, "round_robin"), (1, "round_robin")] * 2,  # its turn survives the evictions
    }
    for name, want in expected.items():
        p, twin = make_policy(name), make_policy(name)
        decisions, twin_decisions = [], []
        for i in range(4):
            req, s = request(f"r{i}", range(10)), snap(i, backend(0, matched=8 * BS, in_flight=i % 2), backend(1))
            assert p.on_blocks_evicted(i % 2, list(range(10))) is None  # p only: twin never hears of one
            decisions.append(send(p, req, s))
            twin_decisions.append(send(twin, req, s))
        assert [(d.backend_id, d.reason) for d in decisions] == want, name
        assert decisions == twin_decisions, name


def _served(p, rid, keys, backend_id, now, uses=1):
    for u in range(uses):
        r = request(f"{rid}{u}", keys)
        p.on_dispatched(r, _decision(backend_id, 0), snap(now + u * 0.01, backend(0), backend(1)))
        p.on_first_token(r, backend_id, now + u * 0.01 + 0.001)
        p.on_finished(r, backend_id, now + u * 0.01 + 0.002, output_tokens=2)


def _m(p, req, state, now):
    return p._eviction(req, state, now)


def test_eviction_counts_the_blocks_inflight_prefills_will_take():
    p = policy()
    _served(p, "hot", range(20), 0, 0.0, uses=5)  # a hot 20-block prefix on backend 0
    p.on_dispatched(request("cold", range(300, 330), prompt_tokens=30 * BS), _decision(0, 0), snap(1, backend(0), backend(1)))  # 30 blocks queued
    new = request("n", range(500, 520), prompt_tokens=20 * BS)
    state = backend(0, capacity=60, cached=20)  # 40 free by the events, 10 once the queued prefill stores
    assert _m(p, new, state, 2) == pytest.approx(5 * p.time.prefill_ms(10 * BS, 20 * BS))
    blind = policy(eviction_pending=False)
    _served(blind, "hot", range(20), 0, 0.0, uses=5)
    blind.on_dispatched(request("cold", range(300, 330), prompt_tokens=30 * BS), _decision(0, 0), snap(1, backend(0), backend(1)))
    assert _m(blind, new, state, 2) == 0.0


def test_queued_prefills_evict_the_oldest_blocks_first():
    p = policy()
    _served(p, "old", range(20), 0, 0.0, uses=1)  # least recently used: the queued request evicts it
    _served(p, "hot", range(100, 120), 0, 1.0, uses=5)
    p.on_dispatched(request("cold", range(300, 320), prompt_tokens=20 * BS), _decision(0, 0), snap(2, backend(0), backend(1)))
    new = request("n", range(500, 520), prompt_tokens=20 * BS)
    state = backend(0, capacity=40, cached=40)
    assert _m(p, new, state, 3) == pytest.approx(5 * p.time.prefill_ms(20 * BS, 20 * BS))  # charged for "hot"
    blind = policy(eviction_pending=False)
    _served(blind, "old", range(20), 0, 0.0, uses=1)
    _served(blind, "hot", range(100, 120), 0, 1.0, uses=5)
    assert _m(blind, new, state, 3) == pytest.approx(1 * p.time.prefill_ms(20 * BS, 20 * BS))  # only "old"


def test_config_strings_become_enums_and_bad_ones_fail():
    from preble_router.policies.preble import CostModel, LoadSignal

    assert PrebleConfig().cost_model is CostModel.SHARING  # the default (docs/design.md says why)
    cfg = PrebleConfig(load_signal="window", cost_model="sharing")
    assert cfg.load_signal is LoadSignal.WINDOW and cfg.cost_model is CostModel.SHARING
    with pytest.raises(ValueError):
        PrebleConfig(load_signal="history")
    with pytest.raises(ValueError):
        PrebleConfig(cost_model="fifo")


def test_every_reason_is_a_reason():
    from preble_router.policies import Reason

    p = policy()
    r = request(1, range(10))
    for d in (p.choose(r, snap(0, backend(0, matched=96), backend(1))), p.choose(r, snap(0, backend(0), backend(1)))):
        assert isinstance(d.reason, Reason)


def test_sharing_cost_is_work_times_the_batch_it_joins():
    p = policy(cost_model="sharing")
    r = request(1, range(10))  # 161 tokens; P = 0.1 ms a token (a=1.0 fixed) in this time model
    # The holder's batch is small: stay (exploit), whatever the other's idle state.
    d = p.choose(r, snap(0, backend(0, matched=144, in_flight=1), backend(1)))
    assert (d.backend_id, d.reason) == (0, "exploit")
    assert d.costs[0] == pytest.approx(p._prefill(r, backend(0, matched=144)) * 2)
    assert d.costs[1] == pytest.approx(p._prefill(r, backend(1)) * 1)
    # A holder with a batch large enough that recomputing elsewhere is cheaper loses the request (overflow).
    d = p.choose(r, snap(0, backend(0, matched=144, in_flight=40), backend(1)))
    assert (d.backend_id, d.reason) == (1, "overflow")
    # No useful match: the least (M + P) x (in flight + 1) explores.
    d = p.choose(r, snap(0, backend(0, in_flight=3), backend(1, in_flight=1)))
    assert (d.backend_id, d.reason) == (1, "explore")
    # A fully cached prompt still counts its batch (P floored at one token's prefill).
    d = p.choose(r, snap(0, backend(0, matched=161, in_flight=5), backend(1, matched=161, in_flight=2)))
    assert d.backend_id == 1 and d.costs[0] > d.costs[1] > 0


def test_sharing_cost_with_decode_counts_the_batch_the_output_shares():
    """decode_in_cost: (M + P + D) x (in flight + 1). A cache hit's prefill saving is small next to the decode it
    will share with the holder's batch, so a holder with a few requests in flight loses to an idle backend that
    (M + P) alone would never pick."""
    r = request(1, range(10), max_tokens=100)  # 161 tokens; D = 100 tokens x 1 ms in this time model
    cluster = snap(0, backend(0, matched=144, in_flight=2), backend(1))
    plain = policy(cost_model="sharing").choose(r, cluster)
    assert (plain.backend_id, plain.reason) == (0, "exploit")  # (1 + 1.7) x 3 = 8.1 < 1 + 16.1 = 17.1
    p = policy(cost_model="sharing", decode_in_cost=1)
    with_decode = p.choose(r, cluster)
    assert (with_decode.backend_id, with_decode.reason) == (1, "overflow")  # (2.7 + 100) x 3 > 17.1 + 100
    assert with_decode.costs[0] == pytest.approx((p._prefill(r, backend(0, matched=144)) + 100.0) * 3)
    # Without max_tokens the default output is assumed; an idle holder still wins.
    r2 = request(2, range(10), max_tokens=None)
    d = p.choose(r2, snap(0, backend(0, matched=144), backend(1)))
    assert (d.backend_id, d.reason) == (0, "exploit")
    assert d.costs[1] - d.costs[0] == pytest.approx(p._prefill(r2, backend(1)) - p._prefill(r2, backend(0, matched=144)))
