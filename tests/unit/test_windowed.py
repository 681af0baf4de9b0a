"""WindowedSums: windowed running sums in bounded memory (preble_router/policies/windowed.py)."""

import random

from preble_router.policies.prefix_tree import PrefixTree
from preble_router.policies.windowed import WindowedSums


def test_sums_match_an_exact_window_up_to_one_slot():
    w = WindowedSums(10.0, fields=2, slots=10)  # 1 s slots
    rng = random.Random(0)
    events, t = [], 0.0
    for _ in range(5000):
        t += rng.expovariate(50.0)
        a, b = rng.random(), rng.randint(0, 9)
        w.add(t, a, b)
        events.append((t, a, b))
        assert len(w) <= 11
        exact_lo = sum(e[1] for e in events if e[0] >= t - 10.0)  # the window itself
        exact_hi = sum(e[1] for e in events if e[0] >= t - 11.0)  # plus at most one slot
        assert exact_lo - 1e-6 <= w.total(t, 0) <= exact_hi + 1e-6
    assert abs(w.total(t, 1) - sum(e[2] for e in events if e[0] >= (t - t % 1.0) - 10.0)) < 1e-6


def test_memory_is_bounded_by_the_slots_not_the_rate():
    w = WindowedSums(180.0)
    for i in range(200_000):  # 2000 req/s for 100 s
        w.add(i / 2000, 1.0)
    assert len(w) <= 33
    assert w.total(100.0) == 200_000


def test_correction_counts_while_the_slot_is_in_the_window_only():
    w = WindowedSums(10.0, slots=10)
    slot = w.add(0.5, 5.0)
    assert w.correct(slot, 0, 2.0, now=5.0) and w.total(5.0) == 7.0
    assert not w.correct(slot, 0, 2.0, now=11.5)  # the slot [0, 1) left the window at t = 11
    assert w.total(11.5) == 0.0


def test_since_splits_the_window_at_slot_boundaries():
    w = WindowedSums(10.0, fields=2, slots=10)
    for t in range(10):
        w.add(t + 0.5, 1.0, float(t))
    assert w.since(9.9, 5.0, 0) == 5  # slots starting at 5..9
    assert w.since(9.9, 5.0, 1) == 5 + 6 + 7 + 8 + 9


def test_copy_is_independent():
    w = WindowedSums(10.0)
    w.add(1.0, 1.0)
    c = w.copy()
    c.add(1.2, 1.0)
    assert w.total(2.0) == 1.0 and c.total(2.0) == 2.0


def test_a_hot_prefix_keeps_bounded_history_and_splits_cheaply():
    tree = PrefixTree(window=180.0)
    keys = list(range(1, 41))
    for i in range(100_000):  # one prefix, 1000 req/s
        tree.insert(keys, 0, i / 1000)
    node = tree.path(keys)[0]
    assert node.hits(0, 100.0) == 100_000 and len(node.uses[0]) <= 33
    tree.insert(keys[:20] + [999], 0, 100.0)  # a split copies the slots, not 100,000 use times
    upper = tree.path(keys)[0]
    assert len(upper.keys) == 20 and upper.hits(0, 100.0) == 100_001
