import random

import numpy as np

from preble_router.block_table import U64Map

_M64 = (1 << 64) - 1


def check(m: U64Map, ref: dict[int, int]) -> None:
    keys, vals, cap = m._keys.tolist(), m._vals.tolist(), m.capacity
    assert keys[-1] == 0
    for s, k in enumerate(keys):  # the class invariants: in its run, at or after its home, homes sorted
        if k:
            assert k % cap <= s and all(keys[k % cap:s])
            assert s == 0 or not keys[s - 1] or keys[s - 1] % cap <= k % cap
        else:
            assert vals[s] == 0
    assert len(m) == len(ref)
    for k, v in ref.items():
        assert m.get(k) == v and k in m
    keys, vals = m.items()
    assert dict(zip(keys.tolist(), vals.tolist())) == ref
    probe = np.array([*ref, 0, 1, _M64, *(random.getrandbits(64) for _ in range(50))], np.uint64)
    assert m.get_many(probe).tolist() == [ref.get(k, 0) for k in probe.tolist()]


def test_random_ops_match_a_dict():
    rng = random.Random(7)
    m, ref = U64Map(), {}
    pool = [rng.getrandbits(64) for _ in range(3000)] + [0, 1, 2, _M64]  # 0 is the empty-slot marker
    for step in range(30000):
        k = rng.choice(pool)
        if rng.random() < 0.55:
            v = rng.getrandbits(64) | 1
            m.put(k, v)
            ref[k] = v
        else:
            assert m.pop(k) == ref.pop(k, None)
        if step % 5000 == 0:
            check(m, ref)
    check(m, ref)


def test_colliding_keys_and_long_runs():
    # Keys congruent modulo the capacity share a home: runs go past get_many()'s window, and a run homed at the
    # last home slot goes past the tail (which must then grow); deletions shift the runs back.
    rng = random.Random(3)
    m, ref = U64Map(), {}
    for _ in range(1000):
        k = rng.getrandbits(64)
        m.put(k, 7)
        ref[k] = 7
    p = m.capacity
    keys = [j * p for j in range(1, 100)] + [(p - 1) + j * p for j in range(100)]
    for k in keys:
        m.put(k, k ^ 5)
        ref[k] = k ^ 5
    assert m.capacity == p and len(m._keys) > p + 100  # no growth, so they all collided; the tail grew
    check(m, ref)
    for k in keys[::3]:
        assert m.pop(k) == ref.pop(k)
    check(m, ref)
    for k in keys[1::3]:
        assert m.pop(k) == ref.pop(k)
    check(m, ref)


def test_grows_and_shrinks_back():
    m = U64Map()
    base = m.nbytes
    keys = [random.getrandbits(64) | 1 for _ in range(20000)]
    for k in keys:
        m.put(k, 3)
    assert m.capacity >= len(keys) / 0.7 and len(m) == len(keys)
    for k in keys:
        m.pop(k)
    assert len(m) == 0 and m.capacity <= 2 * 64 and m.nbytes <= 2 * base


def test_churn_at_fixed_size_keeps_capacity():
    rng = random.Random(1)
    m = U64Map()
    live = [rng.getrandbits(64) for _ in range(5000)]
    for k in live:
        m.put(k, 1)
    capacity = m.capacity
    for _ in range(50000):
        m.pop(live.pop(rng.randrange(len(live))))
        k = rng.getrandbits(64)
        live.append(k)
        m.put(k, 1)
    assert m.capacity == capacity
    check(m, dict.fromkeys(live, 1))


def test_replace_and_zero_key():
    m = U64Map()
    m.put(0, 9)
    m.put(5, 6)
    keys, vals = m.items()
    assert sorted(zip(keys.tolist(), vals.tolist())) == [(0, 9), (5, 6)]
    m.replace(keys[keys != 5], vals[keys != 5])
    check(m, {0: 9})
    m.replace(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    check(m, {})
