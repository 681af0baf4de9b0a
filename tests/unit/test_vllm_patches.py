"""vllm_patches: Preble's local scheduler queue, unit tests with fakes (one real vLLM CPU replica running the
scheduler: tests/e2e/test_e2e_vllm_patches.py)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import pytest

from vllm_patches.group_queue import AGED, PrebleRequestQueue, hit_group


@dataclass(eq=False)  # hashed by identity, like vLLM's Request
class FakeRequest:
    """A stand-in for vllm.v1.request.Request with the fields the queue reads."""

    request_id: str
    num_prompt_tokens: int = 100
    num_computed_tokens: int = 0


class FakePrefixCache:
    """Cached prompt tokens per request id (what the engine's prefix-cache lookup would answer)."""

    def __init__(self) -> None:
        self.cached: dict[str, int] = {}
        self.lookups = 0

    def __call__(self, request: FakeRequest) -> int:
        self.lookups += 1
        return self.cached.get(request.request_id, 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_queue(**kw):
    cache, clock = FakePrefixCache(), FakeClock()
    q = PrebleRequestQueue(cache, clock=clock, **{"refresh_s": 0.0, **kw})
    return q, cache, clock


def add(q, cache, rid: str, cached: int, prompt: int = 100) -> FakeRequest:
    r = FakeRequest(rid, prompt)
    cache.cached[rid] = cached
    q.add_request(r)
    return r


def drain(q) -> list[str]:
    out = []
    while q:
        q.peek_request()
        out.append(q.pop_request().request_id)
    return out


# --- grouping --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cached,prompt,group",
    [(0, 100, 0), (1, 100, 0), (10, 100, 0), (11, 100, 1), (20, 100, 1), (30, 100, 2), (31, 100, 3),
     (90, 100, 8), (91, 100, 9), (100, 100, 9), (150, 100, 9), (5, 0, 0), (512, 544, 9), (3, 7, 4)],
)
def test_hit_group_is_ceil_10h_minus_1_with_zero_for_no_hit(cached, prompt, group):
    assert hit_group(cached, prompt) == group


def test_groups_served_from_highest_down_fcfs_inside():
    q, cache, _ = make_queue()
    add(q, cache, "low1", 0)
    add(q, cache, "mid1", 50)
    add(q, cache, "high1", 95)
    add(q, cache, "low2", 0)
    add(q, cache, "high2", 99)
    add(q, cache, "mid2", 45)
    assert q.snapshot()["groups"] == [2, 0, 0, 0, 2, 0, 0, 0, 0, 2]
    assert [r.request_id for r in q] == ["high1", "high2", "mid1", "mid2", "low1", "low2"]
    assert drain(q) == ["high1", "high2", "mid1", "mid2", "low1", "low2"]
    assert len(q) == 0 and not q


def test_turn_quota_is_g_plus_1_times_10():
    q, cache, _ = make_queue()
    for i in range(15):
        add(q, cache, f"L{i}", 0)
    for i in range(150):
        add(q, cache, f"H{i}", 100)
    order = drain(q)
    # group 9's turn: 100 admissions; group 0's turn: 10; back to group 9 (its last 50), then group 0's last 5
    assert order == ([f"H{i}" for i in range(100)] + [f"L{i}" for i in range(10)]
                     + [f"H{i}" for i in range(100, 150)] + [f"L{i}" for i in range(10, 15)])


def test_turn_ends_when_group_runs_empty_and_next_turn_wraps_to_the_top():
    q, cache, _ = make_queue()
    add(q, cache, "blocker", 0)  # engine idle: admitted at once, from group 0
    assert drain(q) == ["blocker"]
    # a burst queues while it runs: fresh prompts first, then prompts sharing a cached prefix
    for i in range(3):
        add(q, cache, f"L{i}", 0)
    for i in range(3):
        add(q, cache, f"H{i}", 94)
    assert drain(q) == ["H0", "H1", "H2", "L0", "L1", "L2"]


def test_turn_continues_across_steps_until_quota():
    q, cache, _ = make_queue()
    for i in range(12):
        add(q, cache, f"L{i}", 0)
    admitted = []
    for _step in range(10):  # one admission per step (e.g. --max-num-seqs 1)
        q.begin_step()
        q.peek_request()
        admitted.append(q.pop_request().request_id)
        if _step == 2:
            add(q, cache, "H", 100)  # arrives mid-turn of group 0
    # group 0's turn (10 admissions) is not cut short by the arrival; H comes right after it
    assert admitted == [f"L{i}" for i in range(10)]
    assert drain(q) == ["H", "L10", "L11"]


def test_age_bound_lets_a_starved_request_jump_ahead():
    q, cache, clock = make_queue(max_wait_s=5.0)
    add(q, cache, "L", 0)
    served = []
    for step in range(300):  # fully cached requests arrive faster than one admission per step
        add(q, cache, f"H{2 * step}", 100)
        add(q, cache, f"H{2 * step + 1}", 100)
        clock.now += 0.1
        q.begin_step()
        q.peek_request()
        served.append(q.pop_request().request_id)
        if "L" in served:
            break
    # without the bound L would wait for group 9's whole turn (100 admissions); with it, 5 s (50 steps)
    assert served[-1] == "L"
    assert 48 <= len(served) <= 52
    info = q.take_popped()["L"]
    assert info.lane == AGED and info.waited_s == pytest.approx(5.0, abs=0.11)


def test_aged_requests_are_fcfs_and_ahead_of_every_group():
    q, cache, clock = make_queue(max_wait_s=5.0)
    add(q, cache, "L0", 0)
    clock.now += 1
    add(q, cache, "M0", 50)
    clock.now += 1
    add(q, cache, "H0", 100)
    clock.now += 4.5  # L0 (6.5 s) and M0 (5.5 s) are past the bound, H0 (4.5 s) is not
    q.begin_step()
    assert q.snapshot()["aged"] == 2
    assert drain(q) == ["L0", "M0", "H0"]


def test_hit_ratio_is_refreshed_from_the_cache():
    q, cache, clock = make_queue(refresh_s=0.5)
    add(q, cache, "A", 0)
    add(q, cache, "B", 0)
    cache.cached["B"] = 100  # B's prefix got cached (e.g. by a request that ran meanwhile)
    clock.now += 0.1
    q.begin_step()  # first refresh is always due
    assert q.snapshot()["groups"][9] == 1
    cache.cached["A"] = 100
    clock.now += 0.1
    q.begin_step()  # within refresh_s: no re-grouping
    assert q.snapshot()["groups"][9] == 1
    clock.now += 0.5
    q.begin_step()
    assert q.snapshot()["groups"][9] == 2
    assert drain(q) == ["A", "B"]  # FCFS kept after re-grouping


def test_refresh_is_bounded_per_step_and_round_robin():
    q, cache, clock = make_queue(refresh_batch=2)
    reqs = [add(q, cache, f"r{i}", 0) for i in range(5)]
    for r in reqs:
        cache.cached[r.request_id] = 100
    cache.lookups = 0
    seen = []
    for _ in range(3):
        clock.now += 1
        q.begin_step()
        seen.append(q.snapshot()["groups"][9])
    assert cache.lookups == 6 and seen == [2, 4, 5]  # 2 lookups per step, everyone reached in turn
    assert [r.request_id for r in q] == [f"r{i}" for i in range(5)]  # FCFS kept through re-grouping


def test_peek_records_the_cache_hit_that_pop_reports():
    q, cache, _ = make_queue()
    add(q, cache, "A", 40)
    cache.cached["A"] = 64  # more got cached since enqueue; vLLM's lookup after the peek sees 64
    q.peek_request()
    q.pop_request()
    info = q.take_popped()["A"]
    assert (info.lane, info.cached, info.prompt) == (3, 64, 100)
    assert q.take_popped() == {}


def test_prepend_matches_vllm_fcfs_semantics_and_goes_first():
    q, cache, _ = make_queue()
    add(q, cache, "H", 100)
    pre = [FakeRequest("p1"), FakeRequest("p2"), FakeRequest("p3")]
    ref: deque = deque()
    # vLLM builds step_skipped with appendleft, then prepend_requests(step_skipped)
    skipped: deque = deque()
    for r in pre:
        skipped.appendleft(r)
    q.prepend_requests(skipped)
    ref.extendleft(skipped)
    q.prepend_request(FakeRequest("preempted"))
    ref.appendleft(FakeRequest("preempted"))
    assert [r.request_id for r in q] == [r.request_id for r in ref] + ["H"]
    assert drain(q) == ["preempted", "p1", "p2", "p3", "H"]


def test_remove_requests_from_every_lane():
    q, cache, clock = make_queue(max_wait_s=1.0)
    old = add(q, cache, "old", 0)
    clock.now += 2
    q.begin_step()
    a = add(q, cache, "a", 0)
    b = add(q, cache, "b", 100)
    front = FakeRequest("front")
    q.prepend_request(front)
    assert len(q) == 4
    q.remove_requests([old, b, front])
    assert len(q) == 1 and [r.request_id for r in q] == ["a"]
    q.remove_request(a)
    assert not q
    with pytest.raises(IndexError):
        q.peek_request()
    with pytest.raises(IndexError):
        q.pop_request()


def test_failed_lookup_counts_as_a_miss():
    def broken(_request):
        raise RuntimeError("boom")

    q = PrebleRequestQueue(broken)
    q.add_request(FakeRequest("x"))
    assert q.snapshot()["groups"][0] == 1
    assert q.peek_request().request_id == "x"


def test_snapshot_pending_prefill_tokens():
    q, cache, _ = make_queue()
    add(q, cache, "a", 30, prompt=100)
    add(q, cache, "b", 0, prompt=50)
    q.prepend_request(FakeRequest("c", num_prompt_tokens=40, num_computed_tokens=0))
    snap = q.snapshot()
    assert snap["pending_prefill_tokens"] == 70 + 50 + 40
    assert snap["front"] == 1 and sum(snap["groups"]) == 2


def test_iter_order_equals_pop_order_under_random_operations():
    rng = random.Random(7)
    q, cache, clock = make_queue(max_wait_s=3.0, quota_unit=2)
    n = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.5:
            add(q, cache, f"r{n}", rng.choice([0, 5, 33, 70, 100]), prompt=100)
            n += 1
        elif op < 0.6 and q:
            q.remove_request(rng.choice(list(q)))
        elif op < 0.7:
            clock.now += rng.random()
            q.begin_step()
        elif q:
            expected = list(q)
            got = [r.request_id for r in expected]
            assert q.peek_request() is expected[0]
            popped = q.pop_request()
            assert popped is expected[0]
            # the rest of the planned order is unchanged by the pop
            assert [r.request_id for r in q] == got[1:]
        assert len(q) == len(list(q))


def test_every_request_is_admitted_under_a_budgeted_loop():
    """vLLM's loop shape: per step admit until a budget says stop; nothing is lost or duplicated."""
    rng = random.Random(1)
    q, cache, clock = make_queue(max_wait_s=2.0)
    added, admitted = [], []
    for step in range(500):
        for _ in range(rng.randint(0, 3)):
            added.append(add(q, cache, f"r{len(added)}", rng.randint(0, 100)).request_id)
        clock.now += 0.05
        q.begin_step()
        budget = rng.randint(0, 3)
        while q and budget:
            r = q.peek_request()
            admitted.append(q.pop_request().request_id)
            assert admitted[-1] == r.request_id
            budget -= 1
    admitted += drain(q)
    assert sorted(admitted) == sorted(added) and len(set(admitted)) == len(added)
