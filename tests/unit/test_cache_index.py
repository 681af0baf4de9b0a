import gc
import random
import tracemalloc
from collections import Counter, OrderedDict, defaultdict

import pytest

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


def test_predicted_blocks_expire_a_grace_after_their_request_ended():
    index = make()  # grace (predicted_ttl) 2 s
    keys = hash_blocks(list(range(8)), BS, ROOT)
    routed = index.record_routed(1, keys, now=10.0)
    assert index.match(keys, [0, 1], now=11.0) == {0: 0, 1: 2}
    assert index.match(keys, [0, 1], now=100.0) == {0: 0, 1: 2}  # still in flight (queued): still predicted
    index.release_routed(routed, now=100.0)
    assert index.match(keys, [0, 1], now=101.5) == {0: 0, 1: 2}
    assert index.match(keys, [0, 1], now=102.5) == {0: 0, 1: 0}
    assert index.blocks_held(1) == 0  # predictions are not confirmed blocks


def test_prediction_pinned_again_outlives_the_earlier_release():
    index = make()
    keys = hash_blocks(list(range(4)), BS, ROOT)
    first = index.record_routed(0, keys, now=0.0)
    index.record_routed(0, keys, now=1.5)  # a second request of the same new prefix, before any event
    index.release_routed(first, now=2.0)
    assert index.match(keys, [0], now=50.0) == {0: 1}  # the second one is still in flight


def test_confirmed_blocks_leave_the_predictions():
    index = make()
    tokens = list(range(2 * BS))
    keys = hash_blocks(tokens, BS, ROOT)
    routed = index.record_routed(0, keys, now=0.0)
    stored(index, 0, tokens, [11, 12])
    index.apply_removed(0, [11, 12])  # the engine evicted them after they were confirmed
    assert index.match(keys, [0], now=1.0) == {0: 0}
    index.release_routed(routed, now=1.0)  # nothing left to keep for the grace either
    assert index.match(keys, [0], now=1.5) == {0: 0}


def test_held_keys_are_not_predicted_again():
    index = make()
    tokens = list(range(3 * BS))
    keys = hash_blocks(tokens, BS, ROOT)
    stored(index, 0, tokens[:BS], [11])
    routed = index.record_routed(0, keys, now=0.0, held=1)
    assert list(routed.keys) == keys[1:]
    assert index.record_routed(0, keys[:1], now=0.0, held=1) is None  # nothing new: no prediction


def test_switch_to_estimate_keeps_what_was_known_and_back_clears_it():
    index = make(capacity=None)
    tokens = list(range(4 * BS))
    keys = hash_blocks(tokens, BS, ROOT)
    stored(index, 0, tokens[:2 * BS], [11, 12])
    index.record_routed(0, keys, now=0.0, held=2)  # blocks 3-4 predicted (in flight)
    assert index.match(keys, [0], now=0.5) == {0: 4}
    index.set_estimated(0, True, 100.0)  # events went silent
    assert index.is_estimated(0)
    assert index.match(keys, [0], now=100.0) == {0: 4}  # confirmed and in-flight blocks carried into the estimate
    assert index.blocks_held(0) == 4
    index.set_estimated(0, False, 100.0)  # events flow again: the engine's state is replayed from scratch
    assert not index.is_estimated(0)
    assert index.match(keys, [0], now=100.0) == {0: 0} and index.blocks_held(0) == 0


def test_estimated_mode_is_lru_bounded():
    index = make(estimated=True, capacity=3)
    a = hash_blocks(list(range(8)), BS, ROOT)
    b = hash_blocks(list(range(100, 108)), BS, ROOT)
    index.record_routed(0, a, 0.0)
    index.record_routed(0, b, 1.0)  # 4 blocks > capacity 3: the least recently used window, a's, goes whole
    assert index.blocks_held(0) == 2
    assert index.match(b, [0], 2.0) == {0: 2}
    assert index.match(a, [0], 2.0) == {0: 0}
    index.remove_backend(0)
    assert len(index) == 0


def test_estimated_lru_evicts_a_shared_prefix_from_its_end():
    index = make(estimated=True, capacity=60)
    shared = list(range(32 * BS))  # two windows of 16 blocks
    a = hash_blocks(shared + list(range(1000, 1000 + 16 * BS)), BS, ROOT)
    b = hash_blocks(shared + list(range(2000, 2000 + 16 * BS)), BS, ROOT)
    index.record_routed(0, a, 0.0)
    index.record_routed(0, b, 1.0, held=32)  # 64 blocks > 60: a's own window goes, the shared two stay
    assert index.blocks_held(0) == 48
    assert index.match(b, [0], 2.0) == {0: 48} and index.match(a, [0], 2.0) == {0: 32}
    index.record_routed(0, hash_blocks(list(range(3000, 3000 + 16 * BS)), BS, ROOT), 3.0)
    assert index.match(a, [0], 4.0) == {0: 32}  # b's own window goes next, not the shared prefix
    assert index.match(b, [0], 4.0) == {0: 32}


def test_estimated_window_refills_the_blocks_it_lost():
    # The shared part of a window belongs to the prompt that first brought it; when that prompt's window is
    # evicted, the next prompt through it adds the missing blocks to its own window.
    index = make(estimated=True, capacity=None)
    a = hash_blocks(list(range(20 * BS)), BS, ROOT)  # windows: blocks 0-15, 16-19
    b = hash_blocks(list(range(18 * BS)) + list(range(500, 500 + 6 * BS)), BS, ROOT)  # 0-15, then 16-23
    index.record_routed(0, a, 0.0)
    index.record_routed(0, b, 1.0, held=18)  # its second window owns blocks 18-23 only: 26 blocks held
    index.set_capacity(0, 24)  # a's tail window (blocks 16-19) is the least recently used: it goes
    assert index.blocks_held(0) == 22 and index.match(b, [0], 2.0) == {0: 16}
    index.record_routed(0, b, 3.0, held=16)
    assert index.match(b, [0], 4.0) == {0: 24} and index.blocks_held(0) == 24


def test_estimated_index_bytes_per_block_within_target():
    index = make(estimated=True, capacity=None)
    rng = random.Random(0)
    prompts = [[rng.getrandbits(64) for _ in range(64)] for _ in range(2 * 150)]
    gc.collect()
    tracemalloc.start()
    for i, keys in enumerate(prompts):
        index.record_routed(i % 2, keys, 0.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del prompts
    cached = index.blocks_held(0) + index.blocks_held(1)
    assert cached == 2 * 150 * 64 and used / cached <= 100, used / cached


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


# ---- compact storage: the index against a plain model of what it must answer -------------------------------------
class Model:
    """The index's semantics, the plain way: copies per backend, an LRU per estimated backend, predictions."""

    def __init__(self, ttl: float, estimated: dict[int, int]) -> None:
        self.ttl = ttl
        self.copies: dict[int, Counter] = defaultdict(Counter)
        # estimated backends: window key -> keys it owns (the index's windows, the plain way), key -> window
        self.spans = {b: OrderedDict() for b in estimated}
        self.owner: dict[int, dict] = {b: {} for b in estimated}
        self.capacity = estimated
        self.pred: dict[tuple[int, int], float] = {}

    def holds(self, b, key, now):
        p = self.pred.get((b, key), now)
        return self.copies[b][key] > 0 or key in self.owner.get(b, ()) or not isinstance(p, float) or p > now

    def match(self, keys, backends, now):
        return {b: next((i for i, k in enumerate(keys) if not self.holds(b, k, now)), len(keys)) for b in backends}

    def routed(self, b, keys, now):
        if b in self.spans:
            spans, owner = self.spans[b], self.owner[b]
            for start in reversed(range(0, len(keys), 16)):  # last window first: a prompt's head is the newest
                window = keys[min(start + 16, len(keys)) - 1]
                if window in spans:
                    spans.move_to_end(window)
                for k in keys[start:start + 16]:
                    if k not in owner:
                        owner[k] = window
                        spans.setdefault(window, set()).add(k)
            while len(owner) > self.capacity[b] and spans:
                for k in spans.popitem(last=False)[1]:
                    del owner[k]
        elif keys:  # pinned (inf) by this request until it ends
            pin = object()
            for k in keys:
                self.pred[(b, k)] = pin
            return (b, keys, pin)
        return None

    def released(self, handle, now):
        b, keys, pin = handle
        for k in keys:
            if self.pred.get((b, k)) is pin:
                self.pred[(b, k)] = now + self.ttl

    def confirmed(self, b, keys):
        for k in keys:
            self.pred.pop((b, k), None)

    def cleared(self, b):
        self.copies[b].clear()
        self.spans.get(b, {}).clear()
        self.owner.get(b, {}).clear()
        self.pred = {bk: e for bk, e in self.pred.items() if bk[0] != b}

    def held(self, b):
        return set(self.owner[b]) if b in self.owner else {k for k, c in self.copies[b].items() if c > 0}


@pytest.mark.parametrize("ids", [(0, 1, 2, 3), (0, 1, 65, 3)])  # 65: a second holder group (backends 64..127)
def test_random_events_and_requests_match_the_model(ids):
    rng = random.Random(sum(ids))
    b0, b1, b2, est = ids
    index = CacheIndex(predicted_ttl=2.0)
    for b in (b0, b1, b2):
        index.add_backend(b, model="m", estimated=False, capacity_blocks=None)
    index.add_backend(est, model="m", estimated=True, capacity_blocks=150)
    model = Model(2.0, {est: 150})
    # b0 and b1 hash blocks alike (same engine seed), b2 differently: its removals leave dead engine mappings.
    seed = {b0: 1, b1: 1, b2: 2}

    def eh(b, key):
        return hash((seed[b], key)) & ((1 << 64) - 1)

    shared = [rng.randrange(1000) for _ in range(600 * BS)]
    docs = [shared[: rng.randrange(0, 600) * BS] + [rng.randrange(1000) for _ in range(rng.randrange(1, 300) * BS)]
            for _ in range(8)]
    now = 0.0
    in_flight: list = []
    for step in range(600):
        now += rng.random() * 0.3
        doc = rng.choice(docs)
        keys = hash_blocks(doc, BS, ROOT)
        b = rng.choice((b0, b1, b2))
        op = rng.random()
        if op < 0.35:  # store blocks i0..i1, chained on block i0 - 1 when b holds it
            i1 = rng.randrange(1, len(keys) + 1)
            i0 = rng.randrange(0, i1) if rng.random() < 0.5 else 0
            if i0 and not model.copies[b][keys[i0 - 1]]:
                i0 = 0
            parent = eh(b, keys[i0 - 1]) if i0 else None
            index.apply_stored(b, [eh(b, k) for k in keys[i0:i1]], parent, doc[i0 * BS:i1 * BS], BS, None, None)
            for k in keys[i0:i1]:
                model.copies[b][k] += 1
            model.confirmed(b, keys[i0:i1])
        elif op < 0.65:  # remove some blocks, held or not
            gone = rng.sample(keys, rng.randrange(1, min(len(keys), 80) + 1))
            index.apply_removed(b, [eh(b, k) for k in gone])
            for k in gone:
                if model.copies[b][k]:
                    model.copies[b][k] -= 1
        elif op < 0.67:
            index.apply_cleared(b)
            model.cleared(b)
        else:  # a request: match on a prefix of a document plus a new tail, then route it
            n = rng.randrange(0, len(keys) + 1)
            prompt = keys[:n] + hash_blocks([rng.randrange(1000) for _ in range(rng.randrange(0, 40) * BS)], BS,
                                            keys[n - 1] if n else ROOT)
            backends = rng.sample(ids, rng.randrange(1, 5))
            assert index.match(prompt, backends, now) == model.match(prompt, backends, now)
            target = rng.choice((b0, b1, b2, est))
            routed = index.record_routed(target, prompt, now)
            handle = model.routed(target, prompt, now)
            assert (routed is None) == (handle is None)
            if routed is not None:
                in_flight.append((routed, handle))
            if in_flight and rng.random() < 0.5:  # a request ends
                routed, handle = in_flight.pop(rng.randrange(len(in_flight)))
                index.release_routed(routed, now)
                model.released(handle, now)
        if step % 50 == 0:
            for b in ids:
                assert index.blocks_held(b) == len(model.held(b))
            assert len(index) == len(set().union(*(model.held(b) for b in ids)))
    for b in ids:
        index.remove_backend(b)
    assert len(index) == 0 and len(index._engine_to_own) == 0


def test_dead_engine_hashes_are_swept():
    # Two backends hash each block differently and evict it in turn: the first removal must keep the block's
    # engine mapping (the key is still held), the second drops only its own; the first mapping is dead, and
    # must not pile up as blocks churn.
    index = make()
    for round_ in range(3000):
        tokens = [round_ * 16 + i for i in range(4 * BS)]
        index.apply_stored(0, [(round_ << 8) | i for i in range(4)], None, tokens, BS, None, None)
        index.apply_stored(1, [(round_ << 8) | 0x80 | i for i in range(4)], None, tokens, BS, None, None)
        index.apply_removed(0, [(round_ << 8) | i for i in range(4)])
        index.apply_removed(1, [(round_ << 8) | 0x80 | i for i in range(4)])
    assert len(index) == 0 and len(index._engine_to_own) < 1000  # without the sweep: 12000


def test_bytes_per_block_within_target():
    # The target: at most 100 bytes per cached block, blocks fed by KV events (1-token blocks here,
    # which changes nothing for the index and keeps the test fast).
    for shared in (False, True):
        index = make()
        events = {b: [([rng.getrandbits(64) for _ in range(64)], [rng.getrandbits(31) for _ in range(64)])
                      for rng in [random.Random(0 if shared else b)] for _ in range(150)] for b in (0, 1)}
        gc.collect()
        tracemalloc.start()
        for b in (0, 1):
            for engine, tokens in events[b]:
                index.apply_stored(b, engine, None, tokens, 1, None, None)
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        cached = index.blocks_held(0) + index.blocks_held(1)
        assert cached == 2 * 150 * 64 and used / cached <= 100, (shared, used / cached)


def test_key_zero_and_many_backends():
    index = CacheIndex(predicted_ttl=2.0)
    for b in (0, 63, 64, 200):
        index.add_backend(b, model="m", estimated=True, capacity_blocks=None)
    index.record_routed(0, [0, 5, 7], 0.0)  # key 0 is the empty-slot marker of the maps: kept aside
    index.record_routed(200, [0, 5], 0.0)
    index.record_routed(63, [0], 0.0)
    assert index.match([0, 5, 7], [0, 63, 64, 200], 1.0) == {0: 3, 63: 1, 64: 0, 200: 2}
    assert len(index) == 3 and index.blocks_held(200) == 2
    index.remove_backend(0)
    assert index.match([0, 5, 7], [0, 63, 200], 1.0) == {0: 0, 63: 1, 200: 2}
    assert len(index) == 2


# ---- on_evicted: what the router forwards to Policy.on_blocks_evicted --------------------------------------------

def _listen(index):
    calls = []
    index.on_evicted = lambda backend, keys: calls.append((backend, list(keys)))
    return calls


def test_on_evicted_reports_removed_blocks_once_they_are_gone():
    index = make()
    calls = _listen(index)
    keys = hash_blocks(list(range(12)), BS, ROOT)
    stored(index, 0, list(range(12)), [1, 2, 3])
    stored(index, 0, list(range(12)), [1, 2, 3])  # a second copy of each block
    stored(index, 1, list(range(12)), [11, 12, 13])
    index.apply_removed(0, [3])
    assert calls == []  # one copy of block 3 is still there
    index.apply_removed(0, [3, 2, 999])  # 999: unknown hash
    assert calls == [(0, [keys[2]])]
    index.apply_removed(1, [13])
    assert calls[-1] == (1, [keys[2]])


def test_on_evicted_reports_everything_on_clear():
    index = make()
    calls = _listen(index)
    keys = hash_blocks(list(range(12)), BS, ROOT)
    stored(index, 0, list(range(12)), [1, 2, 3])
    stored(index, 1, list(range(8)), [11, 12])
    index.apply_cleared(0)
    assert len(calls) == 1 and calls[0][0] == 0 and sorted(calls[0][1]) == sorted(keys)
    index.apply_cleared(0)  # nothing left: no call
    assert len(calls) == 1


def test_on_evicted_reports_estimated_lru_evictions():
    index = make(estimated=True, capacity=3)
    calls = _listen(index)
    a = hash_blocks(list(range(12)), BS, ROOT)
    b = hash_blocks(list(range(100, 108)), BS, ROOT)
    index.record_routed(0, a, 0.0)
    assert calls == []
    index.record_routed(0, b, 1.0)  # 5 blocks for 3 slots: the least recently used window goes, a's
    assert calls == [(0, a)]
