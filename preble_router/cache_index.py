"""Which backend holds which prompt block.

Three sources write it, each for the backends it owns:
- confirmed blocks, from vLLM's KV-cache events (exact: the engine says what it stored and evicted);
- estimated blocks, for backends without events: what the router sent there, LRU-bounded by the backend's
  capacity in blocks (recency kept per span of 16 prompt blocks);
- predicted blocks, from the router's own decisions, so that requests sharing a new prefix land together before
  the engine's events arrive. A routed request's new blocks count as held from dispatch until the engine's
  BlockStored confirms them, or until the request ended plus a short grace (`predicted_ttl`) for events still in
  flight: a request waiting in a long engine queue keeps its prediction however long it waits.

Other routers' requests (several routers in front of one fleet) show up here first: a BlockStored run that no
request of this router explains (``_OwnRuns``) was computed for a request another router sent. The index tells
``on_foreign_stored`` once per such request (its later chunks continue the same run), so the load view counts
it before the engine's next load report does (load.py). A lone router explains every run it sees: nothing is
told.

A backend is in one of two modes, switched at run time (`set_estimated`): events (confirmed + predicted blocks)
or estimated. The router moves a backend to the estimate when its event stream goes silent, and back when events
flow again (kv_events.KvEventSubscriber owns that decision; docs/design.md, "Event health").

Keys are the router's own chained block keys (block_hash.py). The engine's hashes are kept only to map its
BlockRemoved events back to our keys. Confirmed blocks' holders are bitmasks over small backend ids, so a lookup
is O(prompt blocks) with one probe per block, whatever the number of backends.

Both per-block maps of confirmed blocks (own key -> holders, engine hash -> own key) are U64Maps (block_table.py):
two numpy arrays each, ~16 bytes a slot at a load of 0.35-0.7, so an event-fed block costs ~45-95 bytes, where two
Python dicts cost ~175 (an int object and a dict slot per entry, twice). Masks are uint64: backends 64g..64g+63
share the holder map of group g (one map for up to 64 backends).

An estimated backend's blocks are a Python set of its own instead (plus its LRU spans): every request routed
there adds its new blocks and evicts as many, and a set takes a whole prompt's keys in one C-level update where
the U64Map takes one Python-level insert (or backward-shift delete) per block. It costs more memory per block,
but an estimate is bounded by the backend's capacity, and a lookup walks each estimated backend only as far as
that backend matches.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, filterfalse, repeat, takewhile

import numpy as np

from preble_router.block_hash import chain_root, hash_blocks
from preble_router.block_table import U64Map

_U64 = (1 << 64) - 1
# match() walks a prompt over 2 * _WALK blocks only this far, then looks the rest up at once: the walk costs a
# Python step per block, the vectorized lookup a fixed numpy overhead, so short prompts walk and long ones look up.
_WALK = 16
_SPAN_BLOCKS = 16  # an estimated backend's LRU keeps prompt blocks in spans of this many
# A prediction's value is its expiry time, or, while its request is in flight, a pin: _PIN_BASE plus the pin's
# number. Pins are far in the future of any clock, so match() needs one comparison for both, and exact integers
# in a float (below 2**53), so a request's release can tell its own pins from a later request's.
_PIN_BASE = float(1 << 52)


# A foreign run's tail is remembered this long (s): the next chunk of a chunked prefill continues it within a few
# engine steps; a later run from the same tail (a multi-turn follow-up) is another request.
_FOREIGN_TAIL_TTL = 0.5
_FOREIGN_TAILS_MAX = 1024  # per backend: bounded however many requests other routers send


class _OwnRuns:
    """Which stored blocks one backend computes for this router's own requests, to tell other routers' apart.

    Invariants:
    - ``keys`` maps every prompt key of a request this router sent there (cached or not at dispatch: a block
      evicted meanwhile is recomputed and stored again) to the request's pin; a later request of the same key
      overwrites it with its own;
    - ``tails`` maps the last key of each such request, or of the latest run of blocks stored after it (its
      decode), to its pin: a run whose parent is there continues that request;
    - ``ended[pin]`` is inf while the request is in flight, its end time after; a pin whose end is more than the
      grace ago is dead, and its keys count as nobody's; ``purge`` drops dead pins and their keys (periodic,
      O(state) per grace period), so both maps stay within the requests in flight plus two grace periods;
    - ``foreign_tails`` (last key of another router's run -> when it was stored) has at most _FOREIGN_TAILS_MAX
      entries, oldest first."""

    __slots__ = ("keys", "tails", "ended", "foreign_tails")

    def __init__(self) -> None:
        self.keys: dict[int, float] = {}
        self.tails: dict[int, float] = {}
        self.ended: dict[float, float] = {}
        self.foreign_tails: OrderedDict[int, float] = OrderedDict()

    def purge(self, now: float, grace: float) -> None:
        dead = {pin for pin, end in self.ended.items() if now - end > grace}
        if dead:
            for pin in dead:
                del self.ended[pin]
            self.keys = {k: pin for k, pin in self.keys.items() if pin not in dead}
            self.tails = {k: pin for k, pin in self.tails.items() if pin not in dead}
        tails = self.foreign_tails
        while tails and now - next(iter(tails.values())) > _FOREIGN_TAIL_TTL:
            tails.popitem(last=False)


@dataclass(slots=True)
class RoutedBlocks:
    """The prediction one routed request holds on its backend (events mode): record_routed() -> release_routed()."""

    backend_id: int
    keys: Sequence[int]  # the request's keys beyond those already held there at dispatch
    pin: float


def engine_hash_to_int(h: int | bytes) -> int:
    """Events carry the low 64 bits of the engine's hash as an int, or the raw digest as bytes."""
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    return h & _U64


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass(slots=True)
class _BackendEntry:
    model: str
    estimated: bool  # no KV events: the index records what the router sent, LRU-bounded
    capacity_blocks: int | None
    blocks: int = 0  # confirmed or estimated blocks held
    orphan_blocks: int = 0  # stored blocks whose parent we never saw (cannot be keyed)
    # Estimated mode only: the blocks routed here, in spans of _SPAN_BLOCKS prompt blocks keyed by a span's
    # last key, least recently used first; each span owns the keys it added (a key has one owner). `estimate`
    # is the set of every span's keys (so blocks == len(estimate)). A span's list holds the same int objects
    # as the set (a pointer each), so the set's C-level updates take it without boxing a key again.
    spans: OrderedDict[int, list[int]] | None = None
    estimate: set[int] | None = None

    def start_estimate(self) -> None:
        self.estimated, self.spans, self.estimate = True, OrderedDict(), set()


class CacheIndex:
    """Invariants:
    - bit b % 64 of self._holders[b // 64][k] is set iff backend b is in events mode and holds block k
      (confirmed), and a key is in a holder map iff some backend of that group holds it (a stored mask is never 0);
    - an estimated backend's blocks are exactly its entry's `estimate` set: no holder map has its bit;
    - an entry's `blocks` equals the number of keys whose holder mask has its bit, or len(estimate);
    - _engine_to_own maps an engine hash to the own key it was stored under. A mapping stays while its key is
      held (another backend may use the same hash); mappings whose key no backend holds are dead, and are
      swept out whenever the map would otherwise grow, and on apply_cleared;
    - _extra_copies has (b, k) only while b holds k.
    """

    def __init__(self, *, predicted_ttl: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.predicted_ttl = predicted_ttl  # the grace after a request ended, for its events still in flight
        self.clock = clock  # the router's: when a KV event is applied (events carry no time of ours)
        self._pins = 0
        self._backends: dict[int, _BackendEntry] = {}
        self._holders: list[U64Map] = []  # [g]: own key -> mask of backends 64g..64g+63 holding it
        self._engine_to_own = U64Map()
        self._extra_copies: dict[tuple[int, int], int] = {}  # (backend, key) -> copies beyond the first
        # backend -> {key: expiry or pin}: one bulk update per routed request; confirmed keys leave at their
        # BlockStored, expired ones are ignored at lookup and purged once per grace period.
        self._predicted: dict[int, dict[int, float]] = {}
        self._next_purge = 0.0
        # Called with (backend, own keys) whenever a backend stops holding blocks: BlockRemoved events,
        # AllBlocksCleared (and gaps/removal, which clear), estimated-LRU evictions. The router forwards it to
        # its policy (Policy.on_blocks_evicted), so the policy's usage history forgets what the engine dropped.
        self.on_evicted: Callable[[int, list[int]], None] | None = None
        # Called with (backend, tokens stored) once per request another router sent there, when its first blocks
        # are stored (module docstring). Set it before routing: runs are told apart from this router's own only
        # for requests recorded (record_routed) while it is set. None: not tracked at all (no cost).
        self.on_foreign_stored: Callable[[int, int], None] | None = None
        # True while a subscriber applies replayed batches: the engine's past, not requests being sent now.
        self.replaying = False
        self._own: dict[int, _OwnRuns] = {}  # backend -> its runs of our requests (only with on_foreign_stored)

    # ---- backends -------------------------------------------------------------------------------
    def add_backend(self, backend_id: int, *, model: str, estimated: bool, capacity_blocks: int | None) -> None:
        entry = _BackendEntry(model, estimated, capacity_blocks)
        if estimated:
            entry.start_estimate()
        self._backends[backend_id] = entry
        while len(self._holders) <= backend_id >> 6:
            self._holders.append(U64Map())

    def set_model(self, backend_id: int, model: str) -> None:
        """The model backend_id serves (its probes say): the root its KV events' keys chain from. Blocks stored
        before keep their keys; a backend changes model only by restarting, with an empty cache."""
        entry = self._backends.get(backend_id)
        if entry is not None:
            entry.model = model

    def set_capacity(self, backend_id: int, capacity_blocks: int | None) -> None:
        entry = self._backends[backend_id]
        entry.capacity_blocks = capacity_blocks
        self._evict_to_capacity(backend_id, entry)

    def is_estimated(self, backend_id: int) -> bool:
        entry = self._backends.get(backend_id)
        return entry is not None and entry.estimated

    def set_estimated(self, backend_id: int, estimated: bool, now: float) -> None:
        """Switch a backend between events mode and the estimate.

        To the estimate (its events went silent): what the index knew there stays, as the least recently used
        spans, followed by its live predictions (requests still in flight), and the LRU bounds it from then on.
        To events (events flow again): the estimate is dropped; the caller replays the engine's state into the
        index (KvEventSubscriber resyncs from the replay socket)."""
        entry = self._backends.get(backend_id)
        if entry is None or entry.estimated == estimated:
            return
        if not estimated:
            self.apply_cleared(backend_id)
            entry.estimated, entry.spans, entry.estimate = False, None, None
            return
        held = self._drop_confirmed(backend_id)
        now_pred = self._predicted.pop(backend_id, {})
        entry.start_estimate()
        assert entry.spans is not None and entry.estimate is not None
        for start in range(0, len(held), _SPAN_BLOCKS):
            span = held[start:start + _SPAN_BLOCKS]
            entry.spans[span[-1]] = span
            entry.estimate.update(span)
        live = [key for key, expiry in now_pred.items() if expiry > now]
        self._record_estimated(backend_id, entry, live, 0)  # counts entry.blocks and bounds it by capacity

    def remove_backend(self, backend_id: int) -> None:
        self.apply_cleared(backend_id)
        self._backends.pop(backend_id, None)
        self._own.pop(backend_id, None)

    def blocks_held(self, backend_id: int) -> int:
        entry = self._backends.get(backend_id)
        return entry.blocks if entry else 0

    def orphan_blocks(self, backend_id: int) -> int:
        entry = self._backends.get(backend_id)
        return entry.orphan_blocks if entry else 0

    def __len__(self) -> int:
        """Distinct keys held by any backend (confirmed or estimated). A scan: for tests and reports only."""
        estimates = [e.estimate for e in self._backends.values() if e.estimate]
        if len(self._holders) == 1 and not estimates:
            return len(self._holders[0])
        estimated = np.fromiter(set().union(*estimates), np.uint64) if estimates else np.zeros(0, np.uint64)
        return len(np.unique(np.concatenate([estimated, *(h.items()[0] for h in self._holders)])))

    # ---- KV events (the KvEventSink protocol) ------------------------------------------------------
    def apply_stored(
        self,
        backend_id: int,
        block_hashes: list[int | bytes],
        parent_block_hash: int | bytes | None,
        token_ids: list[int],
        block_size: int,
        lora_name: str | None,
        extra_keys: list | None,
    ) -> None:
        entry = self._backends.get(backend_id)
        # An estimated backend takes no events: its subscriber switches it to events mode before it applies any.
        if entry is None or entry.estimated or not block_hashes:
            return
        if parent_block_hash is None:
            parent = chain_root(entry.model, lora_name, _salt_of(extra_keys, lora_name))
        else:
            known = self._engine_to_own.get(engine_hash_to_int(parent_block_hash))
            if known is None:
                # The parent was stored before we listened (or lost in an unrepaired gap): these blocks
                # cannot be keyed the way requests are, so they can never match. Count them, skip them.
                entry.orphan_blocks += len(block_hashes)
                return
            parent = known
        own_keys = hash_blocks(token_ids, block_size, parent)
        engine_to_own = self._engine_to_own
        if len(engine_to_own) + len(own_keys) > engine_to_own.grow_at:
            self._sweep_engine_hashes()  # before growing the map, drop its dead mappings
        holders, bit = self._holders[backend_id >> 6], 1 << (backend_id & 63)
        for engine_hash, key in zip(block_hashes, own_keys):
            engine_to_own.put(engine_hash_to_int(engine_hash), key)
            self._add(backend_id, holders, bit, entry, key)
        predicted = self._predicted.get(backend_id)
        if predicted:  # confirmed: the prediction has done its job
            for key in own_keys:
                predicted.pop(key, None)
        if self.on_foreign_stored is not None and own_keys and not self.replaying:
            self._classify_run(backend_id, own_keys, parent if parent_block_hash is not None else None, block_size)

    def _classify_run(self, backend_id: int, keys: Sequence[int], parent: int | None, block_size: int) -> None:
        """A run of stored blocks: one of our requests' (nothing to do), the next chunk of another router's
        request already told, or another router's new request (told to on_foreign_stored). O(1) per run."""
        now = self.clock()
        own = self._own_runs(backend_id)
        pin = own.keys.get(keys[0])
        if pin is not None and now - own.ended.get(pin, -math.inf) <= self.predicted_ttl:
            return  # our request's prompt (its prefill, or a block it recomputes after an eviction)
        tails = own.foreign_tails
        if parent is not None:
            pin = own.tails.pop(parent, None)
            if pin is not None and own.ended.get(pin) == math.inf:
                own.tails[keys[-1]] = pin  # blocks after one of our in-flight requests' (its decode): ours
                return
            stored = tails.pop(parent, None)
            if stored is not None and now - stored <= _FOREIGN_TAIL_TTL:  # the next chunk of a request told
                tails[keys[-1]] = now
                return
        tails[keys[-1]] = now
        if len(tails) > _FOREIGN_TAILS_MAX:
            tails.popitem(last=False)
        assert self.on_foreign_stored is not None
        self.on_foreign_stored(backend_id, len(keys) * block_size)

    def apply_removed(self, backend_id: int, block_hashes: list[int | bytes]) -> None:
        entry = self._backends.get(backend_id)
        if entry is None or entry.estimated:
            return
        holders = self._holders[backend_id >> 6]
        bit = 1 << (backend_id & 63)
        dropped: list[int] = []
        for engine_hash in block_hashes:
            h = engine_hash_to_int(engine_hash)
            key = self._engine_to_own.get(h)
            if key is None:
                continue
            held = holders.get(key, 0) & bit
            mask = self._remove(backend_id, holders, entry, key)
            if held and not mask & bit:
                dropped.append(key)
            if not mask and not self._held_elsewhere(key, backend_id >> 6):
                self._engine_to_own.pop(h)
        if dropped and self.on_evicted is not None:
            self.on_evicted(backend_id, dropped)

    def apply_cleared(self, backend_id: int) -> None:
        entry = self._backends.get(backend_id)
        if entry is None:
            return
        if entry.estimate is not None:
            dropped = list(entry.estimate)
            entry.estimate.clear()
            assert entry.spans is not None
            entry.spans.clear()
        else:
            dropped = self._drop_confirmed(backend_id)
        entry.blocks = 0
        entry.orphan_blocks = 0
        self._predicted.pop(backend_id, None)
        own = self._own.get(backend_id)
        if own is not None:
            own.foreign_tails.clear()  # our requests' keys stay ours (they may still store blocks there)
        if dropped and self.on_evicted is not None:
            self.on_evicted(backend_id, dropped)

    # ---- routing ----------------------------------------------------------------------------------
    def match(self, keys: Sequence[int], backend_ids: Iterable[int], now: float) -> dict[int, int]:
        """Leading blocks of `keys` each backend holds (confirmed, estimated or predicted)."""
        self._expire(now)
        alive = 0
        for b in backend_ids:
            alive |= 1 << b
        result = dict.fromkeys(_bits(alive), 0)
        for g, holders in enumerate(self._holders):
            group_alive = (alive >> (g << 6)) & _U64
            if group_alive:
                self._match_group(holders, g << 6, group_alive, keys, now, result)
        return result

    def _own_runs(self, backend_id: int) -> _OwnRuns:
        own = self._own.get(backend_id)
        if own is None:
            own = self._own[backend_id] = _OwnRuns()
        return own

    def foreign_prefill_at(self, backend_id: int, key: int, now: float) -> bool:
        """Whether another router's request is storing blocks on backend_id right now and its latest run ended at
        `key`: its prefill is still going, along a prompt that shares everything up to key. O(1)."""
        own = self._own.get(backend_id)
        if own is None:
            return False
        stored = own.foreign_tails.get(key)
        return stored is not None and now - stored <= _FOREIGN_TAIL_TTL

    def record_routed(self, backend_id: int, keys: Sequence[int], now: float, held: int = 0) -> RoutedBlocks | None:
        """A request with these prompt keys was sent to backend_id. `held`: how many leading keys match() just
        found there (an estimated backend then only touches their spans; an events backend predicts the rest).

        Events mode: returns the request's prediction, pinned until release_routed() (the request ended)."""
        entry = self._backends.get(backend_id)
        if entry is None or not keys:
            return None
        if entry.estimated:
            self._record_estimated(backend_id, entry, keys, held)
            return None
        new = keys[held:] if held else keys
        tracked = self.on_foreign_stored is not None
        if not new and not tracked:
            return None
        self._pins += 1
        pin = _PIN_BASE + self._pins
        if new:
            self._predicted.setdefault(backend_id, {}).update(zip(new, repeat(pin)))
        if tracked:  # every prompt key: one C-level update, released in O(1)
            own = self._own_runs(backend_id)
            own.keys.update(zip(keys, repeat(pin)))
            own.tails[keys[-1]] = pin
            own.ended[pin] = math.inf
        return RoutedBlocks(backend_id, new, pin)

    def release_routed(self, routed: RoutedBlocks, now: float) -> None:
        """The request ended: its blocks not yet confirmed stay predicted for the grace period only. Keys pinned
        again by a later request keep that request's pin."""
        own = self._own.get(routed.backend_id)
        if own is not None and routed.pin in own.ended:
            own.ended[routed.pin] = now
        predicted = self._predicted.get(routed.backend_id)
        if not predicted:
            return
        pin, expiry = routed.pin, now + self.predicted_ttl
        get = predicted.get
        for key in routed.keys:
            if get(key) == pin:
                predicted[key] = expiry

    # ---- internals ----------------------------------------------------------------------------------
    def _match_group(self, holders: U64Map, base: int, alive: int, keys: Sequence[int], now: float,
                     result: dict[int, int]) -> None:
        """match() for the alive backends base..base+63 (alive: their mask, shifted down by base)."""
        # An estimated backend's blocks are one set, so its depth is a single C-level scan of the prompt's keys,
        # not a step of the walk below: it leaves the walk at once.
        for b, e in self._backends.items():
            if e.estimate is not None and base <= b < base + 64 and alive >> (b - base) & 1:
                held = e.estimate
                result[b] = len(keys) if held.issuperset(keys) else len(list(takewhile(held.__contains__, keys)))
                alive &= ~(1 << (b - base))
        if not alive:
            return
        predicted = [(1 << (b - base), pred) for b, pred in self._predicted.items()
                     if base <= b < base + 64 and alive >> (b - base) & 1]
        n = len(keys)
        # Walk block by block, probing inline: ~2x a dict probe, where a call per block would cost ~2x more.
        # A prompt over 2 * _WALK blocks still matching after _WALK of them looks the rest up at once.
        walk = n if n <= 2 * _WALK else _WALK
        slots, values, capacity = holders.probe_view()
        zero = holders.get(0, 0)  # key 0 is kept outside the probed slots
        depth = 0
        for key in keys if walk == n else keys[:walk]:
            i = key % capacity
            while (k := slots[i]) != key and k:
                i += 1
            mask = values[i] if key else zero
            for bit, pred in predicted:
                if pred.get(key, 0.0) > now:
                    mask |= bit
            mask &= alive
            if mask != alive:
                for b in _bits(alive & ~mask):
                    result[base + b] = depth
                alive = mask
                if not alive:
                    return
            depth += 1
        if depth < n:
            alive = self._match_rest(holders, base, alive, keys, depth, now, result)
        for b in _bits(alive):
            result[base + b] = n

    def _match_rest(self, holders: U64Map, base: int, alive: int, keys: Sequence[int], start: int, now: float,
                    result: dict[int, int]) -> int:
        """_match_group() for keys[start:], looked up at once (cheaper per block than the walk, at a fixed
        numpy cost): records the depth of each backend that stops matching; returns the ones held to the end.
        Estimated backends never get here (_match_group settles them first)."""
        rest = keys[start:]
        # Through array("Q"): faster than np.array() on a list of Python ints.
        masks = holders.get_many(np.frombuffer(array("Q", rest), np.uint64)) & np.uint64(alive)
        # held[i]: the alive backends holding every block of rest[:i + 1]. It changes at a few indices only,
        # where backends leave it; a prediction may carry one of them further.
        held = np.bitwise_and.accumulate(masks)
        listed: list[int] | None = None
        for i in [0, *((held[1:] != held[:-1]).nonzero()[0] + 1).tolist()]:
            mask = int(held[i])
            for b in _bits(alive & ~mask):
                d = i
                pred = self._predicted.get(base + b)
                if pred:
                    listed = masks.tolist() if listed is None else listed
                    while d < len(rest) and (listed[d] >> b & 1 or pred.get(rest[d], 0.0) > now):
                        d += 1
                result[base + b] = start + d
            alive = mask
        return alive

    def _add(self, backend_id: int, holders: U64Map, bit: int, entry: _BackendEntry, key: int) -> None:
        mask = holders.get(key, 0)
        if mask & bit:
            # vLLM does not deduplicate physical blocks: the same hash may be stored twice and removed twice.
            ck = (backend_id, key)
            self._extra_copies[ck] = self._extra_copies.get(ck, 0) + 1
            return
        holders.put(key, mask | bit)
        entry.blocks += 1

    def _remove(self, backend_id: int, holders: U64Map, entry: _BackendEntry, key: int) -> int:
        """Drop one copy of key from backend_id; the key's holder mask in this group after that."""
        bit = 1 << (backend_id & 63)
        mask = holders.get(key, 0)
        if not mask & bit:
            return mask
        ck = (backend_id, key)
        extra = self._extra_copies.get(ck) if self._extra_copies else None
        if extra:
            if extra == 1:
                del self._extra_copies[ck]
            else:
                self._extra_copies[ck] = extra - 1
            return mask
        mask &= ~bit
        if mask:
            holders.put(key, mask)
        else:
            holders.pop(key)
        entry.blocks -= 1
        return mask

    def _drop_confirmed(self, backend_id: int) -> list[int]:
        """Take backend_id's bit out of its holder map (and its extra copies); the keys it held."""
        holders = self._holders[backend_id >> 6]
        keys, masks = holders.items()
        bit = np.uint64(1 << (backend_id & 63))
        mine = (masks & bit) != 0
        self._drop_extra_copies(backend_id)
        if not mine.any():
            return []
        dropped = keys[mine].tolist()
        masks &= ~bit
        held = masks != 0
        holders.replace(keys[held], masks[held])
        if not held.all():
            self._sweep_engine_hashes()
        return dropped

    def _drop_extra_copies(self, backend_id: int) -> None:
        self._extra_copies = {bk: n for bk, n in self._extra_copies.items() if bk[0] != backend_id}

    def _held_elsewhere(self, key: int, group: int) -> bool:
        """Whether a backend outside holder group `group` holds key."""
        return len(self._holders) > 1 and any(key in h for g, h in enumerate(self._holders) if g != group)

    def _sweep_engine_hashes(self) -> None:
        """Drop the mappings of engine hashes whose own key no backend holds. They build up when backends hash a
        shared block differently (each vLLM process seeds its own hashes) and only one of them is removed with
        the key; the map would otherwise keep them forever."""
        hashes, keys = self._engine_to_own.items()
        held = np.zeros(len(keys), bool)
        for holders in self._holders:
            held |= holders.get_many(keys) != 0
        # Rebuilt at a fitted size even if all are live: that is the growth the caller was about to cause.
        self._engine_to_own.replace(hashes[held], keys[held])

    def _record_estimated(self, backend_id: int, entry: _BackendEntry, keys: Sequence[int], held: int) -> None:
        """The estimate of what an engine without KV events holds: an LRU of prompt spans, bounded by the
        backend's capacity. Per span rather than per block: the LRU's bookkeeping is one OrderedDict entry per
        span, not one per block (the blocks themselves are in the set).
        Spans are touched last first, so a prompt's first blocks are the most recently used and the LRU trims
        prefixes from their ends, as vLLM frees a request's blocks (tail first)."""
        spans, estimate = entry.spans, entry.estimate
        assert spans is not None and estimate is not None
        n, size = len(keys), _SPAN_BLOCKS
        if not held and estimate.isdisjoint(keys):
            # A prompt none of whose blocks is there (a new prefix): every span is new, whole. (A span's keys are
            # all in the estimate while it exists, so no span can be keyed by one of these keys.)
            for start in range((n - 1) // size * size, -1, -size):
                spans[keys[min(start + size, n) - 1]] = list(keys[start:start + size])
            estimate.update(keys)
            entry.blocks = len(estimate)
            self._evict_to_capacity(backend_id, entry)
            return
        for start in range((n - 1) // size * size, -1, -size):
            stop = min(start + size, n)
            span_key = keys[stop - 1]
            owned = spans.get(span_key)
            if owned is not None:
                spans.move_to_end(span_key)
            if stop <= held:
                continue  # all held already (their keys may belong to other prompts' spans)
            new = list(filterfalse(estimate.__contains__, keys[max(start, held):stop]))
            if new:
                estimate.update(new)
                if owned is None:
                    spans[span_key] = new
                else:
                    owned.extend(new)
        entry.blocks = len(estimate)
        self._evict_to_capacity(backend_id, entry)

    def _evict_to_capacity(self, backend_id: int, entry: _BackendEntry) -> None:
        spans, estimate = entry.spans, entry.estimate
        if spans is None or estimate is None or entry.capacity_blocks is None:
            return
        gone: list[list[int]] = []
        while len(estimate) > entry.capacity_blocks and spans:
            _, owned = spans.popitem(last=False)
            estimate.difference_update(owned)
            gone.append(owned)
        entry.blocks = len(estimate)
        if gone and self.on_evicted is not None:
            # Spans leave a prompt last first; reported first to last, each prompt's dropped blocks come in chain
            # order, so the policy's tree finds the cut of each of its nodes at the run's first key.
            self.on_evicted(backend_id, list(chain.from_iterable(reversed(gone))))

    def _expire(self, now: float) -> None:
        """Drop expired predictions, at most once per grace period: memory stays within the keys of requests in
        flight plus two grace periods of ended ones (pins never expire here)."""
        if now < self._next_purge:
            return
        self._next_purge = now + self.predicted_ttl
        for own in self._own.values():
            own.purge(now, self.predicted_ttl)
        for backend_id, pred in list(self._predicted.items()):
            live = {key: expiry for key, expiry in pred.items() if expiry > now}
            if live:
                self._predicted[backend_id] = live
            else:
                del self._predicted[backend_id]


def _salt_of(extra_keys: list | None, lora_name: str | None) -> str | None:
    """vLLM 0.32 puts block 0's extra keys untagged: [lora name?, cache_salt?, ...]."""
    if not extra_keys or not extra_keys[0]:
        return None
    for item in extra_keys[0]:
        if isinstance(item, str) and item != lora_name:
            return item
        if isinstance(item, (list, tuple)) and len(item) == 2 and item[0] == "cache_salt":
            return str(item[1])
    return None
