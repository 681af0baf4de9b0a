"""A discrete-event simulator of G vLLM-like engines behind the real router.

The routing side is not modelled: the simulator drives the exact objects the proxy drives,
``preble_router.router.Router`` with a policy from ``preble_router.policies`` (any name in POLICIES), on a
simulated clock. Per request: ``prepare_tokens`` -> ``decide`` -> ``dispatch``; ``first_token`` at the
simulated first token; ``finish`` at completion. Each engine reports its prefix-cache changes to
``router.index`` the way vLLM's KV events do (``apply_stored`` / ``apply_removed``), so the router's view
of the caches is exactly what a live router with KV events would have (without event latency).

Each engine is vLLM-v1-like (its Scheduler, KVCacheManager and BlockPool):
- continuous batching with chunked prefill: every step, the running requests in admission order (decodes
  one token each, counted first against the budget; prefills a chunk), then waiting requests, within
  ``max_batched_tokens`` (2048) and ``max_num_seqs`` (256);
- a block prefix cache: ``block_size`` (16) tokens per block, ``capacity_blocks`` blocks in all. Blocks are
  allocated per step, for the tokens a step computes (a prefill chunk, or one decode token, which needs a
  new block every block_size tokens), not reserved for the whole request. A request hits only full leading
  blocks already cached, never its last prompt token (vLLM recomputes it); hits are touched (taken out of
  the free queue) at admission. Full prompt blocks are cached, and reported as BlockStored, when allocated
  (as vLLM's allocate_slots does); a block another request cached meanwhile is shared;
- the free queue (vLLM >= 0.24): never-used and freed unhashed (partial) blocks first, then freed full
  blocks oldest first, a request's blocks freed tail first; handing out a cached block evicts it
  (BlockRemoved). Full blocks past the prompt (output tokens) are not cached here (vLLM caches them; no
  prompt could match them) but keep their place in the queue;
- when a running request cannot get its blocks, the newest running request is preempted (RECOMPUTE: its
  blocks are freed, cached ones staying in the prefix cache until evicted; it goes back to the front of the
  waiting queue and prefills its prompt and the tokens it had generated again, mostly from cache if they
  survived; its reported cached_tokens stay those of its first admission), and nothing is admitted that
  step;
- waiting requests are admitted while their hits plus first chunk can be allocated, with head-of-line
  blocking, as vLLM's, in the order of the engine's waiting queue: FCFS (vLLM's), or with
  ``local_scheduler="preble"`` the Preble plugin's own queue (``vllm_patches.group_queue.PrebleRequestQueue``,
  its defaults: 10 cache-hit-ratio groups served in weighted turns, an age bound, hit ratios read from this
  engine's prefix cache as the plugin reads vLLM's), driven the way vLLM's scheduler drives it.

Step time (the time model, ``TimeProfile``)::

    t = a + b * prefill_tokens + e * prefill_attention_pairs + c * decode_context_tokens + d * decode_batch

where prefill_attention_pairs is, over the step's prefill chunks, sum of n * (p + (n + 1) / 2) for a chunk
of n tokens after p computed ones (causal attention), and decode_context_tokens the sum of the decoding
requests' context lengths. A request reaches its engine ``overhead`` seconds after the router dispatched it
(HTTP, the server's own tokenization, IPC: time that is not engine time; 0 in the GPU profiles below, ~40 ms
on the vLLM CPU replicas fitted by ``benchmarks/sim_vs_live.py``). ``contention`` (0 for GPUs) models
replicas that share a machine's cores: a step, and a request's overhead, take (1 + contention x the share of
the other engines busy at its start) times as long (two one-core vLLM CPU replicas on two cores, next to
their API servers, the router and the client, fit 0.2-0.8, but see ``sim_vs_live --apply-contention``). Decode bookkeeping is per step, not per token: a decoding request is an entry
in a heap keyed by the step at which it finishes and in one keyed by the step at which it needs its next
block, and the batch's context sum is kept incrementally.

Default profile, "llama3-8b-h100": Llama-3-8B in bf16 on one H100 SXM. These are ESTIMATES from first
principles and public specs, not measurements; refit them from a profile of your deployment:
- a = 6.0 ms: reading 16 GB of weights at ~3.3 TB/s (~4.8 ms) plus launch/scheduler overhead; matches the
  ~6-7 ms batch-1 inter-token latency commonly reported for 8B models on H100 with vLLM.
- b = d = 2.7e-5 s per token: 2 x 8.0e9 FLOPs per token at ~600 TFLOP/s (~60% of 989 dense bf16).
- e = 1.2e-9 s per (query, key) pair: 4 x 4096 x 32 layers FLOPs per pair at ~450 TFLOP/s (FlashAttention).
- c = 5.0e-8 s per decode context token: 128 KiB of KV per token (2 x 32 layers x 8 KV heads x 128 x 2 B)
  at ~2.6 TB/s.
- capacity 25,000 blocks of 16 (~400k tokens): 80 GB x 0.9 - 16 GB weights - ~2 GB activations, at
  128 KiB per token.
So a 2048-token prefill step from scratch takes ~64 ms (~32k tokens/s) and a 32-request decode step at 2k
context ~10 ms.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks.report import summarize
from benchmarks.workloads import Request
from preble_router.load import EngineReport, InFlight
from preble_router.peer_sync import PeerEvent, PeerEventKind
from preble_router.policies import POLICIES, Policy, make_policy
from preble_router.router import LOAD_POLL_INTERVAL_S, BlockSource, PreparedRequest, Router
from preble_router.settings import setting
from vllm_patches.group_queue import PrebleRequestQueue


@dataclass(frozen=True)
class TimeProfile:
    """Per-step time model: t = a + b*prefill_tokens + e*prefill_pairs + c*decode_context + d*decode_batch."""

    name: str = "llama3-8b-h100"
    a: float = 6.0e-3
    b: float = 2.7e-5
    e: float = 1.2e-9
    c: float = 5.0e-8
    d: float = 2.7e-5
    capacity_blocks: int = 25_000  # at block_size 16
    overhead: float = 0.0  # seconds from dispatch to the engine's queue (not engine time)
    contention: float = 0.0  # slowdown per unit share of the other engines busy (replicas sharing CPU cores)

    def step_time(self, prefill_tokens: int, prefill_pairs: float, decode_context: int, decode_batch: int) -> float:
        return (self.a + self.b * prefill_tokens + self.e * prefill_pairs + self.c * decode_context
                + self.d * decode_batch)


PROFILES: dict[str, TimeProfile] = {
    "llama3-8b-h100": TimeProfile(),
    # Llama-3-70B on 2xH100 (TP=2): the spec's prefill fit (18.7 ms + 0.0799 ms/token + 7.4e-7 ms/pair,
    # its 0.00269 ms/context-token term folded into c); decode terms and capacity are our estimates
    # (140 GB weights; ~20 GB left for KV at 320 KiB/token -> ~60k tokens).
    "llama3-70b-2xh100": TimeProfile(name="llama3-70b-2xh100", a=18.7e-3, b=7.99e-5, e=7.4e-10, c=2.7e-7,
                                     d=7.99e-5, capacity_blocks=4_000),
}


def parse_profile(spec: str | None) -> TimeProfile:
    """'llama3-8b-h100' or 'llama3-8b-h100:a=0.005,b=3e-5' (overrides) or just 'a=...,b=...'."""
    if not spec:
        return PROFILES["llama3-8b-h100"]
    name, _, overrides = spec.partition(":") if ":" in spec or spec in PROFILES else ("llama3-8b-h100", "", spec)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    prof = PROFILES[name]
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in overrides.split(","))):
        k, _, v = part.partition("=")
        if k not in ("a", "b", "c", "d", "e", "capacity_blocks", "overhead", "contention"):
            raise ValueError(f"unknown profile field {k!r}")
        kw[k] = int(v) if k == "capacity_blocks" else float(v)
    return replace(prof, **kw) if kw else prof


@dataclass
class SimConfig:
    """The simulated cluster; `preble-bench sim` takes each flagged field as an option (and --profile by name)."""

    gpus: int = setting(4, "Number of simulated GPUs (engines).", flag="--gpus", aliases=("-g",))
    block_size: int = setting(16, "KV block size in tokens.", flag="--block-size")
    capacity_blocks: int | None = setting(
        None, "KV-cache blocks per GPU (default: the profile's, 25000 x 16 tokens for llama3-8b-h100).",
        flag="--capacity-blocks")
    max_batched_tokens: int = setting(2048, "Token budget per step (chunked prefill).", flag="--max-batched-tokens")
    max_num_seqs: int = setting(256, "Max requests running per engine.", flag="--max-num-seqs")
    local_scheduler: str = setting("fcfs", "Engine-side admission: vLLM's FCFS, or Preble's cache-hit priority "
                                   "groups.", flag="--local-scheduler", choices=["fcfs", "preble"])
    profile: TimeProfile = field(default_factory=TimeProfile)
    model: str = setting("sim-model", "Model name (namespaces the router's block keys).", flag="--model")
    predicted_ttl: float = setting(3.0, "Router's predicted-block TTL (s).", flag="--predicted-ttl")
    routers: int = setting(1, "Routers in front of the fleet (requests spread round robin over them), each with its "
                           "own policy and load view, all following the engines' KV events.", flag="--routers")
    peer_sync: bool = setting(False, "Several routers tell each other what they dispatch (preble-router's "
                              "--peer-sync, automatic between --workers), each event reaching the others "
                              "peer_delay later.", flag="--peer-sync")
    # 0: at once. A router publishes a dispatch before it writes the request to the engine, and an engine's first
    # KV event for it comes after a step (milliseconds), so live its peers know of it first; the simulated engine
    # may start a request at the very instant it is dispatched (profile overhead 0), so any delay here would let
    # its KV events overtake the peer event, which does not happen live.
    peer_delay: float = setting(0.0, "Seconds a router's event takes to reach its peers (--peer-sync).",
                                flag="--peer-delay")
    load_poll_interval: float = setting(
        LOAD_POLL_INTERVAL_S, "Seconds between the engines' load reports to every router (as preble-router's "
        "--load-poll-interval: the Preble plugin's figures with --local-scheduler preble, else vLLM's gauges), "
        "merged by the router's own rule (preble_router/load.py); 0: off.", flag="--load-poll-interval")

    def capacity(self) -> int:
        if self.capacity_blocks is not None:
            return self.capacity_blocks
        return max(1, self.profile.capacity_blocks * 16 // self.block_size)


_WAITING, _PREFILL, _DECODE, _DONE = 0, 1, 2, 3


class _SimReq:
    __slots__ = ("req", "idx", "prepared", "inflight", "decision", "keys", "tokens", "prompt", "output",
                 "sent", "admitted", "first", "end", "cached", "computed", "held", "nblocks", "engine",
                 "error", "join_step", "join_gen", "target", "gen", "state", "run_seq", "preemptions", "router")

    def __init__(self, req: Request, idx: int) -> None:
        self.req = req
        self.idx = idx
        self.prepared: PreparedRequest | None = None
        self.inflight: InFlight | None = None
        self.decision = None
        self.keys: list[int] = []
        self.tokens: list[int] = []
        self.prompt = 0
        self.output = max(1, req.output_tokens)
        self.sent = 0.0
        self.admitted: float | None = None
        self.first: float | None = None
        self.end: float | None = None
        self.cached = -1  # prompt tokens hit at the first admission (vLLM's cached_tokens); -1 before
        self.computed = 0  # tokens whose KV is computed (or being computed by the running step)
        self.held: list[int] = []  # cached block keys at the head of its block table (a prefix of keys)
        self.nblocks = 0  # blocks in its block table: the held cached ones, then uncached ("anonymous") ones
        self.engine = -1
        self.error: str | None = None
        self.join_step = 0  # the engine step index at which it started decoding
        self.join_gen = 0  # output tokens it had generated then
        self.target = 0  # tokens to prefill: the prompt, plus what it had generated if preempted
        self.gen = 0  # output tokens generated before its current prefill
        self.state = _WAITING
        self.run_seq = -1  # admission order on its engine (renewed at each re-admission)
        self.preemptions = 0
        self.router: Router | None = None  # the router that sent it

    # What a waiting queue reads of a vLLM request.
    @property
    def request_id(self) -> str:
        return self.req.id

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt

    @property
    def num_computed_tokens(self) -> int:
        return self.computed


class _FcfsQueue(deque):
    """vLLM's FCFSRequestQueue (a deque), with the waiting-queue interface PrebleRequestQueue implements."""

    add_request = deque.append
    pop_request = deque.popleft
    prepend_request = deque.appendleft

    def peek_request(self) -> _SimReq:
        return self[0]

    def begin_step(self, now: float) -> None:
        """Nothing to re-read: FCFS order does not depend on the cache."""

    def take_popped(self) -> dict:
        return {}


class SimEngine:
    """One vLLM-like engine: scheduler, block prefix cache, step timing, KV events to the router.

    Blocks follow vLLM v1's KVCacheManager / BlockPool (0.24+): a free queue of physical blocks, first
    ``free`` (a count: never-used blocks and freed blocks without a hash, i.e. partial last blocks), then
    ``lru``: the freed full blocks, oldest first, cached prompt blocks by key (still prefix-cache hits until
    handed out) and full output blocks by a negative id (cached by vLLM, but nothing could hit them here).
    Handing out a cached block evicts it (BlockRemoved). Each scheduled chunk or decode token gets
    blocks for the tokens it computes; full prompt blocks are cached (BlockStored) when allocated, as vLLM's
    allocate_slots does."""

    def __init__(self, sim: Simulator, index: int, backend_id: int) -> None:
        cfg = sim.config
        self.sim = sim
        self.index = index
        self.backend_id = backend_id
        self.bs = cfg.block_size
        self.capacity = cfg.capacity()
        self.free = self.capacity  # never-used blocks: the head of the free queue
        self.cache: dict[int, int] = {}  # key -> refcount (every cached block, referenced or not)
        self.lru: OrderedDict[int, None] = OrderedDict()  # the rest of the free queue (ref count 0), oldest first
        self._anon = 0  # last id given to a freed uncached block (negative; router keys are unsigned)
        self.waiting: _FcfsQueue | PrebleRequestQueue = (
            PrebleRequestQueue(lambda s: self._leading_hits(s) * self.bs, clock=lambda: sim.now)
            if cfg.local_scheduler == "preble" else _FcfsQueue())
        self.running: dict[int, _SimReq] = {}  # run_seq -> request, in admission order
        self._run_seq = 0
        self.prefilling: list[_SimReq] = []  # running requests still prefilling, in admission order
        self.decode_heap: list[tuple[int, int, _SimReq]] = []  # (step it finishes at, run_seq, request)
        self.block_heap: list[tuple[int, int, _SimReq]] = []  # (step it needs its next block at, run_seq, req)
        self.n_dec = 0
        self.dec_base = 0  # sum over decoding requests of (prompt + join_gen - join_step)
        self.step_idx = 0
        self.busy = False
        self.busy_time = 0.0
        self.steps = 0
        self.batch: list[tuple[_SimReq, int]] = []
        self.step_start = 0.0
        self.stored_blocks = 0
        self.evicted_blocks = 0
        self.preemptions = 0

    # ---- queueing ---------------------------------------------------------------------------------
    def enqueue(self, s: _SimReq) -> None:
        s.target = s.prompt
        self.waiting.add_request(s)

    def _requeue_front(self, s: _SimReq) -> None:
        """A preempted request goes back to the front of the waiting queue (vLLM's prepend_request)."""
        self.waiting.prepend_request(s)

    def _leading_hits(self, s: _SimReq) -> int:
        """Full blocks of s's prompt (never its last token) this engine's prefix cache holds: what vLLM's lookup
        finds, and what the preble queue groups by."""
        cap = (s.target - 1) // self.bs if s.target > 0 else 0
        cache = self.cache
        n = 0
        for k in s.keys[:cap]:
            if k not in cache:
                break
            n += 1
        return n

    # ---- blocks -----------------------------------------------------------------------------------
    def _cost(self, keys: list[int], h: int, nb: int, upto: int) -> int:
        """Free-queue blocks that growing a block table (h cached blocks, nb blocks in all) to cover `upto`
        tokens takes: a new block, or a cached one with ref count 0 it reuses (it leaves the queue)."""
        cache = self.cache
        f = min(upto // self.bs, len(keys))
        cost = 0
        for i in range(h, f):
            rc = cache.get(keys[i])
            if rc == 0 or (rc is None and i >= nb):
                cost += 1
        return cost + max(0, -(-upto // self.bs) - max(nb, f))

    def _take(self, n: int) -> None:
        """Hand out n blocks from the head of the free queue; cached ones are evicted (BlockRemoved)."""
        take = min(n, self.free)
        self.free -= take
        rest = n - take
        if rest <= 0:
            return
        removed = []
        lru, cache = self.lru, self.cache
        for _ in range(rest):
            k, _ = lru.popitem(last=False)
            if k >= 0:
                del cache[k]
                removed.append(k)
        if removed:
            self.evicted_blocks += len(removed)
            for router in self.sim.routers:
                router.index.apply_removed(self.backend_id, removed)

    def _grow(self, s: _SimReq, upto: int) -> None:
        """Give s blocks for its first `upto` tokens (the caller checked _cost against the free queue) and
        cache its full prompt blocks among them, reporting the new ones as BlockStored. A full block that is
        already cached (another request computed it meanwhile) is shared, as a prefix hit would be."""
        bs = self.bs
        keys = s.keys
        cache, lru = self.cache, self.lru
        h, nb = len(s.held), s.nblocks
        total = -(-upto // bs)
        f = min(upto // bs, len(keys))
        new: list[int] = []
        need = max(0, total - max(nb, f))
        released = 0
        for i in range(h, f):
            k = keys[i]
            rc = cache.get(k)
            if rc is None:
                new.append(i)
                if i >= nb:
                    need += 1
            else:
                if rc == 0:
                    del lru[k]
                cache[k] = rc + 1
                if i < nb:
                    released += 1  # our uncached copy of it is not needed any more
        self._take(need)
        if new:
            for i in new:
                cache[keys[i]] = 1
            run_start = prev = new[0]
            for i in new[1:]:
                if i != prev + 1:  # one BlockStored per run of consecutive blocks (their parent is known)
                    self._emit_stored(s, run_start, prev + 1)
                    run_start = i
                prev = i
            self._emit_stored(s, run_start, prev + 1)
        self.free += released  # not cached: to the head of the free queue
        if f > h:
            s.held = keys[:f]
        if total > nb:
            s.nblocks = total

    def _emit_stored(self, s: _SimReq, i0: int, i1: int) -> None:
        bs = self.bs
        self.stored_blocks += i1 - i0
        for router in self.sim.routers:
            router.index.apply_stored(self.backend_id, s.keys[i0:i1], s.keys[i0 - 1] if i0 else None,
                                      s.tokens[i0 * bs: i1 * bs], bs, None, None)

    def _admit(self, s: _SimReq, budget: int) -> int:
        """Touch the waiting request's prefix-cache hits and allocate its first chunk (at most `budget`
        tokens); returns the chunk's size, or 0 (and changes nothing) if the blocks are not there."""
        bs = self.bs
        keys = s.keys
        cap = min((s.target - 1) // bs if s.target > 0 else 0, len(keys))
        cache = self.cache
        hits = 0
        in_queue = 0
        for k in keys[:cap]:
            rc = cache.get(k)
            if rc is None:
                break
            hits += 1
            if rc == 0:
                in_queue += 1
        n = min(s.target - hits * bs, budget)
        if in_queue + self._cost(keys, hits, hits, hits * bs + n) > self.free + len(self.lru):
            return 0
        lru = self.lru
        for k in keys[:hits]:
            rc = cache[k]
            if rc == 0:
                del lru[k]
            cache[k] = rc + 1
        s.held = keys[:hits]
        s.nblocks = hits
        s.computed = hits * bs
        if s.cached < 0:
            s.cached = hits * bs
        self._grow(s, s.computed + n)
        return n

    def _release(self, s: _SimReq, kv_tokens: int) -> None:
        """Free s's blocks, whose first kv_tokens tokens are computed, as vLLM (>= 0.24) does: a partial last
        block (no hash) to the head of the free queue, the rest tail first (vLLM frees a block table in
        reverse) to its end: full blocks past the cached prompt ones (vLLM caches output blocks too; here
        they stand in as uncached blocks that can never hit), then the cached ones from the last to the first."""
        lru, cache = self.lru, self.cache
        h = len(s.held)
        full = min(max(0, kv_tokens // self.bs - h), s.nblocks - h)
        self.free += s.nblocks - h - full
        for _ in range(full):
            self._anon -= 1
            lru[self._anon] = None
        for k in reversed(s.held):
            rc = cache[k] - 1
            cache[k] = rc
            if rc == 0:
                lru[k] = None
        s.held = []
        s.nblocks = 0

    def _preempt_until(self, s: _SimReq, fits: Callable[[], bool]) -> bool:
        """Preempt the newest running requests until fits() or s itself was preempted; True if any was."""
        preempted = False
        while not fits():
            preempted = True
            if self._preempt_newest() is s:
                break
        return preempted

    def _preempt_newest(self) -> _SimReq:
        """vLLM's RECOMPUTE preemption (FCFS): the most recently admitted running request frees its blocks
        and goes back to the front of the waiting queue, to prefill its prompt and what it generated again."""
        run_seq, s = self.running.popitem()
        if s.state == _PREFILL:
            self.prefilling.remove(s)
            kv = s.computed
        else:  # decoding: generated join_gen + the decode steps it has run since (the last one has no KV yet)
            self.n_dec -= 1
            self.dec_base -= s.prompt + s.join_gen - s.join_step
            s.gen = s.join_gen + self.step_idx - s.join_step
            kv = s.prompt + s.gen - 1
        s.target = s.prompt + s.gen
        self._release(s, kv)
        s.computed = 0
        s.state = _WAITING
        s.preemptions += 1
        self.preemptions += 1
        self._requeue_front(s)
        return s

    def check_invariants(self) -> None:
        """Block accounting (for tests): every physical block is free, held or cached, once; ref counts match
        the running requests' block tables; nothing waiting holds a block."""
        running = list(self.running.values())
        assert self.free >= 0, self.free
        anon_free = sum(1 for k in self.lru if k < 0)
        anon_held = 0
        refs: dict[int, int] = {}
        for s in running:
            assert s.state in (_PREFILL, _DECODE), s.state
            h = len(s.held)
            assert s.held == s.keys[:h] and h <= s.nblocks, (h, s.nblocks)
            assert s.nblocks * self.bs >= s.computed, (s.nblocks, s.computed)
            anon_held += s.nblocks - h
            for k in s.held:
                refs[k] = refs.get(k, 0) + 1
        assert self.free + anon_free + anon_held + len(self.cache) == self.capacity, (
            self.free, anon_free, anon_held, len(self.cache))
        for k, rc in self.cache.items():
            assert rc == refs.get(k, 0), (k, rc, refs.get(k, 0))
            assert (rc == 0) == (k in self.lru), k
        assert len(self.lru) - anon_free == sum(1 for rc in self.cache.values() if rc == 0)
        assert [s for s in running if s.state == _PREFILL] == self.prefilling
        assert sum(1 for s in running if s.state == _DECODE) == self.n_dec
        for s in self.waiting:
            assert s.state == _WAITING and s.nblocks == 0 and not s.held

    # ---- steps ------------------------------------------------------------------------------------
    def maybe_start(self, now: float) -> None:
        if not self.busy:
            self._start_step(now)

    def _start_step(self, now: float) -> None:
        """vLLM's schedule(): running requests first, in admission order (decodes get one token, prefills a
        chunk within the token budget), each given the blocks its tokens need, preempting the newest running
        request while they are not there; then, if nothing was preempted, waiting requests in the waiting queue's
        order (peek, allocate, pop) while their first chunk's blocks can be allocated (head-of-line blocking)."""
        cfg = self.sim.config
        waiting = self.waiting
        waiting.begin_step(now)  # as the Preble scheduler does before vLLM's schedule()
        bs = self.bs
        step = self.step_idx
        budget = cfg.max_batched_tokens - self.n_dec
        batch: list[tuple[_SimReq, int]] = []
        prefill_tokens = 0
        pairs = 0.0
        preempted = False
        # decoding requests whose next token starts a new block, and running prefills, in admission order
        work: list[tuple[int, _SimReq]] = []
        heap = self.block_heap
        while heap and heap[0][0] <= step:
            _, seq, s = heapq.heappop(heap)
            if s.state == _DECODE and s.run_seq == seq:
                work.append((seq, s))
        if work:
            work.extend((s.run_seq, s) for s in self.prefilling)
            work.sort(key=lambda w: w[0])
        else:
            work = [(s.run_seq, s) for s in self.prefilling]
        for seq, s in work:
            if s.run_seq != seq or s.state == _WAITING:
                continue  # preempted earlier in this pass
            if s.state == _DECODE:
                preempted |= self._preempt_until(s, lambda: bool(self.free or self.lru))
                if s.state != _DECODE:
                    continue
                self._take(1)
                s.nblocks += 1
                nxt = s.nblocks * bs - s.prompt - s.join_gen + s.join_step + 1
                if nxt < s.join_step + s.output - s.join_gen:  # before its last decode step
                    heapq.heappush(heap, (nxt, seq, s))
                continue
            if budget <= 0:
                continue
            n = min(s.target - s.computed, budget)
            upto = s.computed + n
            preempted |= self._preempt_until(
                s, lambda: self._cost(s.keys, len(s.held), s.nblocks, upto) <= self.free + len(self.lru))
            if s.state != _PREFILL:
                continue
            self._grow(s, upto)
            batch.append((s, n))
            budget -= n
            prefill_tokens += n
            pairs += n * (s.computed + (n + 1) / 2)
        seqs = len(self.running)
        if not preempted:
            while budget > 0 and waiting and seqs < cfg.max_num_seqs:
                s = waiting.peek_request()
                n = self._admit(s, budget)
                if not n:
                    break  # head-of-line: wait for memory
                popped = waiting.pop_request()
                assert popped is s
                if s.admitted is None:
                    s.admitted = now
                seqs += 1
                batch.append((s, n))
                budget -= n
                prefill_tokens += n
                pairs += n * (s.computed + (n + 1) / 2)
                self._run_seq += 1
                s.run_seq = self._run_seq
                s.state = _PREFILL
                self.running[s.run_seq] = s
                self.prefilling.append(s)
            waiting.take_popped()  # the plugin's admission accounting: not reported here
        if not batch and self.n_dec == 0:
            self.busy = False
            return
        dec_ctx = self.dec_base + self.n_dec * step
        dt = self.sim.profile.step_time(prefill_tokens, pairs, dec_ctx, self.n_dec)
        if self.sim.profile.contention:
            dt *= self.sim.slowdown(self)
        self.batch = batch
        self.busy = True
        self.step_start = now
        self.sim.schedule_step_end(now + dt, self)

    def step_end(self, now: float) -> None:
        self.busy_time += now - self.step_start
        self.steps += 1
        self.step_idx += 1
        step = self.step_idx
        sim = self.sim
        bs = self.bs
        done_prefill = False
        for s, n in self.batch:
            s.computed += n
            if s.computed < s.target:
                continue
            done_prefill = True
            produced = s.gen + 1  # the prefill's last position samples the next output token
            if s.first is None:
                s.first = now
                s.router.first_token(s.inflight)
            if produced >= s.output:
                del self.running[s.run_seq]
                self._finish(s, now, s.computed)
                continue
            s.state = _DECODE
            s.join_step = step
            s.join_gen = produced
            heapq.heappush(self.decode_heap, (step + s.output - produced, s.run_seq, s))
            nxt = s.nblocks * bs - s.prompt - produced + step + 1  # the decode step whose token needs a block
            if nxt < step + s.output - produced:
                heapq.heappush(self.block_heap, (nxt, s.run_seq, s))
            self.n_dec += 1
            self.dec_base += s.prompt + produced - step
        if done_prefill:
            self.prefilling = [s for s in self.prefilling if s.state == _PREFILL]
        self.batch = []
        heap = self.decode_heap
        while heap and heap[0][0] <= step:
            _, seq, s = heapq.heappop(heap)
            if s.state != _DECODE or s.run_seq != seq:
                continue  # preempted since
            self.n_dec -= 1
            self.dec_base -= s.prompt + s.join_gen - s.join_step
            del self.running[seq]
            self._finish(s, now, s.prompt + s.output - 1)
        self._start_step(now)

    def load_report(self) -> EngineReport:
        """What the engine reports of its queues: the Preble plugin's figures (GET /preble/load) when it runs the
        plugin's scheduler, else vLLM's gauges (running and waiting requests only)."""
        running, waiting = len(self.running), len(self.waiting)
        usage = 1.0 - (self.free + len(self.lru)) / self.capacity
        if self.sim.config.local_scheduler != "preble":
            return EngineReport(running, waiting, kv_usage=usage, source="metrics")
        pending = self.waiting.snapshot()["pending_prefill_tokens"] + sum(s.target - s.computed
                                                                          for s in self.prefilling)
        return EngineReport(running, waiting, pending, self.n_dec, usage, source="preble")

    def _finish(self, s: _SimReq, now: float, kv_tokens: int) -> None:
        self._release(s, kv_tokens)
        s.state = _DONE
        s.end = now
        self.sim.complete(s, now)


class _SimPeerBus:
    """The simulator's peer sync (preble_router/peer_sync.py without the sockets): a router's events reach every
    other router config.peer_delay later, as events of the simulation."""

    def __init__(self, sim: Simulator, router: Router, router_id: str) -> None:
        self.sim, self.router, self.router_id = sim, router, router_id
        self._seq = 0

    def publish(self, kind: PeerEventKind, **fields: object) -> None:
        self._seq += 1
        sim = self.sim
        event = PeerEvent(kind, self.router_id, self._seq, **fields)
        if sim.config.peer_delay <= 0:
            sim.deliver_peer_event(self.router, event)
            return
        sim._seq += 1
        heapq.heappush(sim._events, (sim.now + sim.config.peer_delay, 4, sim._seq, (self.router, event)))


class Simulator:
    """Runs one policy over one request list. Use `simulate()` unless you need the objects."""

    def __init__(self, requests: Sequence[Request], policy: str | Policy | Callable[[], Policy],
                 config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.profile = self.config.profile
        self.requests = list(requests)
        self.now = 0.0
        if self.config.routers > 1 and not isinstance(policy, str) and hasattr(policy, "choose"):
            raise ValueError("several routers need a policy name or factory (each router has its own policy)")

        def new_policy() -> Policy:
            if isinstance(policy, str):
                return make_policy(policy)
            if callable(policy) and not hasattr(policy, "choose"):
                return policy()
            return policy  # type: ignore[return-value]

        # Every router is the real Router with its own policy; the engines report their KV events to all of them
        # and their load every load_poll_interval (through the router's merge rule, load.py).
        self.routers = [Router(model=self.config.model, tokenizer=None,  # type: ignore[arg-type]
                               policy=new_policy(), predicted_ttl=self.config.predicted_ttl, clock=lambda: self.now)
                        for _ in range(max(1, self.config.routers))]
        self.router = self.routers[0]
        self.policy = self.router.policy
        if self.config.peer_sync and len(self.routers) > 1:
            for i, r in enumerate(self.routers):
                r.attach_peers(_SimPeerBus(self, r, f"sim-router-{i}"))
        self.engines: list[SimEngine] = []
        self.by_backend: dict[int, SimEngine] = {}
        for i in range(self.config.gpus):
            ids = {r.add_backend(f"sim://gpu{i}", blocks=BlockSource.EXTERNAL, block_size=self.config.block_size,
                                 capacity_blocks=self.config.capacity(), healthy=True).backend_id
                   for r in self.routers}
            assert len(ids) == 1, ids  # the routers number the engines alike
            eng = SimEngine(self, i, ids.pop())
            self.engines.append(eng)
            self.by_backend[eng.backend_id] = eng
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.sreqs = [_SimReq(r, i) for i, r in enumerate(self.requests)]
        self._by_id = {r.id: i for i, r in enumerate(self.requests)}
        self._done: set[str] = set()
        self._blocked: dict[str, list[_SimReq]] = {}
        self.completed = 0
        self.decisions: dict[str, int] = {}

    # ---- events -----------------------------------------------------------------------------------
    def schedule_step_end(self, t: float, engine: SimEngine) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, 0, self._seq, engine))  # kind 0: step ends before arrivals

    def run(self, progress: bool = False) -> SimResult:
        wall = time.perf_counter()
        ev = self._events
        for s in self.sreqs:
            self._seq += 1
            ev.append((s.req.arrival, 1, self._seq, s))
        if self.config.load_poll_interval > 0:
            self._seq += 1
            ev.append((self.config.load_poll_interval, 3, self._seq, None))
        heapq.heapify(ev)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.sreqs), desc=f"sim {self.policy.name}", unit="req", mininterval=0.5)
        last_done = 0
        while ev:
            t, kind, _, obj = heapq.heappop(ev)
            self.now = t
            if kind == 0:
                obj.step_end(t)
            elif kind == 1:
                self._arrive(obj, t)
            elif kind == 3:
                self._report_loads(t)
            elif kind == 4:  # a router's peer event reaches the other routers
                self.deliver_peer_event(*obj)
            else:  # kind 2: a dispatched request reaches its engine after the per-request overhead
                eng = self.engines[obj.engine]
                eng.enqueue(obj)
                eng.maybe_start(t)
            if bar is not None and self.completed - last_done >= 200:
                bar.update(self.completed - last_done)
                last_done = self.completed
        if bar is not None:
            bar.update(self.completed - last_done)
            bar.close()
        stuck = [s for s in self.sreqs if s.end is None]
        for s in stuck:  # cannot happen unless a dependency is missing from the set: never lose a request
            s.error = s.error or "never completed (dependency never finished)"
        return self._result(time.perf_counter() - wall)

    def deliver_peer_event(self, sender: Router, event: PeerEvent) -> None:
        for router in self.routers:
            if router is not sender:
                router.apply_peer(event)

    def _report_loads(self, now: float) -> None:
        """Every engine reports its load to every router (a poll answered at once), then the next poll is due."""
        for eng in self.engines:
            report = eng.load_report()
            for router in self.routers:
                router.load.apply_report(eng.backend_id, report, router.load.mark(eng.backend_id), now)
        if self._events:  # anything left to happen
            self._seq += 1
            heapq.heappush(self._events, (now + self.config.load_poll_interval, 3, self._seq, None))

    def _arrive(self, s: _SimReq, now: float) -> None:
        dep = s.req.depends_on
        if dep is not None and dep in self._by_id and dep not in self._done:
            self._blocked.setdefault(dep, []).append(s)
            return
        self._send(s, now)

    def _send(self, s: _SimReq, now: float) -> None:
        r = s.req
        s.sent = now
        s.tokens = r.tokens
        s.prompt = len(s.tokens)
        router = s.router = self.routers[s.idx % len(self.routers)]
        prepared = router.prepare_tokens(s.tokens, max_tokens=r.output_tokens, request_id=r.id)
        decision = router.decide(prepared)
        assert decision is not None
        s.prepared = prepared
        s.decision = decision
        s.inflight = router.dispatch(prepared, decision)
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        eng = self.by_backend[decision.backend_id]
        s.engine = eng.index
        s.keys = prepared.keys_by_block_size[self.config.block_size]
        if s.prompt == 0 or -(-(s.prompt + s.output) // eng.bs) > eng.capacity:
            s.error = "prompt does not fit in the KV cache" if s.prompt else "empty prompt"
            s.end = now
            router.finish(prepared, s.inflight, ok=False, output_tokens=None)
            self._mark_done(s, now)
            return
        if self.profile.overhead > 0:
            delay = self.profile.overhead * (self.slowdown(eng) if self.profile.contention else 1.0)
            self._seq += 1
            heapq.heappush(self._events, (now + delay, 2, self._seq, s))
            return
        eng.enqueue(s)
        eng.maybe_start(now)

    def slowdown(self, eng: SimEngine) -> float:
        """1 + contention x the share of the engines other than `eng` that are running a step now."""
        others = len(self.engines) - 1
        if others <= 0:
            return 1.0
        busy = sum(1 for e in self.engines if e is not eng and e.busy)
        return 1.0 + self.profile.contention * busy / others

    def complete(self, s: _SimReq, now: float) -> None:
        s.router.finish(s.prepared, s.inflight, ok=True, output_tokens=s.output)
        self._mark_done(s, now)

    def _mark_done(self, s: _SimReq, now: float) -> None:
        self.completed += 1
        s.tokens = []  # the prompt is no longer needed: keep memory flat
        s.prepared = None
        rid = s.req.id
        self._done.add(rid)
        for d in self._blocked.pop(rid, ()):
            self._send(d, now)

    # ---- results ------------------------------------------------------------------------------------
    def _result(self, wall_s: float) -> SimResult:
        records = []
        for s in self.sreqs:
            ok = s.error is None
            records.append({
                "id": s.req.id, "group": s.req.group, "gpu": s.engine, "start": s.sent, "arrival": s.req.arrival,
                "admitted": s.admitted, "first_token": s.first, "end": s.end if ok else None,
                "ttft": (s.first - s.sent) if ok and s.first is not None else None,
                "latency": (s.end - s.sent) if ok and s.end is not None else None,
                "prompt_tokens": s.prompt, "cached_tokens": s.cached if ok else None,
                "output_tokens": s.output if ok else 0,
                "decision": s.decision.reason if s.decision else None,
                "matched_tokens": s.decision.matched_tokens if s.decision else None,
                "preemptions": s.preemptions,
                "error": s.error,
            })
        busy = [e.busy_time for e in self.engines]
        summary = summarize(records)
        mean_busy = float(np.mean(busy)) if busy else 0.0
        summary.update({
            "policy": self.policy.name,
            "gpus": self.config.gpus,
            "routers": len(self.routers),
            "imbalance": (max(busy) / mean_busy) if mean_busy > 0 else None,
            "gpu_busy_s": busy,
            "gpu_requests": [sum(1 for s in self.sreqs if s.engine == e.index) for e in self.engines],
            "steps": sum(e.steps for e in self.engines),
            "evicted_blocks": sum(e.evicted_blocks for e in self.engines),
            "stored_blocks": sum(e.stored_blocks for e in self.engines),
            "preemptions": sum(e.preemptions for e in self.engines),
            "decisions": dict(self.decisions),
            "sim_time_s": self.now,
            "wall_s": wall_s,
        })
        return SimResult(self.policy.name, records, summary, asdict(self.config))


@dataclass
class SimResult:
    policy: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]


def simulate(requests: Sequence[Request], policy: str | Policy | Callable[[], Policy] = "round_robin",
             config: SimConfig | None = None, *, progress: bool = False) -> SimResult:
    """Simulate `requests` (with arrival times set) on config.gpus engines under `policy`."""
    return Simulator(requests, policy, config).run(progress=progress)


def available_policies() -> list[str]:
    return sorted(POLICIES)
