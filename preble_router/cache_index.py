"""Which backend holds which prompt block.

Three sources write it, each for the backends it owns:
- confirmed blocks, from vLLM's KV-cache events (exact: the engine says what it stored and evicted);
- estimated blocks, for backends without events: what the router sent there, LRU-bounded by the backend's
  capacity in blocks;
- predicted blocks, from the router's own decisions, with a short TTL, so that a burst sharing a new prefix
  lands together before the engine's events arrive.

Keys are the router's own chained block keys (block_hash.py). The engine's hashes are kept only to map its
BlockRemoved events back to our keys. Holders are bitmasks over small backend ids, so a lookup is
O(prompt blocks) with one dict probe per block, whatever the number of backends.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from preble_router.block_hash import chain_root, hash_blocks

_U64 = (1 << 64) - 1


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
    lru: OrderedDict[int, None] | None = None  # estimated mode only


class CacheIndex:
    """Invariant: bit b of _holders[k] is set iff backend b holds block k (confirmed or estimated);
    _blocks of a backend equals the number of keys whose holder mask has its bit."""

    def __init__(self, *, predicted_ttl: float = 3.0) -> None:
        self.predicted_ttl = predicted_ttl
        self._backends: dict[int, _BackendEntry] = {}
        self._holders: dict[int, int] = {}
        self._engine_to_own: dict[int, int] = {}
        self._extra_copies: dict[tuple[int, int], int] = {}  # (backend, key) -> copies beyond the first
        self._predicted: dict[int, dict[int, float]] = {}  # key -> {backend: expiry}
        self._predicted_queue: deque[tuple[float, int, tuple[int, ...]]] = deque()

    # ---- backends -------------------------------------------------------------------------------
    def add_backend(self, backend_id: int, *, model: str, estimated: bool, capacity_blocks: int | None) -> None:
        entry = _BackendEntry(model, estimated, capacity_blocks)
        if estimated:
            entry.lru = OrderedDict()
        self._backends[backend_id] = entry

    def set_capacity(self, backend_id: int, capacity_blocks: int | None) -> None:
        entry = self._backends[backend_id]
        entry.capacity_blocks = capacity_blocks
        self._evict_to_capacity(backend_id, entry)

    def remove_backend(self, backend_id: int) -> None:
        self.apply_cleared(backend_id)
        self._backends.pop(backend_id, None)

    def blocks_held(self, backend_id: int) -> int:
        entry = self._backends.get(backend_id)
        return entry.blocks if entry else 0

    def orphan_blocks(self, backend_id: int) -> int:
        entry = self._backends.get(backend_id)
        return entry.orphan_blocks if entry else 0

    def __len__(self) -> int:
        """Distinct keys held by any backend (confirmed or estimated)."""
        return len(self._holders)

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
        if entry is None or not block_hashes:
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
        bit = 1 << backend_id
        for engine_hash, key in zip(block_hashes, own_keys):
            self._engine_to_own[engine_hash_to_int(engine_hash)] = key
            self._add(backend_id, bit, entry, key)

    def apply_removed(self, backend_id: int, block_hashes: list[int | bytes]) -> None:
        entry = self._backends.get(backend_id)
        if entry is None:
            return
        for engine_hash in block_hashes:
            h = engine_hash_to_int(engine_hash)
            key = self._engine_to_own.get(h)
            if key is None:
                continue
            self._remove(backend_id, entry, key)
            if key not in self._holders:
                self._engine_to_own.pop(h, None)

    def apply_cleared(self, backend_id: int) -> None:
        entry = self._backends.get(backend_id)
        if entry is None:
            return
        bit = 1 << backend_id
        emptied = []
        for key, mask in self._holders.items():
            if mask & bit:
                mask &= ~bit
                if mask:
                    self._holders[key] = mask
                else:
                    emptied.append(key)
        for key in emptied:
            del self._holders[key]
        if emptied:
            dead = set(emptied)
            self._engine_to_own = {h: k for h, k in self._engine_to_own.items() if k not in dead}
        self._extra_copies = {bk: n for bk, n in self._extra_copies.items() if bk[0] != backend_id}
        entry.blocks = 0
        entry.orphan_blocks = 0
        if entry.lru is not None:
            entry.lru.clear()
        for key in [k for k, pred in self._predicted.items() if pred.pop(backend_id, None) is not None and not pred]:
            del self._predicted[key]

    # ---- routing ----------------------------------------------------------------------------------
    def match(self, keys: Sequence[int], backend_ids: Iterable[int], now: float) -> dict[int, int]:
        """Leading blocks of `keys` each backend holds (confirmed, estimated or predicted)."""
        self._expire(now)
        alive = 0
        for b in backend_ids:
            alive |= 1 << b
        result = dict.fromkeys(_bits(alive), 0)
        holders, predicted = self._holders, self._predicted
        for depth, key in enumerate(keys):
            mask = holders.get(key, 0)
            pred = predicted.get(key)
            if pred:
                for b, expiry in pred.items():
                    if expiry > now:
                        mask |= 1 << b
            mask &= alive
            if mask != alive:
                for b in _bits(alive & ~mask):
                    result[b] = depth
                alive = mask
                if not alive:
                    return result
        for b in _bits(alive):
            result[b] = len(keys)
        return result

    def record_routed(self, backend_id: int, keys: Sequence[int], now: float) -> None:
        """A request with these prompt keys was sent to backend_id."""
        entry = self._backends.get(backend_id)
        if entry is None or not keys:
            return
        if entry.estimated:
            bit = 1 << backend_id
            assert entry.lru is not None
            for key in keys:
                if key in entry.lru:
                    entry.lru.move_to_end(key)
                else:
                    entry.lru[key] = None
                    self._holders[key] = self._holders.get(key, 0) | bit
                    entry.blocks += 1
            self._evict_to_capacity(backend_id, entry)
            return
        expiry = now + self.predicted_ttl
        for key in keys:
            self._predicted.setdefault(key, {})[backend_id] = expiry
        self._predicted_queue.append((expiry, backend_id, tuple(keys)))

    # ---- internals ----------------------------------------------------------------------------------
    def _add(self, backend_id: int, bit: int, entry: _BackendEntry, key: int) -> None:
        mask = self._holders.get(key, 0)
        if mask & bit:
            # vLLM does not deduplicate physical blocks: the same hash may be stored twice and removed twice.
            ck = (backend_id, key)
            self._extra_copies[ck] = self._extra_copies.get(ck, 0) + 1
            return
        self._holders[key] = mask | bit
        entry.blocks += 1

    def _remove(self, backend_id: int, entry: _BackendEntry, key: int) -> None:
        bit = 1 << backend_id
        mask = self._holders.get(key, 0)
        if not mask & bit:
            return
        ck = (backend_id, key)
        extra = self._extra_copies.get(ck)
        if extra:
            if extra == 1:
                del self._extra_copies[ck]
            else:
                self._extra_copies[ck] = extra - 1
            return
        mask &= ~bit
        if mask:
            self._holders[key] = mask
        else:
            del self._holders[key]
        entry.blocks -= 1

    def _evict_to_capacity(self, backend_id: int, entry: _BackendEntry) -> None:
        if entry.lru is None or entry.capacity_blocks is None:
            return
        while len(entry.lru) > entry.capacity_blocks:
            key, _ = entry.lru.popitem(last=False)
            self._remove(backend_id, entry, key)

    def _expire(self, now: float) -> None:
        queue = self._predicted_queue
        while queue and queue[0][0] <= now:
            _, backend_id, keys = queue.popleft()
            for key in keys:
                pred = self._predicted.get(key)
                if pred is not None and pred.get(backend_id, now + 1.0) <= now:
                    del pred[backend_id]
                    if not pred:
                        del self._predicted[key]


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
