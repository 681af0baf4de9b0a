"""Preble's E2 global scheduling (arXiv 2407.00023), as specified in PREBLE_SPEC.md.

Per request:
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

Pure: no I/O, no clock (time comes in the snapshot and the callbacks).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from preble_router.policies.base import BackendState, ClusterSnapshot, Decision, RouteRequest
from preble_router.policies.prefix_tree import Node, PrefixTree
from preble_router.policies.time_model import TimeModel


@dataclass
class PrebleConfig:
    window: float = 180.0  # H, seconds
    # L: "window" is the spec's (compute sent within H); "both" adds the work still outstanding there (prefill
    # not yet done, decodes not yet done), which reacts to queues at once; "outstanding" uses that alone.
    # Simulated tool use at 160 req/s on 4 GPUs: avg / p99 latency 1.21 / 4.15 s (window), 0.91 / 2.73 s (both).
    # Default "outstanding": at a few requests per second per backend the H-window sum is the backends' history
    # (tens of seconds, growing all run), not their queues, and it outweighed P and the queue itself: live on 2
    # vLLM CPU replicas it sent a cold 6.4k-token document behind another one (12k tokens queued) while the
    # other replica had 59 tokens queued. Rebalancing still compares the window loads, as the paper does.
    load_signal: str = "outstanding"
    exploit_ratio: float = 0.5  # exploit when cached tokens exceed this share of the prompt (0.5: cached > missed)
    # Exploit overflow (ours): leave the longest match when its queued prefill + P exceeds this many times the
    # best other backend's queued prefill + M + P, i.e. when recomputing elsewhere (eviction there included)
    # beats queueing behind the holder's prefill backlog; the other backend then holds the prefix too and later
    # exploits pick the less loaded holder. Decode work is left out: vLLM batches a new prefill with running
    # decodes (with all of L, simulated GPUs at saturation sent 14-70% of cache hits away and ran 5-50%
    # slower). The paper's exploit ignores load until rebalancing or replication react (inf: never overflow).
    exploit_overflow: float = 1.0
    bal_threshold: float = 1.5  # Th_bal: heaviest/lightest load ratio that triggers rebalancing
    warmup_per_backend: int = 50  # requests per backend before rebalancing starts
    replicate_ttft_ratio: float = 2.0  # newer-half / older-half mean TTFT that marks a prefix hot
    replicate_share: float = 0.5  # share of the heavy backend's load one group must hold to be replicated
    pd_hit_ratio: float = 0.7  # recent hit ratio above which a backend counts as decode-heavy
    pd_window: float = 30.0  # seconds of history for that ratio
    chain_tokens: int = 8192  # groups whose shared prefix is longer than this are never moved (long chains)
    # Rebalancing pays for its moves (ours): a moved group's prefix is recomputed on the light backend (the spec:
    # "its KV is recomputed, nothing is copied"), a one-off cost the paper's rule ignores. With this factor f
    # finite, a group moves only when f x that recompute (prefill of the part the light backend lacks) is at
    # most the recurring load the move takes off the heavy backend (the group's window load less the prefill of
    # its own prefix, which was paid once and is not saved by moving), and the recompute counts on the light
    # side in the "keeps the heavy side above the light side" check. inf: the paper's rule (moves
    # ignore recompute). Live on 2 vLLM CPU replicas the paper's rule moved ~5k-token document groups (4-9 s of
    # prefill each) to save ~1 s of queue, and the recompute pushed the other replica's documents out.
    rebalance_recompute: float = 1.0
    default_output_tokens: int = 128  # until max_tokens or the group's median says otherwise
    # M sees the blocks our in-flight prefills there are about to take (ours): the engine's free KV cache at the
    # time this request runs is what its events report minus what the requests queued ahead of it will store,
    # and those requests evict the least recently used blocks first, so this request is charged for the ones
    # after them. Without it, two cold documents sent to one replica within a second both saw free room (their
    # blocks not stored yet) and together pushed out a third document that the next request then exploited.
    eviction_pending: bool = True
    rebalance_interval: float = 1.0  # seconds between rebalancing checks


@dataclass(slots=True)
class _Flight:
    backend_id: int
    dispatched: float
    missed: int
    prompt: int
    idle: bool  # the backend had nothing in flight: its TTFT measures the prefill alone
    group: Node | None
    entry: list  # [time, cost] in the backend's load window
    est_output: int
    prefill_ms: float = 0.0  # estimated at dispatch
    first_token: float | None = None


@dataclass
class _GroupState:
    ttft: deque[tuple[float, float]] = field(default_factory=deque)  # (time, seconds)
    outputs: deque[int] = field(default_factory=lambda: deque(maxlen=32))


class PreblePolicy:
    name = "preble"

    def __init__(self, config: PrebleConfig | None = None, time_model: TimeModel | None = None) -> None:
        self.config = config or PrebleConfig()
        self.time = time_model or TimeModel()
        self.tree = PrefixTree(self.config.window)
        self._load: dict[int, deque[list]] = {}  # backend -> [time, cost ms] within H
        self._load_sum: dict[int, float] = {}
        self._group_load: dict[int, dict[int, list]] = {}  # backend -> id(group) -> [ms, node, recurring ms]
        self._hits: dict[int, deque[tuple[float, int, int]]] = {}  # backend -> (time, cached, prompt)
        self._flights: dict[str, _Flight] = {}
        self._prefilling: dict[int, dict[str, _Flight]] = {}  # backend -> flights before their first token
        self._decoding: dict[int, dict[str, _Flight]] = {}  # backend -> flights past their first token
        self._moved: dict[int, tuple[Node, int, float]] = {}  # id(group) -> (group, target, until)
        self._replicas: dict[int, tuple[Node, set[int]]] = {}  # id(group) -> (group, holders)
        self._routed = 0
        self._block_size = 16  # learned from requests; only sizes the long-chain rule
        self._last_rebalance = -math.inf
        self._last_decay = 0.0

    # ---- decision -------------------------------------------------------------------------------
    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        now = snapshot.now
        backends = {b.backend_id: b for b in snapshot.backends}
        loads = {i: self._load_term(b, now) for i, b in backends.items()}
        keys = request.block_hashes
        group = self.tree.deepest_shared(keys) if keys else None
        best = max(snapshot.backends, key=lambda b: b.matched_tokens)
        cached = best.matched_tokens
        exploit = cached > self.config.exploit_ratio * request.prompt_tokens

        for node in self._ancestors(group):
            replica = self._replicas.get(id(node))
            if replica and len(replica[1] & backends.keys()) > 1 and exploit:
                costs = {i: loads[i] + self._prefill(request, backends[i]) for i in replica[1] & backends.keys()}
                chosen = min(costs, key=costs.__getitem__)
                return Decision(chosen, "replica", backends[chosen].matched_tokens, costs)
            moved = self._moved.get(id(node))
            if moved and moved[1] in backends and moved[2] > now and exploit:
                return Decision(moved[1], "rebalance", backends[moved[1]].matched_tokens, {moved[1]: loads[moved[1]]})

        if exploit:
            holders = [b for b in snapshot.backends if b.matched_tokens == cached]
            chosen = min(holders, key=lambda b: (loads[b.backend_id], b.in_flight, b.backend_id))
            overflow = self._overflow(request, chosen, snapshot, loads)
            if overflow is not None:
                return overflow
            return Decision(chosen.backend_id, "exploit", cached,
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
            return Decision(decode_heavy, "pd_balance", backends[decode_heavy].matched_tokens, costs)
        chosen_id = min(costs, key=lambda i: (costs[i], backends[i].in_flight, i))
        return Decision(chosen_id, "explore", backends[chosen_id].matched_tokens, costs)

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
        return Decision(best, "overflow", snapshot.by_id(best).matched_tokens, costs)

    # ---- cost terms ---------------------------------------------------------------------------------
    def _load_term(self, b: BackendState, now: float) -> float:
        if self.config.load_signal == "window":
            return self.load_ms(b.backend_id, now)
        outstanding = self._remaining_prefill_ms(b, now) + self._remaining_decode_ms(b, now)
        if self.config.load_signal == "outstanding":
            return outstanding
        return self.load_ms(b.backend_id, now) + outstanding

    def _remaining_decode_ms(self, b: BackendState, now: float) -> float:
        """Decode work still ahead on b: for what we sent, each request's expected output (max_tokens or its
        group's median) minus the tokens its time since the first token has produced; another router's running
        requests count half the default output."""
        per_token = self.time.decode_ms_per_token(b.backend_id)
        decoding = self._decoding.get(b.backend_id) or {}
        own = 0.0
        for f in decoding.values():
            own += max(0.0, f.est_output * per_token - (now - (f.first_token or now)) * 1000.0)
        other = max(0, b.running_decode - len(decoding))
        return own + other * per_token * self.config.default_output_tokens / 2

    def _remaining_prefill_ms(self, b: BackendState, now: float) -> float:
        """Prefill work still ahead of a new request on b: the backend works through what we sent it since the
        oldest request still waiting for its first token, so subtract the time since then; prefill we did not
        send (another router's) counts whole."""
        pending = self._prefilling.get(b.backend_id)
        own_ms, own_tokens, since = 0.0, 0, now
        for f in (pending or {}).values():
            own_ms += f.prefill_ms
            own_tokens += f.missed
            since = min(since, f.dispatched)
        other = max(0, b.pending_prefill_tokens - own_tokens)
        return max(0.0, own_ms - (now - since) * 1000.0) + self.time.prefill_ms(other, other)

    def load_ms(self, backend_id: int, now: float) -> float:
        """L: compute time of the requests sent to backend_id within the window."""
        q = self._load.get(backend_id)
        if not q:
            return 0.0
        horizon = now - self.config.window
        while q and q[0][0] < horizon:
            self._load_sum[backend_id] -= q.popleft()[1]
        return max(self._load_sum[backend_id], 0.0)

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
            pending = sum(math.ceil(f.missed / request.block_size)
                          for f in (self._prefilling.get(b.backend_id) or {}).values())
            skip, free = max(0, pending - free), max(0, free - pending)
        if need <= free:
            return 0.0
        to_free, cost, horizon = need - free, 0.0, now - self.config.window
        for node in self.tree.lru_oldest_first(b.backend_id):
            # The engine evicts block by block: when only part of this node must go, only its tail does, and
            # only that part is recomputed later (charging the whole node made a backend holding one hot long
            # document look ruinous to evict from, so every new document went to the other backend). A node the
            # engine already evicted in part (KV events, on_blocks_evicted) holds only its leading blocks; the
            # requests queued ahead take the LRU head first (their tail of this node), this request what is left.
            held = node.held_keys(b.backend_id)
            gone = min(held, skip)
            skip -= gone
            held -= gone
            take = min(held, to_free)
            if take <= 0:
                continue
            hits = node.hits(b.backend_id, horizon)
            if hits:
                end = (node.start_blocks + held) * request.block_size
                cost += self.time.prefill_ms(take * request.block_size, end) * hits
            to_free -= take
            if to_free <= 0:
                break
        return cost

    def _hit_ratio(self, backend_id: int, now: float) -> float:
        q = self._hits.get(backend_id)
        if not q:
            return 0.0
        while q and q[0][0] < now - self.config.pd_window:
            q.popleft()
        prompt = sum(p for _, _, p in q)
        return sum(c for _, c, _ in q) / prompt if prompt else 0.0

    # ---- bookkeeping after the decision --------------------------------------------------------------
    def on_dispatched(self, request: RouteRequest, decision: Decision, snapshot: ClusterSnapshot) -> None:
        now, b = snapshot.now, decision.backend_id
        state = snapshot.by_id(b)
        group = self.tree.deepest_shared(request.block_hashes) if request.block_hashes else None
        path = self.tree.insert(request.block_hashes, b, now) if request.block_hashes else []
        group = group or (path[0] if path else None)
        missed = request.prompt_tokens - decision.matched_tokens
        self._block_size = request.block_size or self._block_size
        gstate = _group_state(group) if group else None
        est_output = request.max_tokens or (int(statistics.median(gstate.outputs)) if gstate and gstate.outputs
                                            else self.config.default_output_tokens)
        prefill_ms = self.time.prefill_ms(missed, request.prompt_tokens)
        cost = prefill_ms + est_output * self.time.decode_ms_per_token(b)
        entry = [now, cost]
        self._load.setdefault(b, deque()).append(entry)
        self._load_sum[b] = self._load_sum.get(b, 0.0) + cost
        if group is not None:
            slot = self._group_load.setdefault(b, {}).setdefault(id(group), [0.0, group, 0.0])
            slot[0] += cost
            # Recurring work: what the request costs beyond (re)computing the group's own prefix, which a move
            # would not save (it was paid once here and would be paid once more on the new backend).
            group_tokens = min(group.end_blocks * (request.block_size or self._block_size), request.prompt_tokens)
            prefix_missed = max(0, group_tokens - decision.matched_tokens)
            slot[2] += max(0.0, cost - self.time.prefill_ms(prefix_missed, group_tokens))
        self._hits.setdefault(b, deque()).append((now, decision.matched_tokens, request.prompt_tokens))
        flight = _Flight(b, now, missed, request.prompt_tokens, state.in_flight == 0, group, entry, est_output,
                         prefill_ms)
        self._flights[request.request_id] = flight
        self._prefilling.setdefault(b, {})[request.request_id] = flight
        self._routed += 1
        if now - self._last_rebalance >= self.config.rebalance_interval:
            self._last_rebalance = now
            self._maintain(snapshot)

    def on_first_token(self, request: RouteRequest, backend_id: int, now: float) -> None:
        flight = self._flights.get(request.request_id)
        if flight is None:
            return
        ttft = now - flight.dispatched
        flight.first_token = now
        self._prefilling.get(flight.backend_id, {}).pop(request.request_id, None)
        self._decoding.setdefault(flight.backend_id, {})[request.request_id] = flight
        if flight.idle and flight.missed > 0:
            self.time.observe_prefill(flight.missed, flight.prompt, ttft * 1000.0)
        if flight.group is not None:
            _group_state(flight.group).ttft.append((now, ttft))

    def on_finished(self, request: RouteRequest, backend_id: int, now: float,
                    output_tokens: int | None = None, ok: bool = True) -> None:
        flight = self._flights.pop(request.request_id, None)
        if flight is not None:
            self._prefilling.get(flight.backend_id, {}).pop(request.request_id, None)
            self._decoding.get(flight.backend_id, {}).pop(request.request_id, None)
        if flight is None or not ok or not output_tokens:
            return
        if flight.first_token is not None and output_tokens > 1:
            self.time.observe_decode(backend_id, (now - flight.first_token) * 1000.0 / (output_tokens - 1))
        delta = (output_tokens - flight.est_output) * self.time.decode_ms_per_token(backend_id)
        if self._load.get(backend_id) and flight.entry[0] >= now - self.config.window:
            flight.entry[1] += delta
            self._load_sum[backend_id] += delta
        if flight.group is not None:
            _group_state(flight.group).outputs.append(output_tokens)

    def on_blocks_evicted(self, backend_id: int, keys: list[int]) -> None:
        """The engine no longer holds these blocks there: the tree forgets them, so M stops charging for them and
        rebalancing sees what moving a group would really recompute."""
        self.tree.evict(backend_id, keys)

    def on_backend_removed(self, backend_id: int) -> None:
        self.tree.forget_backend(backend_id)
        for table in (self._load, self._load_sum, self._group_load, self._hits, self._prefilling, self._decoding):
            table.pop(backend_id, None)

    # ---- rebalancing and replication ------------------------------------------------------------------
    def _maintain(self, snapshot: ClusterSnapshot) -> None:
        now, cfg = snapshot.now, self.config
        self.tree.prune(now)
        ids = [b.backend_id for b in snapshot.backends]
        if len(ids) < 2:
            return
        loads = {i: self.load_ms(i, now) for i in ids}
        heavy = max(ids, key=loads.__getitem__)
        light = min(ids, key=loads.__getitem__)
        self._expire_group_loads(now)
        self._review_replicas(loads, now)
        if loads[heavy] < cfg.bal_threshold * max(loads[light], 1e-9) or loads[heavy] <= 0:
            return
        groups = sorted(self._group_load.get(heavy, {}).values(), key=lambda s: s[0])
        for load, node, _ in groups:
            if self._hot(node, now) and load >= cfg.replicate_share * loads[heavy]:
                holders = self._replicas.setdefault(id(node), (node, {heavy}))[1]
                holders.add(light)
                return
        if self._routed < cfg.warmup_per_backend * len(ids):
            return
        moved, added = 0.0, 0.0  # load taken off heavy; load (plus recompute) put on light
        for load, node, recurring in groups:
            if load <= 0 or node.end_blocks * self._block_size > cfg.chain_tokens or id(node) in self._moved:
                continue
            recompute = self.recompute_ms(node, light) if math.isfinite(cfg.rebalance_recompute) else 0.0
            if cfg.rebalance_recompute * recompute > recurring:
                continue  # recomputing its prefix there costs more than the group's recurring work on heavy
            if loads[heavy] - moved - load <= loads[light] + added + load + recompute:
                break  # moving it would just swap the imbalance
            self._moved[id(node)] = (node, light, now + cfg.window)
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
        if state is None:
            return False
        half = self.config.window / 2
        while state.ttft and state.ttft[0][0] < now - self.config.window:
            state.ttft.popleft()
        older = [t for ts, t in state.ttft if ts < now - half]
        newer = [t for ts, t in state.ttft if ts >= now - half]
        if len(older) < 3 or len(newer) < 3:
            return False
        return statistics.fmean(newer) >= self.config.replicate_ttft_ratio * statistics.fmean(older)

    def _review_replicas(self, loads: dict[int, float], now: float) -> None:
        """Stop using extra holders once the group no longer dominates any of them or is no longer hot."""
        for key, (node, holders) in list(self._replicas.items()):
            share = max((self._group_load.get(b, {}).get(key, [0.0])[0] / loads[b] if loads.get(b) else 0.0)
                        for b in holders)
            if share < self.config.replicate_share / 2 and not self._hot(node, now):
                del self._replicas[key]
        for key, (_, _, until) in list(self._moved.items()):
            if until <= now:
                del self._moved[key]

    def _expire_group_loads(self, now: float) -> None:
        """Group loads fade exponentially (time constant H/2) instead of keeping per-request windows."""
        keep = math.exp(-(now - self._last_decay) / (self.config.window / 2)) if self._last_decay <= now else 1.0
        self._last_decay = now
        for table in self._group_load.values():
            for key in list(table):
                table[key][0] *= keep
                table[key][2] *= keep
                if table[key][0] < 1e-3:
                    del table[key]

    @staticmethod
    def _ancestors(node: Node | None):
        while node is not None and node.keys:
            yield node
            node = node.parent


def _group_state(node: Node) -> _GroupState:
    if node.stats is None:
        node.stats = _GroupState()
    return node.stats
