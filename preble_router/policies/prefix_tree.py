"""Preble's global prefix tree, over block keys: which prefixes were used where, and how often lately.

Nodes are runs of block keys (a radix tree: a node splits where two prompts diverge). Per backend a node
records its last use and its uses within the window H (counted per time slot, windowed.py: bounded however
hot the prefix); per backend an LRU list of nodes approximates what
the engine would evict first. Presence itself comes from the cache index (engine events): this tree only
supplies the usage history the cost model needs. Nodes unused for H are pruned, so memory follows the
window, not the traffic's history.

The tree learns placement from routing, so on its own it would keep listing blocks the engine already evicted.
`evict(backend, keys)` (fed from the cache index, i.e. the engine's KV events) forgets them: a node whose first
evicted block is at offset i keeps only its first i blocks on that backend (`Node.held`), or loses the backend
at i = 0, and every node below it loses the backend (prefix matching stops at the first missing block).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from preble_router.policies.windowed import WindowedSums


@dataclass(eq=False, slots=True)
class Node:
    keys: list[int]
    parent: Node | None
    start_blocks: int  # blocks before this node on its path
    children: dict[int, Node] = field(default_factory=dict)
    last_use: dict[int, float] = field(default_factory=dict)  # backend -> time
    uses: dict[int, WindowedSums] = field(default_factory=dict)  # backend -> its uses within the window
    stats: Any = None  # the policy's per-group state; lives and dies with the node
    held: dict[int, int] = field(default_factory=dict)  # backend -> leading keys still held there, when not all

    def held_keys(self, backend_id: int) -> int:
        """Leading keys of this node that backend_id still holds (as far as eviction reports say)."""
        return self.held.get(backend_id, len(self.keys))

    @property
    def end_blocks(self) -> int:
        return self.start_blocks + len(self.keys)

    def hits(self, backend_id: int, now: float) -> int:
        """Uses on backend_id within the window before now."""
        uses = self.uses.get(backend_id)
        return round(uses.total(now)) if uses is not None else 0


# Runs of one key _evicted_offsets measures before it groups the rest of a batch by node instead.
_MAX_SINGLE_RUNS = 16


class PrefixTree:
    def __init__(self, window: float) -> None:
        self.window = window
        self.root = Node([], None, 0)
        self._lru: dict[int, OrderedDict[int, Node]] = {}  # backend -> id(node) -> node, oldest first
        self._by_key: dict[int, Node] = {}  # block key -> the node whose run contains it
        self.nodes = 0
        # Called with each node the tree drops: whoever keeps state keyed by a node (the policy's group loads,
        # moves, replicas) forgets it then, so that state is bounded by the tree and an id() is never reused
        # for a node it does not describe.
        self.on_node_deleted: Callable[[Node], None] | None = None

    def path(self, keys: Sequence[int]) -> list[Node]:
        """Existing nodes along keys, the last one possibly covering keys only in part."""
        # Runs are lists, and a slice of a tuple (a RouteRequest's block_hashes) or a range never equals a list:
        # compared as given, every path would end at its first node.
        keys = keys if isinstance(keys, list) else list(keys)
        out, node, pos = [], self.root, 0
        while pos < len(keys):
            child = node.children.get(keys[pos])
            if child is None:
                break
            out.append(child)
            run = child.keys
            if keys[pos : pos + len(run)] != run:
                break
            pos += len(run)
            node = child
        return out

    def deepest_shared(self, keys: Sequence[int]) -> Node | None:
        """The deepest node whose whole run is a prefix of keys: the request's prefix group."""
        keys = keys if isinstance(keys, list) else list(keys)
        path = self.path(keys)
        while path and keys[path[-1].start_blocks : path[-1].end_blocks] != path[-1].keys:
            path.pop()
        return path[-1] if path else None

    def insert(self, keys: Sequence[int], backend_id: int, now: float) -> list[Node]:
        """Record a use of the prompt keys on backend_id; returns the path of nodes covering keys."""
        node, pos, path = self.root, 0, []
        keys = list(keys)
        while pos < len(keys):
            child = node.children.get(keys[pos])
            if child is None:
                child = Node(keys[pos:], node, pos)
                node.children[keys[pos]] = child
                self.nodes += 1
                self._by_key.update(dict.fromkeys(child.keys, child))
                path.append(child)
                break
            run = child.keys
            common = _common_prefix(run, keys, pos)
            if common < len(run):
                child = self._split(child, common)
            path.append(child)
            pos += common
            node = child
        lru = self._lru.setdefault(backend_id, OrderedDict())
        for n in reversed(path):  # leaf first, so the root ends most recent and leaves are evicted first
            n.held.pop(backend_id, None)  # routed there again: the engine recomputes what it had evicted
            n.last_use[backend_id] = now
            uses = n.uses.get(backend_id)
            if uses is None:
                uses = n.uses[backend_id] = WindowedSums(self.window)
            uses.add(now, 1.0)
            lru[id(n)] = n
            lru.move_to_end(id(n))
        return path

    def lru_oldest_first(self, backend_id: int) -> Iterator[Node]:
        return iter(self._lru.get(backend_id, {}).values())

    def prune(self, now: float) -> None:
        """Forget uses older than the window; drop nodes no backend used within it."""
        horizon = now - self.window
        for backend_id, lru in self._lru.items():
            while lru:
                node = next(iter(lru.values()))
                if node.last_use.get(backend_id, horizon) >= horizon:
                    break
                lru.popitem(last=False)
                node.last_use.pop(backend_id, None)
                node.uses.pop(backend_id, None)
                node.held.pop(backend_id, None)
                self._maybe_delete(node)

    def evict(self, backend_id: int, keys: Sequence[int]) -> int:
        """backend_id no longer holds these blocks: forget it there, from each block's position on down.
        Returns how many nodes lost the backend entirely."""
        lru = self._lru.get(backend_id)
        if not lru:
            return 0
        cuts = self._evicted_offsets(backend_id, keys)
        dropped = 0
        for node, at in cuts.values():
            if backend_id not in node.last_use:
                continue  # dropped meanwhile, below an earlier node's cut
            if at >= node.held_keys(backend_id):
                continue  # already cut below this block
            stack = list(node.children.values())
            while stack:
                n = stack.pop()
                if backend_id in n.last_use:
                    dropped += self._drop(n, backend_id, lru)
                    stack.extend(n.children.values())
            if at == 0:
                dropped += self._drop(node, backend_id, lru)
            else:
                node.held[backend_id] = at
        return dropped

    def _evicted_offsets(self, backend_id: int, keys: Sequence[int]) -> dict[int, tuple[Node, int]]:
        """id(node) -> (node, the offset of its first evicted key), for the nodes backend_id used.

        Evictions come a window of a prompt at a time: in chain order (the router's estimate drops whole spans),
        or in reverse (an engine frees a request's tail first). So a key's node is looked up once per run of
        keys that follows (or retraces) the node's own keys, and the run is measured by C-level slice
        comparisons, not a Python step per key; keys the tree does not know are skipped one by one. Keys in no
        order at all (each its own run) would cost a scan of their node each: past a few, the rest are grouped
        by node instead (one pass, then one scan per node)."""
        cuts: dict[int, tuple[Node, int]] = {}
        get = self._by_key.get
        pos, n, singles = 0, len(keys), 0
        while pos < n:
            key = keys[pos]
            node = get(key)
            if node is None:
                pos += 1
                continue
            run = node.keys
            at = run.index(key)
            step = _common_run(keys, pos, run, at, min(len(run) - at, n - pos))
            first = at
            if step == 1 and at and n - pos > 1:  # perhaps a run backwards: the node's keys reversed from `at`
                back = run[at::-1]
                step = _common_run(keys, pos, back, 0, min(len(back), n - pos))
                first = at - step + 1
                singles += step == 1
                if singles > _MAX_SINGLE_RUNS:
                    self._scattered_offsets(backend_id, keys[pos:], cuts)
                    break
            pos += step
            if backend_id in node.last_use:
                found = cuts.get(id(node))
                if found is None or first < found[1]:
                    cuts[id(node)] = (node, first)
        return cuts

    def _scattered_offsets(self, backend_id: int, keys: Sequence[int], cuts: dict[int, tuple[Node, int]]) -> None:
        """_evicted_offsets for keys in no order: grouped by node, then each node's first evicted key found in one
        walk of its keys."""
        gone: dict[int, tuple[Node, set[int]]] = {}
        for key in keys:
            node = self._by_key.get(key)
            if node is not None and backend_id in node.last_use:
                gone.setdefault(id(node), (node, set()))[1].add(key)
        for node_id, (node, evicted) in gone.items():
            first = next(i for i, k in enumerate(node.keys) if k in evicted)
            found = cuts.get(node_id)
            if found is None or first < found[1]:
                cuts[node_id] = (node, first)

    def _drop(self, node: Node, backend_id: int, lru: OrderedDict[int, Node]) -> int:
        lru.pop(id(node), None)
        node.last_use.pop(backend_id, None)
        node.uses.pop(backend_id, None)
        node.held.pop(backend_id, None)
        self._maybe_delete(node)
        return 1

    def forget_backend(self, backend_id: int) -> None:
        for node in list(self._lru.pop(backend_id, {}).values()):
            node.last_use.pop(backend_id, None)
            node.uses.pop(backend_id, None)
            node.held.pop(backend_id, None)
            self._maybe_delete(node)

    def _maybe_delete(self, node: Node) -> None:
        while node.parent is not None and not node.last_use and not node.children:
            parent = node.parent
            del parent.children[node.keys[0]]
            self._forget(node)
            node = parent

    def _forget(self, node: Node) -> None:
        """node left the tree: its keys stop pointing at it (a key names one prefix, so one node)."""
        self.nodes -= 1
        by_key = self._by_key
        if by_key.get(node.keys[0]) is node and by_key.get(node.keys[-1]) is node:
            deque(map(by_key.pop, node.keys, repeat(None)), maxlen=0)  # the whole run, in one C-level pass
        else:
            for k in node.keys:
                if by_key.get(k) is node:
                    del by_key[k]
        if self.on_node_deleted is not None:
            self.on_node_deleted(node)

    def _split(self, node: Node, at: int) -> Node:
        """Cut node after `at` keys; the new upper node takes its place and inherits its history."""
        upper = Node(node.keys[:at], node.parent, node.start_blocks)
        assert node.parent is not None
        node.parent.children[upper.keys[0]] = upper
        node.keys = node.keys[at:]
        node.start_blocks += at
        node.parent = upper
        upper.children[node.keys[0]] = node
        upper.last_use = dict(node.last_use)
        upper.uses = {b: uses.copy() for b, uses in node.uses.items()}
        self._by_key.update(dict.fromkeys(upper.keys, upper))
        for b, held in list(node.held.items()):  # a cut inside the upper run: the lower part is gone there
            if held < at:
                upper.held[b] = held
                del node.held[b]
                node.last_use.pop(b, None)
                node.uses.pop(b, None)
                self._lru.get(b, OrderedDict()).pop(id(node), None)
            elif held == at:
                del node.held[b]
                node.last_use.pop(b, None)
                node.uses.pop(b, None)
                self._lru.get(b, OrderedDict()).pop(id(node), None)
            else:
                node.held[b] = held - at
        if not node.last_use and not node.children:  # the lower part is held nowhere any more
            del upper.children[node.keys[0]]
            self._forget(node)
        for b in upper.last_use:
            # Approximation: the upper half joins the LRU list as recent (an OrderedDict cannot insert in the
            # middle); it holds the shared part, which is the most likely to be used again anyway.
            self._lru.setdefault(b, OrderedDict())[id(upper)] = upper
        self.nodes += 1
        return upper


def _common_run(a: Sequence[int], i: int, b: Sequence[int], j: int, limit: int) -> int:
    """How many of a[i:] equal b[j:] one for one, up to limit (>= 1 when a[i] == b[j]): bisected with slice
    comparisons, which run in C."""
    if a[i : i + limit] == b[j : j + limit]:
        return limit
    lo, hi = 1, limit - 1  # a[i:i+lo] matches (a[i] == b[j]); a[i:i+limit] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i : i + mid] == b[j : j + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_prefix(run: list[int], keys: list[int], pos: int) -> int:
    n = min(len(run), len(keys) - pos)
    if keys[pos : pos + n] == run[:n]:
        return n
    i = 0
    while i < n and run[i] == keys[pos + i]:
        i += 1
    return i
