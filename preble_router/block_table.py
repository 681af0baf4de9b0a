"""U64Map: a compact uint64 -> uint64 hash map, about 16 bytes a slot and no Python object per entry.

The cache index keeps an entry per cached block; as a Python dict an int -> int entry costs ~100 bytes (an int
object for the key, often one for the value, and the dict's slot). Here keys and values live in two numpy
arrays:
- open addressing, linear probing from home slot key % P, where the capacity P is a prime drawn at random
  near the size wanted: regular key patterns spread over every slot, and since P is unknown outside the
  process, prompts cannot be crafted to pile their keys into one run (a modulo is also ~3x cheaper in Python
  than multiply-shift hashing);
- no wrap-around: the arrays have at least _PAD slots past the last home slot (more if a run reaches that
  far) and their last slot is always empty, so every probe ends at an empty slot inside the arrays;
- Robin Hood order: each run is sorted by home slot (an insert goes before the first entry homed after it), so
  a key's distance from home does not depend on when it was inserted (with plain linear probing the newest
  keys, the ones requests look up, sit furthest: ~5 slots at a load of 0.7 instead of ~1);
- backward-shift deletion: no tombstones, so churn at a fixed size never fills or grows the map;
- the capacity about doubles when the load would pass _MAX_LOAD, and is re-fitted (to a load of about
  _FIT_LOAD) when it falls below _MAX_LOAD / 4 or on replace();
- key 0 marks an empty slot (whose value is 0 too); a real key 0 is kept aside in self._zero.
Scalar operations read the arrays through memoryviews (Python ints, ~3x cheaper than numpy scalars), and hot
loops can inline the probe (probe_view()); get_many() probes many keys at once, for long prompts and sweeps.
"""

from __future__ import annotations

import math
import random

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_MIN_CAPACITY = 64
_MAX_LOAD = 0.7
_FIT_LOAD = 0.5  # a rebuilt map has room for len/_FIT_LOAD entries: headroom before the next rebuild
_WINDOW = 8  # slots get_many() compares per key per pass (8 bools view as one uint64)
_PAD = 64  # >= _WINDOW: the tail of slots past the last home, where runs near the end continue
_CHUNK = 1 << 15  # get_many() works in chunks of this many keys, bounding its temporaries


class U64Map:
    """Invariants: a stored key k sits at a slot s >= home(k) = k % capacity with slots home(k)..s all occupied;
    along a run, homes never decrease; empty slots hold key 0 and value 0; the last slot is empty;
    len(self) == occupied slots + (self._zero is not None)."""

    def __init__(self) -> None:
        self._zero: int | None = None
        self._len = 0
        self._layout(np.zeros(0, np.uint64), np.zeros(0, np.uint64), _prime_near(_MIN_CAPACITY))

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def grow_at(self) -> int:
        """Entries beyond which a new key makes the map grow."""
        return self._grow_at

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    # ---- scalar operations ------------------------------------------------------------------------------------
    def get(self, key: int, default: int | None = None) -> int | None:
        keys = self._kmv
        i = key % self._capacity
        while (k := keys[i]) != key and k:
            i += 1
        if k:
            return self._vmv[i]
        return default if key or self._zero is None else self._zero

    def probe_view(self) -> tuple[memoryview, memoryview, int]:
        """(slots, values, capacity), for hot loops that inline get(): a probe for key k scans the slots from
        k % capacity until it finds k or an empty slot (0), and either way values[i] is the answer (empty slots
        hold 0). Key 0 is not in them (it reads as absent). Valid until the map is next modified."""
        return self._kmv, self._vmv, self._capacity

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def put(self, key: int, value: int) -> None:
        if not key:
            self._len += self._zero is None
            self._zero = value
            return
        slots, values, capacity = self._kmv, self._vmv, self._capacity
        home = end = key % capacity
        while (k := slots[end]) != key and k:
            end += 1
        if k:
            values[end] = value
            return
        # New key: it goes before the first entry of its run homed after it; the rest of the run moves right.
        i = home
        while i < end and slots[i] % capacity <= home:
            i += 1
        if self._len >= self._grow_at or end == self._last:
            # Lay everything out again with the new entry: in twice the slots if the load asks for it, else
            # with a longer tail (its run reached the last slot, which must stay empty).
            keys, vals = self._arrays()
            self._layout(np.append(keys, np.uint64(key)), np.append(vals, np.uint64(value)),
                         _prime_near(capacity * 2) if self._len >= self._grow_at else capacity)
        else:
            for j in range(end, i, -1):
                slots[j], values[j] = slots[j - 1], values[j - 1]
            slots[i], values[i] = key, value
        self._len += 1

    def pop(self, key: int) -> int | None:
        """Remove key; its value, or None if absent."""
        if not key:
            value, self._zero = self._zero, None
            self._len -= value is not None
            return value
        slots, values, capacity = self._kmv, self._vmv, self._capacity
        i = key % capacity
        while (k := slots[i]) != key:
            if not k:
                return None
            i += 1
        value = values[i]
        # Backward shift: the entries after it that sit past their home move back one slot.
        while (k := slots[i + 1]) and k % capacity <= i:
            slots[i], values[i] = k, values[i + 1]
            i += 1
        slots[i] = values[i] = 0
        self._len -= 1
        if self._len < self._shrink_at:
            self._layout(*self._arrays(), _fit(self._len))
        return value

    # ---- bulk operations ---------------------------------------------------------------------------------------
    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """Values of `keys` (a uint64 array), 0 where absent: meant for maps that never store 0 as a value."""
        keys = np.asarray(keys, np.uint64)
        if len(keys) > _CHUNK:
            return np.concatenate([self.get_many(keys[i:i + _CHUNK]) for i in range(0, len(keys), _CHUNK)])
        out = self._probe(keys, (keys % np.uint64(self._capacity)).astype(np.intp))
        if self._zero is not None:
            out[keys == 0] = self._zero
        return out

    def _probe(self, keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # Compare a window of slots from each position; a probe ends at its key or at an empty slot, whose
        # value is 0, so the first stop's value is the answer either way.
        win = self._windows[pos]
        stop = (win == keys[:, None]) | (win == 0)
        out = self._vals[pos + stop.argmax(axis=1)]
        rows = stop.view(np.uint64)[:, 0]  # a row's 8 bools as one uint64: 0 if the window has no stop
        if not rows.all():  # windows full of other keys (a long run): those probe on from the next window
            left = (rows == 0).nonzero()[0]
            out[left] = self._probe(keys[left], np.minimum(pos[left] + _WINDOW, self._last - _WINDOW + 1))
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of every entry, as new uint64 arrays."""
        keys, vals = self._arrays()
        if self._zero is not None:
            keys, vals = np.append(keys, np.uint64(0)), np.append(vals, np.uint64(self._zero))
        return keys, vals

    def replace(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Make the map hold exactly these (distinct) keys and values, in a fitted capacity."""
        keys, vals = np.asarray(keys, np.uint64), np.asarray(vals, np.uint64)
        zero = keys == 0
        self._zero = int(vals[zero][0]) if zero.any() else None
        keys, vals = keys[~zero], vals[~zero]
        self._len = len(keys) + (self._zero is not None)
        self._layout(keys, vals, _fit(self._len))

    # ---- layout ---------------------------------------------------------------------------------------------
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        used = np.flatnonzero(self._keys)
        return self._keys[used], self._vals[used]

    def _layout(self, keys: np.ndarray, vals: np.ndarray, capacity: int) -> None:
        """Place (keys, vals) (distinct, nonzero) in fresh arrays: `capacity` home slots, then a tail of at
        least _PAD slots past the last occupied one."""
        home = (keys % np.uint64(capacity)).astype(np.int64)
        order = np.argsort(home, kind="stable")
        rank = np.arange(len(keys))
        # Inserting in home order, each key takes the first free slot at or after its home:
        # slot[i] = max(home[i], slot[i-1] + 1), i.e. a running max of home - rank, plus rank.
        slots = np.maximum.accumulate(home[order] - rank) + rank
        size = max(capacity, int(slots[-1]) + 1 if len(slots) else 0) + _PAD
        self._keys = np.zeros(size, np.uint64)
        self._vals = np.zeros(size, np.uint64)
        self._keys[slots] = keys[order]
        self._vals[slots] = vals[order]
        self._capacity, self._last = capacity, size - 1
        self._grow_at = int(capacity * _MAX_LOAD)
        self._shrink_at = int(capacity * _MAX_LOAD / 4) if capacity > 2 * _MIN_CAPACITY else -1
        self._kmv, self._vmv = memoryview(self._keys), memoryview(self._vals)
        self._windows = sliding_window_view(self._keys, _WINDOW)


def _fit(n: int) -> int:
    """A capacity holding n entries at a load of about _FIT_LOAD."""
    return _prime_near(max(_MIN_CAPACITY, math.ceil(n / _FIT_LOAD)))


def _prime_near(n: int) -> int:
    """A prime drawn at random from [n, ~1.06 n): a capacity only this process knows."""
    p = n + random.randrange(n // 16 + 1) | 1
    while any(p % d == 0 for d in range(3, math.isqrt(p) + 1, 2)):  # trial division: sizes stay < 2**34
        p += 2
    return p
