"""Preble's E2 global scheduling (arXiv 2407.00023); docs/design.md gives each term and why.

Per request, with the default cost model (`cost_model="sharing"`): every backend costs (M + P) x (its requests in
flight + 1) and the least wins (M and P as below; the outcome is named exploit, overflow or explore), after the
replica and rebalance checks. With `cost_model="queue"` (the paper's E2):
- exploit: when the best backend's cached prompt tokens outnumber its missed ones, send to the longest
  match (least load L among ties), unless the prefix group was moved (rebalance) or replicated (replica),
  or (ours, `exploit_overflow`) the holder's queued prefill + P exceeds another backend's queued prefill + M + P:
  its prefill queue is longer than recomputing the prompt elsewhere (overflow; that backend then holds the
  prefix too);
- explore: otherwise the backend with the least L + M + P:
  L = compute time of the requests it received within the window H (prefill of their missed tokens plus
      decode of their outputs; `load_signal="window"`), or by default the work still outstanding there (what
      is left of the prefill and decode of what was sent), M = value of what the new request's missed blocks would evict there (each
      evicted prefix's prefill time x its uses within H, walking the backend's LRU), P = this request's
      prefill time there;
  prefill/decode balance: a backend whose recent hit ratio shows decode-heavy work (>= pd_hit_ratio) takes
  the prefill-heavy request when its load is not above the mean.
After each assignment: rebalancing (move the cheapest prefix groups off a backend whose L is >= bal_threshold x
the lightest one's) and hot-prefix replication (add a second holder to a group that dominates a heavy backend
and whose time to first token doubled across the window), undone when the group cools down.

Behind several routers (the snapshot shows other routers' requests: ClusterSnapshot.shared), near ties go to the
rendezvous choice of the prompt's first uncached block, so routers that cannot see each other's latest dispatches
agree on where a new prefix goes, and rebalancing/replication pause (each router's window loads see only its
share of the traffic). A lone router's snapshots never say shared.

Pure: no I/O, no clock (time comes in the snapshot and the callbacks).
"""

from __future__ import annotations

import bisect
import heapq
import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import count
from typing import NamedTuple

import xxhash

from preble_router.policies.base import BackendState, ClusterSnapshot, Decision, Reason, RouteRequest
from preble_router.policies.prefix_tree import Node, PrefixTree
from preble_router.policies.time_model import TimeModel
from preble_router.policies.windowed import WindowedSums
from preble_router.settings import setting


class LoadSignal(StrEnum):
    """What L (a backend's load) counts; PrebleConfig.load_signal."""

    WINDOW = "window"  # compute sent within H (the paper's)
    BOTH = "both"  # that plus the work still outstanding
    OUTSTANDING = "outstanding"  # prefill not yet done and decode still ahead of what was sent


class CostModel(StrEnum):
    """How a backend's load and this request's own work combine into its cost; PrebleConfig.cost_model."""

    QUEUE = "queue"  # L + M + P: the request waits behind L, then prefills (a serial queue)
    SHARING = "sharing"  # (M + P) x (in flight + 1): the engine's batch shares its compute among its requests


@dataclass
class PrebleConfig:
    """The policy's settings; each field's help says what it does and why its default (preble-router and
    preble-bench sim take the flagged ones as --preble-* options; figures are in BENCHMARKS.md)."""

    window: float = setting(180.0, "H: seconds of history behind load, prefix-use and TTFT figures.",
                            flag="--preble-window")
    bal_threshold: float = setting(
        1.5, "Th_bal: rebalance when the heaviest backend's load is this many times the lightest's.",
        flag="--preble-bal-threshold")
    rebalance_moves: bool = setting(
        False, "1: rebalancing moves prefix groups from the heaviest backend to the lightest (the paper's load "
        "rebalancing; the rules below gate it); 0: groups stay where their cache is, and load is balanced by the "
        "cost of each request alone (off: on the simulator suite moves never helped, and a moved group stays on its "
        "target however loaded it becomes; docs/design.md, \"Tried and dropped\").", flag="--preble-rebalance-moves",
        type=int, choices=[0, 1])
    warmup_per_backend: int = setting(50, "Requests per backend before rebalancing starts.", flag="--preble-warmup")
    replicate_ttft_ratio: float = setting(
        2.0, "Replicate a prefix group when its mean TTFT over the newer half of H is this many times the older "
        "half's (and it dominates a heavy backend).", flag="--preble-replicate-ttft-ratio")
    replicate_share: float = setting(
        0.5, "Share of a heavy backend's load one prefix group must hold to be replicated.",
        flag="--preble-replicate-share")
    pd_hit_ratio: float = setting(
        0.7, "Recent cache-hit ratio above which a backend is decode-heavy and takes prefill-heavy requests.",
        flag="--preble-pd-hit-ratio")
    pd_window: float = setting(30.0, "Seconds of history for that hit ratio.", flag="--preble-pd-window")
    chain_tokens: int = setting(
        8192, "Prefix groups longer than this (multi-turn chains) are never moved by rebalancing.",
        flag="--preble-chain-tokens")
    rebalance_recompute: float = setting(
        1.0, "Rebalancing moves a prefix group only when this many times the prefill of its prefix on the light "
        "backend (what it lacks there) is at most the group's recurring load on the heavy one (its window load "
        "less the prefill of its own prefix, which was paid once and is not saved by moving), and counts that "
        "recompute on the light side; inf: the paper's rule, which ignores that a moved group's KV is recomputed "
        "(nothing is copied) and so moves long document groups to save less queue time than their recompute "
        "costs, pushing the other backend's documents out.", flag="--preble-rebalance-recompute")
    eviction_pending: bool = setting(
        True, "1: M counts the KV blocks our in-flight prefills on a backend are about to store (they evict its "
        "least recently used blocks first, so a request is charged for the ones after them); 0: free = what the "
        "KV events report, and two cold documents sent to one backend close together both see room that their "
        "blocks, not stored yet, are about to take.", flag="--preble-eviction-pending", type=int, choices=[0, 1])
    load_signal: LoadSignal = setting(
        LoadSignal.OUTSTANDING, "L: compute sent within H (the paper's), plus the work still outstanding (both), or the "
        "outstanding work alone (prefill not yet done and decode still ahead of what was sent; reacts to queues, "
        "not history). At a few requests per second per backend the H-window sum is the backends' history, not "
        "their queues, and outweighs P and the queue itself (a cold document can be sent behind another while the "
        "other backend is idle). Rebalancing always compares the window loads.",
        flag="--preble-load-signal", choices=[s.value for s in LoadSignal])
    exploit_ratio: float = setting(
        0.5, "Exploit when the best match covers more than this share of the prompt (0.5: cached > missed).",
        flag="--preble-exploit-ratio")
    exploit_overflow: float = setting(
        1.0, "Leave the longest match when its queued prefill + P is more than this many times the best other "
        "backend's queued prefill + M + P (recomputing there, evictions included, beats its prefill queue; that "
        "backend then holds the prefix too, and later exploits pick the less loaded holder). Decode work is left "
        "out: vLLM batches a new prefill with running decodes, and counting them sends cache hits away at "
        "saturation. inf: the paper's exploit, which never looks at load.", flag="--preble-exploit-overflow")
    default_output_tokens: int = setting(128, "Output tokens assumed until max_tokens or the group's median says "
                                         "otherwise.", flag="--preble-default-output-tokens")
    rebalance_interval: float = setting(1.0, "Seconds between rebalancing checks.", flag="--preble-rebalance-interval")
    eviction_refresh: float = setting(
        0.25, "M reads each backend's LRU through a summary (an _EvictionCurve) rebuilt at most this often (seconds), "
        "or when a request needs more of the LRU than it covers: a lookup is then a binary search, not a walk of "
        "the prefix groups, and a rebuild (a walk) happens a few times a second whatever the rate. 0: rebuilt for "
        "every decision.", flag="--preble-eviction-refresh")
    cost_model: CostModel = setting(
        CostModel.SHARING,
        "queue: exploit the longest match unless its prefill queue overflows, else explore the least "
        "L + M + P (the paper's); sharing: every backend costs (M + P) x (its requests in flight + 1), the least "
        "wins (a continuous-batching engine shares each step among its batch, so a request's time grows with the "
        "batch it joins; LMetric's product, with M).", flag="--preble-cost-model",
        choices=[m.value for m in CostModel])

    decode_in_cost: int = setting(
        0, "1: the sharing cost counts the request's own decode too, (M + P + D) x (in flight + 1), D = its expected "
        "output (max_tokens, else the default) x the backend's observed time per output token: the batch shares "
        "decode steps as it shares prefill, so a holder whose batch is large costs more than a cache hit saves; "
        "0: (M + P) x (in flight + 1), where a hit's prefill saving outweighs any batch the holder has.",
        flag="--preble-decode-in-cost", type=int, choices=[0, 1])
    herd_tolerance: float = setting(
        0.25, "Behind several routers (the snapshot shows other routers' requests: ClusterSnapshot.shared), the "
        "backends whose cost is within this share of the least all count as tied, and the tie goes to the "
        "rendezvous choice of the prompt's first uncached block (the same on every router): routers that cannot "
        "see each other's latest dispatches send a new prefix to the same backend, and different new prefixes "
        "to different idle ones, instead of each picking its own least-loaded view. A lone router is unaffected; "
        "negative: off.", flag="--preble-herd-tolerance")
    shared_rebalance: int = setting(
        0, "1: rebalance and replicate behind several routers too. 0 (default): not while the snapshot shows other "
        "routers' requests: each router's window loads count only its own share of the traffic, so each finds "
        "its own imbalances and moves groups the fleet as a whole does not need moved.",
        flag="--preble-shared-rebalance", type=int, choices=[0, 1])

    def __post_init__(self) -> None:
        self.load_signal = LoadSignal(self.load_signal)  # from a flag or a caller's string
        self.cost_model = CostModel(self.cost_model)


@dataclass(slots=True)
class _GroupLoad:
    """A prefix group's share of one backend's load, fading with time constant H/2."""

    group: Node
    ms: float = 0.0  # all the compute its requests sent there
    recurring_ms: float = 0.0  # what a move would save: that compute less (re)computing the group's own prefix


@dataclass(slots=True)
class _Move:
    """Rebalancing sent a prefix group's exploits to `target` until `until`."""

    group: Node
    target: int
    until: float


@dataclass(slots=True)
class _Replica:
    """A hot prefix group served by several backends (replication)."""

    group: Node
    holders: set[int]


@dataclass(slots=True)
class _Flight:
    backend_id: int
    dispatched: float
    missed: int
    missed_blocks: int
    prompt: int
    idle: bool  # the backend had nothing in flight: its TTFT measures the prefill alone
    group: Node | None
    load_slot: list[float]  # the slot of its backend's load window it was counted in (corrected when it ends)
    est_output: int
    prefill_ms: float = 0.0  # estimated at dispatch
    first_token: float | None = None
    decode_end: float = 0.0  # when its decode is expected to end (set at the first token)
    decode_counted: bool = False  # its decode_end is in its backend's _DecodeSet sums


class _EvictionCurve:
    """One backend's LRU as M sees it: per prefix-tree node, oldest first, the blocks it holds there, where its
    held part ends (tokens of context) and its uses within H, with running sums of blocks and of the value of
    evicting each node whole (its recompute time x its uses). Built as deep as a query needed (and twice that,
    so deeper queries rarely rebuild); M of a request is then two binary searches and three node terms."""

    __slots__ = ("built", "complete", "held", "end", "hits", "cum_blocks", "cum_cost")

    def __init__(self, built: float) -> None:
        self.built = built
        self.complete = False  # the whole LRU is in it
        self.held: list[int] = []
        self.end: list[int] = []  # start_blocks + held, in blocks
        self.hits: list[int] = []
        self.cum_blocks: list[int] = []  # blocks of nodes 0..i
        self.cum_cost: list[float] = []  # value of evicting nodes 0..i whole

    def covers(self, blocks: int) -> bool:
        return self.complete or (bool(self.cum_blocks) and self.cum_blocks[-1] >= blocks)


class _DecodeEnd(NamedTuple):
    """A heap entry: ordered by expected end, then by arrival (seq), never by the flight."""

    end: float
    seq: int
    flight: _Flight


class _HitWindow:
    """Cached and prompt tokens sent to one backend within a window of seconds (windowed sums)."""

    __slots__ = ("sums",)

    def __init__(self, window: float) -> None:
        self.sums = WindowedSums(window, fields=2)  # cached, prompt

    def add(self, now: float, cached: int, prompt: int) -> None:
        self.sums.add(now, cached, prompt)

    def ratio(self, now: float) -> float:
        prompt = self.sums.total(now, 1)
        return self.sums.totals[0] / prompt if prompt > 0 else 0.0


class _PrefillQueue:
    """One backend's requests sent and still before their first token, oldest first, with running sums."""

    __slots__ = ("flights", "ms", "tokens", "blocks")

    def __init__(self) -> None:
        self.flights: OrderedDict[str, _Flight] = OrderedDict()
        self.ms = 0.0  # their estimated prefill
        self.tokens = 0  # their uncached prompt tokens
        self.blocks = 0  # the KV blocks those tokens will take

    def add(self, request_id: str, flight: _Flight) -> None:
        self.flights[request_id] = flight
        self.ms += flight.prefill_ms
        self.tokens += flight.missed
        self.blocks += flight.missed_blocks

    def remove(self, request_id: str) -> None:
        flight = self.flights.pop(request_id, None)
        if flight is not None:
            self.ms -= flight.prefill_ms
            self.tokens -= flight.missed
            self.blocks -= flight.missed_blocks
        if not self.flights:  # no float drift carried from one busy period to the next
            self.ms, self.tokens, self.blocks = 0.0, 0, 0

    def oldest_dispatch(self, default: float) -> float:
        return next(iter(self.flights.values())).dispatched if self.flights else default


class _DecodeSet:
    """One backend's requests past their first token. Decode work still ahead is the sum over them of
    max(0, expected end - now): kept as the sum of the ends not yet passed and their count, with a heap that
    retires ends as time passes, so reading it costs O(1) amortized."""

    __slots__ = ("flights", "_heap", "_ends", "_live", "_seq")

    def __init__(self) -> None:
        self.flights = 0  # requests decoding (expected end passed or not)
        self._heap: list[_DecodeEnd] = []
        self._ends = 0.0
        self._live = 0
        self._seq = count()

    def add(self, flight: _Flight, end: float) -> None:
        self.flights += 1
        flight.decode_end, flight.decode_counted = end, True
        self._ends += end
        self._live += 1
        heapq.heappush(self._heap, _DecodeEnd(end, next(self._seq), flight))

    def remove(self, flight: _Flight) -> None:
        self.flights -= 1
        self._uncount(flight)

    def remaining_ms(self, now: float) -> float:
        heap = self._heap
        while heap and heap[0].end <= now:
            self._uncount(heapq.heappop(heap).flight)
        if not self._live:
            self._ends = 0.0
            return 0.0
        return max(0.0, (self._ends - self._live * now) * 1000.0)

    def _uncount(self, flight: _Flight) -> None:
        if flight.decode_counted:
            flight.decode_counted = False
            self._ends -= flight.decode_end
            self._live -= 1


@dataclass
class _GroupState:
    ttft: WindowedSums | None = None  # count, seconds of its TTFTs within H (made at the first)
    outputs: deque[int] = field(default_factory=lambda: deque(maxlen=32))


class PreblePolicy:
    name = "preble"

    def __init__(self, config: PrebleConfig | None = None, time_model: TimeModel | None = None) -> None:
        self.config = config or PrebleConfig()
        self.time = time_model or TimeModel()
        self.tree = PrefixTree(self.config.window)
        self.tree.on_node_deleted = self._forget_group
        self._load: dict[int, WindowedSums] = {}  # backend -> its requests' compute within H
        self._group_load: dict[int, dict[int, _GroupLoad]] = {}  # backend -> id(group) -> its load there
        self._hits: dict[int, _HitWindow] = {}  # backend -> cached / prompt tokens within pd_window
        self._flights: dict[str, _Flight] = {}
        self._prefilling: dict[int, _PrefillQueue] = {}  # backend -> flights before their first token
        self._decoding: dict[int, _DecodeSet] = {}  # backend -> flights past their first token
        self._curves: dict[int, _EvictionCurve] = {}  # backend -> its LRU summary for M
        self._moved: dict[int, _Move] = {}  # id(group) -> where rebalancing sent it
        self._replicas: dict[int, _Replica] = {}  # id(group) -> its holders
        self._routed = 0
        self._block_size = 16  # learned from requests; only sizes the long-chain rule
        self._last_rebalance = -math.inf
        self._last_decay = 0.0

    # ---- decision -------------------------------------------------------------------------------
    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        now = snapshot.now
        backends = {b.backend_id: b for b in snapshot.backends}
        best = max(snapshot.backends, key=lambda b: b.matched_tokens)
        cached = best.matched_tokens
        exploit = cached > self.config.exploit_ratio * request.prompt_tokens
        # The load terms, computed once and only where a rule reads them: the sharing model's cost does not,
        # so a request that is not an exploit candidate there never walks the per-backend queues.
        loads: dict[int, float] = {}

        def load(i: int) -> float:
            if i not in loads:
                loads[i] = self._load_term(backends[i], now)
            return loads[i]

        # Replicas and moves only redirect requests that would exploit a cached prefix.
        if exploit and request.block_hashes:
            for node in self._ancestors(self.tree.deepest_shared(request.block_hashes)):
                replica = self._replicas.get(id(node))
                if replica and len(holders := replica.holders & backends.keys()) > 1:
                    costs = {i: load(i) + self._prefill(request, backends[i]) for i in holders}
                    chosen = min(costs, key=costs.__getitem__)
                    return Decision(chosen, Reason.REPLICA, backends[chosen].matched_tokens, costs,
                                    group_blocks=node.end_blocks)
                moved = self._moved.get(id(node))
                if moved and moved.target in backends and moved.until > now:
                    return Decision(moved.target, Reason.REBALANCE, backends[moved.target].matched_tokens,
                                    {moved.target: load(moved.target)}, group_blocks=node.end_blocks)

        if self.config.cost_model == CostModel.SHARING:
            return self._shared_cost(request, snapshot, cached, exploit)
        for i in backends:
            load(i)

        if exploit:
            holders = [b for b in snapshot.backends if b.matched_tokens == cached]
            chosen = min(holders, key=lambda b: (loads[b.backend_id], b.in_flight, b.backend_id))
            overflow = self._overflow(request, chosen, snapshot, loads)
            if overflow is not None:
                return overflow
            return Decision(chosen.backend_id, Reason.EXPLOIT, cached,
                            {b.backend_id: loads[b.backend_id] for b in holders})

        costs = {b.backend_id: loads[b.backend_id] + self._eviction(request, b, now) + self._prefill(request, b)
                 for b in snapshot.backends}
        ratios = {i: self._hit_ratio(i, now) for i in backends}
        decode_heavy = max(ratios, key=ratios.__getitem__)
        mean_load = sum(loads.values()) / len(loads)
        # Prefill-heavy work to a decode-heavy backend, if that evicts nothing of value there (our gate: with
        # tight KV capacity the paper's rule would trade that backend's hot prefixes for compute).
        if (len(backends) > 1 and ratios[decode_heavy] >= self.config.pd_hit_ratio and loads[decode_heavy] <= mean_load
                and self._eviction(request, backends[decode_heavy], now) == 0.0):
            return Decision(decode_heavy, Reason.PD_BALANCE, backends[decode_heavy].matched_tokens, costs)
        chosen_id = min(costs, key=lambda i: (costs[i], backends[i].in_flight, i))
        return Decision(chosen_id, Reason.EXPLORE, backends[chosen_id].matched_tokens, costs)

    def _shared_cost(self, request: RouteRequest, snapshot: ClusterSnapshot, cached: int, exploit: bool) -> Decision:
        """CostModel.SHARING: the least (M + P [+ D]) x (in flight + 1), P at least one token's prefill (vLLM
        recomputes the last prompt token), so a loaded backend never looks free; D (decode_in_cost) the request's
        own decode there."""
        now = snapshot.now
        floor = self.time.prefill_ms(1, request.prompt_tokens)
        output = (request.max_tokens or self.config.default_output_tokens) if self.config.decode_in_cost else 0
        costs = {b.backend_id: (self._eviction(request, b, now) + max(self._prefill(request, b), floor)
                                + (output * self.time.decode_ms_per_token(b.backend_id) if output else 0.0))
                 * (b.in_flight + 1) for b in snapshot.backends}
        chosen = min(snapshot.backends, key=lambda b: (costs[b.backend_id], -b.matched_tokens, b.in_flight,
                                                       b.backend_id))
        if snapshot.shared and self.config.herd_tolerance >= 0:
            chosen = self._rendezvous(request, snapshot, costs, costs[chosen.backend_id]) or chosen
        if not exploit:
            reason = Reason.EXPLORE
        else:
            reason = Reason.EXPLOIT if chosen.matched_tokens == cached else Reason.OVERFLOW
        return Decision(chosen.backend_id, reason, chosen.matched_tokens, costs)

    def _rendezvous(self, request: RouteRequest, snapshot: ClusterSnapshot, costs: dict[int, float],
                    least: float) -> BackendState | None:
        """Behind several routers: among the backends within herd_tolerance of the least cost, the one ranked
        first for the prompt's first uncached block (rendezvous hashing over backend URLs: every router ranks
        alike for the same block, different blocks spread). None when the prompt has no uncached full block.
        Another backend wins only by a margin its unseen load (already in its in_flight) did not erase."""
        block_size = request.block_size
        if not block_size or not request.block_hashes:
            return None
        first = max(b.matched_tokens for b in snapshot.backends) // block_size
        if first >= len(request.block_hashes):
            return None
        anchor = request.block_hashes[first]
        bound = least * (1.0 + self.config.herd_tolerance)
        tied = [b for b in snapshot.backends if costs[b.backend_id] <= bound]
        if len(tied) < 2:
            return None
        return max(tied, key=lambda b: _rank(anchor, b.url))

    def _overflow(self, request: RouteRequest, holder: BackendState, snapshot: ClusterSnapshot,
                  loads: dict[int, float]) -> Decision | None:
        """The exploit target is backed up: another backend serves the request sooner even recomputing it there."""
        factor = self.config.exploit_overflow
        others = [b for b in snapshot.backends if b.backend_id != holder.backend_id]
        if not others or not math.isfinite(factor):
            return None
        now = snapshot.now
        # Only queued prefill delays this request's own prefill: vLLM batches it with the running decodes, so
        # their remaining work (part of L) is no queue here (counting it sent cache hits away from busy GPUs).
        stay = self._remaining_prefill_ms(holder, now) + self._prefill(request, holder)
        costs = {b.backend_id: self._remaining_prefill_ms(b, now) + self._eviction(request, b, now)
                 + self._prefill(request, b) for b in others}
        best = min(costs, key=lambda i: (costs[i], snapshot.by_id(i).in_flight, i))
        if stay <= factor * costs[best]:
            return None
        costs[holder.backend_id] = stay
        return Decision(best, Reason.OVERFLOW, snapshot.by_id(best).matched_tokens, costs)

    # ---- cost terms ---------------------------------------------------------------------------------
    def _load_term(self, b: BackendState, now: float) -> float:
        if self.config.load_signal == LoadSignal.WINDOW:
            return self.load_ms(b.backend_id, now)
        outstanding = self._remaining_prefill_ms(b, now) + self._remaining_decode_ms(b, now)
        if self.config.load_signal == LoadSignal.OUTSTANDING:
            return outstanding
        return self.load_ms(b.backend_id, now) + outstanding

    def _remaining_decode_ms(self, b: BackendState, now: float) -> float:
        """Decode work still ahead on b: for what we sent, each request's expected output (max_tokens or its
        group's median) at the decode speed known at its first token, less the time it has decoded since; another
        router's running requests count half the default output."""
        decoding = self._decoding.get(b.backend_id)
        own = decoding.remaining_ms(now) if decoding else 0.0
        other = max(0, b.running_decode - (decoding.flights if decoding else 0))
        if not other:
            return own
        return own + other * self.time.decode_ms_per_token(b.backend_id) * self.config.default_output_tokens / 2

    def _remaining_prefill_ms(self, b: BackendState, now: float) -> float:
        """Prefill work still ahead of a new request on b: the backend works through what we sent it since the
        oldest request still waiting for its first token, so subtract the time since then; prefill we did not
        send (another router's) counts whole."""
        pending = self._prefilling.get(b.backend_id)
        if pending is None:
            own_ms, own_tokens, since = 0.0, 0, now
        else:
            own_ms, own_tokens, since = pending.ms, pending.tokens, pending.oldest_dispatch(now)
        other = max(0, b.pending_prefill_tokens - own_tokens)
        return max(0.0, own_ms - (now - since) * 1000.0) + self.time.prefill_ms(other, other)

    def load_ms(self, backend_id: int, now: float) -> float:
        """L: compute time of the requests sent to backend_id within the window."""
        window = self._load.get(backend_id)
        return max(window.total(now), 0.0) if window is not None else 0.0

    def _prefill(self, request: RouteRequest, b: BackendState) -> float:
        """P: this request's prefill time on b."""
        return self.time.prefill_ms(request.prompt_tokens - b.matched_tokens, request.prompt_tokens)

    def _eviction(self, request: RouteRequest, b: BackendState, now: float) -> float:
        """M: what the missed blocks would evict on b, valued by recomputation x recent uses."""
        if b.capacity_blocks is None or not request.block_size:
            return 0.0
        free = b.capacity_blocks - (b.cached_blocks or 0)
        need = math.ceil((request.prompt_tokens - b.matched_tokens) / request.block_size)
        skip = 0  # LRU blocks the requests queued ahead will evict (charged to them)
        if self.config.eviction_pending:
            queue = self._prefilling.get(b.backend_id)
            pending = queue.blocks if queue else 0
            skip, free = max(0, pending - free), max(0, free - pending)
        if need <= free:
            return 0.0
        return self._eviction_value(b.backend_id, skip, need - free, request.block_size, now)

    def _eviction_value(self, backend_id: int, skip: int, to_free: int, block_size: int, now: float) -> float:
        """Value of the `to_free` LRU blocks after the first `skip` (those go to the requests queued ahead).

        The engine evicts block by block: when only part of a node must go, only its tail does, and only that part
        is recomputed later (charging the whole node made a backend holding one hot long document look ruinous to
        evict from, so every new document went to the other backend). A node the engine already evicted in part
        (KV events, on_blocks_evicted) holds only its leading blocks; the requests queued ahead take the LRU head
        first (their tail of that node), this request what is left."""
        curve = self._curves.get(backend_id)
        if (curve is None or now - curve.built >= self.config.eviction_refresh or now < curve.built
                or not curve.covers(skip + to_free)):
            curve = self._build_curve(backend_id, 2 * (skip + to_free), block_size, now)
        cum = curve.cum_blocks
        if not cum:
            return 0.0
        k = bisect.bisect_right(cum, skip)  # the first node not all taken by the queue ahead
        if k == len(cum):
            return 0.0
        before = cum[k - 1] if k else 0
        held = curve.held[k] - (skip - before)  # what the queue ahead leaves of node k
        take = min(held, to_free)
        cost = self._node_value(take, curve.end[k] - (curve.held[k] - held), curve.hits[k], block_size)
        to_free -= take
        if to_free <= 0:
            return cost
        target = cum[k] + to_free
        j = bisect.bisect_left(cum, target, k + 1)  # the node where the last block to free lies
        cost += curve.cum_cost[min(j, len(cum)) - 1] - curve.cum_cost[k]  # nodes k+1..j-1 go whole
        if j < len(cum):
            cost += self._node_value(target - cum[j - 1], curve.end[j], curve.hits[j], block_size)
        return cost

    def _node_value(self, take: int, end_blocks: int, hits: int, block_size: int) -> float:
        """Recomputing the last `take` blocks of a node held up to end_blocks, times its uses."""
        if take <= 0 or not hits:
            return 0.0
        return self.time.prefill_ms(take * block_size, end_blocks * block_size) * hits

    def _build_curve(self, backend_id: int, depth: int, block_size: int, now: float) -> _EvictionCurve:
        curve = _EvictionCurve(now)
        total, value = 0, 0.0
        curve.complete = True
        for node in self.tree.lru_oldest_first(backend_id):
            if total >= depth:
                curve.complete = False
                break
            held = node.held_keys(backend_id)
            hits = node.hits(backend_id, now)
            end = node.start_blocks + held
            total += held
            value += self._node_value(held, end, hits, block_size)
            curve.held.append(held)
            curve.end.append(end)
            curve.hits.append(hits)
            curve.cum_blocks.append(total)
            curve.cum_cost.append(value)
        self._curves[backend_id] = curve
        return curve

    def _hit_ratio(self, backend_id: int, now: float) -> float:
        hits = self._hits.get(backend_id)
        return hits.ratio(now) if hits else 0.0

    # ---- bookkeeping after the decision --------------------------------------------------------------
    def on_dispatched(self, request: RouteRequest, decision: Decision, snapshot: ClusterSnapshot) -> None:
        now, b = snapshot.now, decision.backend_id
        state = snapshot.by_id(b)
        group = self.tree.deepest_shared(request.block_hashes) if request.block_hashes else None
        if decision.group_blocks and group is not None:
            self._adopt(group, decision, now)
        path = self.tree.insert(request.block_hashes, b, now) if request.block_hashes else []
        group = group or (path[0] if path else None)
        missed = request.prompt_tokens - decision.matched_tokens
        self._block_size = request.block_size or self._block_size
        gstate = _group_state(group) if group else None
        est_output = request.max_tokens or (int(statistics.median(gstate.outputs)) if gstate and gstate.outputs
                                            else self.config.default_output_tokens)
        prefill_ms = self.time.prefill_ms(missed, request.prompt_tokens)
        cost = prefill_ms + est_output * self.time.decode_ms_per_token(b)
        window = self._load.get(b)
        if window is None:
            window = self._load[b] = WindowedSums(self.config.window)
        load_slot = window.add(now, cost)
        if group is not None:
            slot = self._group_load.setdefault(b, {}).get(id(group))
            if slot is None:
                slot = self._group_load[b][id(group)] = _GroupLoad(group)
            slot.ms += cost
            # Recurring work: what the request costs beyond (re)computing the group's own prefix, which a move
            # would not save (it was paid once here and would be paid once more on the new backend).
            group_tokens = min(group.end_blocks * (request.block_size or self._block_size), request.prompt_tokens)
            prefix_missed = max(0, group_tokens - decision.matched_tokens)
            slot.recurring_ms += max(0.0, cost - self.time.prefill_ms(prefix_missed, group_tokens))
        hits = self._hits.get(b)
        if hits is None:
            hits = self._hits[b] = _HitWindow(self.config.pd_window)
        hits.add(now, decision.matched_tokens, request.prompt_tokens)
        missed_blocks = math.ceil(missed / request.block_size) if request.block_size else 0
        flight = _Flight(b, now, missed, missed_blocks, request.prompt_tokens, state.in_flight == 0, group, load_slot,
                         est_output, prefill_ms)
        self._flights[request.request_id] = flight
        self._prefilling.setdefault(b, _PrefillQueue()).add(request.request_id, flight)
        self._routed += 1
        if now - self._last_rebalance >= self.config.rebalance_interval:
            self._last_rebalance = now
            self._maintain(snapshot)

    def on_first_token(self, request: RouteRequest, backend_id: int, now: float) -> None:
        flight = self._flights.get(request.request_id)
        if flight is None:
            return
        if flight.first_token is not None:
            return
        ttft = now - flight.dispatched
        flight.first_token = now
        queue = self._prefilling.get(flight.backend_id)
        if queue is not None:
            queue.remove(request.request_id)
        end = now + flight.est_output * self.time.decode_ms_per_token(flight.backend_id) / 1000.0
        self._decoding.setdefault(flight.backend_id, _DecodeSet()).add(flight, end)
        if flight.idle and flight.missed > 0:
            self.time.observe_prefill(flight.missed, flight.prompt, ttft * 1000.0)
        if flight.group is not None:
            gstate = _group_state(flight.group)
            if gstate.ttft is None:
                gstate.ttft = WindowedSums(self.config.window, fields=2)
            gstate.ttft.add(now, 1.0, ttft)

    def on_finished(self, request: RouteRequest, backend_id: int, now: float,
                    output_tokens: int | None = None, ok: bool = True) -> None:
        flight = self._flights.pop(request.request_id, None)
        if flight is not None:
            if flight.first_token is None:
                queue = self._prefilling.get(flight.backend_id)
                if queue is not None:
                    queue.remove(request.request_id)
            elif (decoding := self._decoding.get(flight.backend_id)) is not None:
                decoding.remove(flight)
        if flight is None or not ok or not output_tokens:
            return
        if flight.first_token is not None and output_tokens > 1:
            self.time.observe_decode(backend_id, (now - flight.first_token) * 1000.0 / (output_tokens - 1))
        delta = (output_tokens - flight.est_output) * self.time.decode_ms_per_token(backend_id)
        window = self._load.get(backend_id)
        if window is not None:
            window.correct(flight.load_slot, 0, delta, now)
        if flight.group is not None:
            _group_state(flight.group).outputs.append(output_tokens)

    def on_blocks_evicted(self, backend_id: int, keys: list[int]) -> None:
        """The engine no longer holds these blocks there: the tree forgets them, so M stops charging for them and
        rebalancing sees what moving a group would really recompute."""
        self.tree.evict(backend_id, keys)  # M's summary of this LRU catches up at its next refresh

    def on_backend_removed(self, backend_id: int) -> None:
        self.tree.forget_backend(backend_id)
        for table in (self._load, self._group_load, self._hits, self._prefilling, self._decoding,
                      self._curves):
            table.pop(backend_id, None)

    # ---- rebalancing and replication ------------------------------------------------------------------
    def _maintain(self, snapshot: ClusterSnapshot) -> None:
        now, cfg = snapshot.now, self.config
        self.tree.prune(now)
        for decoding in self._decoding.values():  # retire passed ends: choose() may not read them (sharing)
            decoding.remaining_ms(now)
        ids = [b.backend_id for b in snapshot.backends]
        if len(ids) < 2:
            return
        loads = {i: self.load_ms(i, now) for i in ids}
        heavy = max(ids, key=loads.__getitem__)
        light = min(ids, key=loads.__getitem__)
        self._expire_group_loads(now)
        self._review_replicas(loads, now)
        if snapshot.shared and not cfg.shared_rebalance:
            return  # other routers' traffic is not in these window loads (PrebleConfig.shared_rebalance)
        if not snapshot.rebalancer:
            return  # a peer router moves groups for the fleet (one mover: moves are each router's own state)
        if loads[heavy] < cfg.bal_threshold * max(loads[light], 1e-9) or loads[heavy] <= 0:
            return
        groups = sorted(self._group_load.get(heavy, {}).values(), key=lambda g: g.ms)
        for slot in groups:
            if self._hot(slot.group, now) and slot.ms >= cfg.replicate_share * loads[heavy]:
                self._replicas.setdefault(id(slot.group), _Replica(slot.group, {heavy})).holders.add(light)
                return
        if not cfg.rebalance_moves or self._routed < cfg.warmup_per_backend * len(ids):
            return
        moved, added = 0.0, 0.0  # load taken off heavy; load (plus recompute) put on light
        for slot in groups:
            load, node, recurring = slot.ms, slot.group, slot.recurring_ms
            if load <= 0 or node.end_blocks * self._block_size > cfg.chain_tokens or id(node) in self._moved:
                continue
            recompute = self.recompute_ms(node, light) if math.isfinite(cfg.rebalance_recompute) else 0.0
            if cfg.rebalance_recompute * recompute > recurring:
                continue  # recomputing its prefix there costs more than the group's recurring work on heavy
            if loads[heavy] - moved - load <= loads[light] + added + load + recompute:
                break  # moving it would just swap the imbalance
            self._moved[id(node)] = _Move(node, light, now + cfg.window)
            moved += load
            added += load + recompute
            if loads[heavy] - moved < cfg.bal_threshold * (loads[light] + added):
                break

    def recompute_ms(self, node: Node, backend_id: int) -> float:
        """Prefill time of the part of node's prefix (root to node) that backend_id does not hold."""
        held_blocks = 0
        path = list(self._ancestors(node))[::-1]  # root side first
        for n in path:
            if backend_id not in n.last_use:
                break
            held_blocks = n.start_blocks + n.held_keys(backend_id)
            if n.held_keys(backend_id) < len(n.keys):
                break
        bs = self._block_size
        return self.time.prefill_ms((node.end_blocks - held_blocks) * bs, node.end_blocks * bs)

    def _hot(self, node: Node, now: float) -> bool:
        state = node.stats
        if state is None or state.ttft is None:
            return False
        ttft, since = state.ttft, now - self.config.window / 2
        count, seconds = ttft.total(now, 0), ttft.totals[1]
        newer_count, newer_seconds = ttft.since(now, since, 0), ttft.since(now, since, 1)
        older_count, older_seconds = count - newer_count, seconds - newer_seconds
        if older_count < 3 or newer_count < 3:
            return False
        return newer_seconds / newer_count >= self.config.replicate_ttft_ratio * (older_seconds / older_count)

    def _adopt(self, group: Node, decision: Decision, now: float) -> None:
        """A REBALANCE or REPLICA dispatch (a peer router's, replayed here, or this router's own: then a no-op):
        its group's move or replica holds here too, so peer routers route a moved group alike."""
        node = next((n for n in self._ancestors(group) if n.end_blocks == decision.group_blocks), None)
        if node is None:
            return
        if decision.reason == Reason.REBALANCE:
            if id(node) not in self._moved:
                self._moved[id(node)] = _Move(node, decision.backend_id, now + self.config.window)
        elif decision.reason == Reason.REPLICA:
            self._replicas.setdefault(id(node), _Replica(node, set())).holders.add(decision.backend_id)

    def _review_replicas(self, loads: dict[int, float], now: float) -> None:
        """Stop using extra holders once the group no longer dominates any of them or is no longer hot."""
        for key, replica in list(self._replicas.items()):
            share = max((self._group_ms(b, key) / loads[b] if loads.get(b) else 0.0) for b in replica.holders)
            if share < self.config.replicate_share / 2 and not self._hot(replica.group, now):
                del self._replicas[key]
        for key, move in list(self._moved.items()):
            if move.until <= now:
                del self._moved[key]

    def _forget_group(self, node: Node) -> None:
        """The tree dropped node (no backend holds or used it within H): so does every table keyed by it."""
        key = id(node)
        for table in self._group_load.values():
            table.pop(key, None)
        self._moved.pop(key, None)
        self._replicas.pop(key, None)

    def _group_ms(self, backend_id: int, key: int) -> float:
        slot = self._group_load.get(backend_id, {}).get(key)
        return slot.ms if slot else 0.0

    def _expire_group_loads(self, now: float) -> None:
        """Group loads fade exponentially (time constant H/2) instead of keeping per-request windows."""
        keep = math.exp(-(now - self._last_decay) / (self.config.window / 2)) if self._last_decay <= now else 1.0
        self._last_decay = now
        for table in self._group_load.values():
            for key, slot in list(table.items()):
                slot.ms *= keep
                slot.recurring_ms *= keep
                if slot.ms < 1e-3:
                    del table[key]

    @staticmethod
    def _ancestors(node: Node | None):
        while node is not None and node.keys:
            yield node
            node = node.parent


_M64 = (1 << 64) - 1


def _rank(anchor: int, url: str) -> int:
    """A backend's rendezvous rank for a block key: deterministic across processes (no Python hash()), so
    every router ranks the backends alike for the same key."""
    return xxhash.xxh3_64_intdigest(url.encode(), seed=anchor & _M64)


def _group_state(node: Node) -> _GroupState:
    if node.stats is None:
        node.stats = _GroupState()
    return node.stats
