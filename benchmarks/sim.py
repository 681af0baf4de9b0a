"""A discrete-event simulator of G vLLM-like engines behind the real router.

The routing side is not modelled: the simulator drives the exact objects the proxy drives,
``preble_router.router.Router`` with a policy from ``preble_router.policies`` (any name in POLICIES), on a
simulated clock. Per request: ``prepare_tokens`` -> ``decide`` -> ``dispatch``; ``first_token`` at the
simulated first token; ``finish`` at completion. Each engine reports its prefix-cache changes to
``router.index`` the way vLLM's KV events do (``apply_stored`` / ``apply_removed``), so the router's view
of the caches is exactly what a live router with KV events would have (without event latency).

Each engine is vLLM-v1-like:
- continuous batching with chunked prefill: every step, decodes first (one token each), then running
  prefills, then waiting requests, within ``max_batched_tokens`` (2048) and ``max_num_seqs`` (256);
- a block prefix cache: ``block_size`` (16) tokens per block, ``capacity_blocks`` blocks in all; a
  request hits only full leading blocks already cached, never its last prompt token (vLLM recomputes it);
  computed full prompt blocks are cached (and reported as BlockStored); a request's blocks are freed in
  reverse order when it finishes and join an LRU of unreferenced blocks, evicted (BlockRemoved) only when
  an allocation needs room, never-used blocks first;
- admission reserves blocks for the whole prompt and output (so no preemption is modelled) and is FCFS
  with head-of-line blocking, as vLLM's; ``local_scheduler="preble"`` instead serves Preble's 10
  cache-hit-ratio priority groups in turn, group g admitting up to (g+1) x 10 per turn (the hit ratio is
  taken when the request reaches the engine). Output blocks are never cached (vLLM caches decoded full
  blocks too; our synthetic follow-up prompts could not match them anyway).

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
in a heap keyed by the step at which it finishes, and the batch's context sum is kept incrementally.

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
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks.report import summarize
from benchmarks.workloads import Request
from preble_router.load import InFlight
from preble_router.policies import POLICIES, Policy, make_policy
from preble_router.router import PreparedRequest, Router


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
    gpus: int = 4
    block_size: int = 16
    capacity_blocks: int | None = None  # None: the profile's (scaled to block_size)
    max_batched_tokens: int = 2048
    max_num_seqs: int = 256
    local_scheduler: str = "fcfs"  # or "preble"
    profile: TimeProfile = field(default_factory=TimeProfile)
    model: str = "sim-model"
    predicted_ttl: float = 3.0

    def capacity(self) -> int:
        if self.capacity_blocks is not None:
            return self.capacity_blocks
        return max(1, self.profile.capacity_blocks * 16 // self.block_size)


class _SimReq:
    __slots__ = ("req", "idx", "prepared", "inflight", "decision", "keys", "tokens", "prompt", "output",
                 "sent", "admitted", "first", "end", "cached", "computed", "held", "reserved", "engine",
                 "error", "join_step", "group_hint")

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
        self.cached = 0
        self.computed = 0
        self.held: list[int] = []  # cached block keys this request references (a prefix of keys)
        self.reserved = 0  # physical blocks reserved and not (yet) turned into cached prompt blocks
        self.engine = -1
        self.error: str | None = None
        self.join_step = 0
        self.group_hint = 0


class SimEngine:
    """One vLLM-like engine: scheduler, block prefix cache, step timing, KV events to the router."""

    def __init__(self, sim: Simulator, index: int, backend_id: int) -> None:
        cfg = sim.config
        self.sim = sim
        self.index = index
        self.backend_id = backend_id
        self.bs = cfg.block_size
        self.capacity = cfg.capacity()
        self.free = self.capacity  # never-used (or uncached, freed) blocks
        self.cache: dict[int, int] = {}  # key -> refcount (every cached block, referenced or not)
        self.lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.waiting: deque[_SimReq] = deque()
        self.groups: list[deque[_SimReq]] = [deque() for _ in range(10)]  # preble local scheduler
        self.turn = 9
        self.n_waiting = 0
        self.prefilling: list[_SimReq] = []
        self.decode_heap: list[tuple[int, int, _SimReq]] = []
        self.n_dec = 0
        self.dec_base = 0  # sum over decoding requests of (prompt + 1 - join_step)
        self.step_idx = 0
        self.busy = False
        self.busy_time = 0.0
        self.steps = 0
        self.batch: list[tuple[_SimReq, int]] = []
        self.step_start = 0.0
        self.stored_blocks = 0
        self.evicted_blocks = 0
        self._heap_seq = 0
        self.preble_local = cfg.local_scheduler == "preble"

    # ---- queueing ---------------------------------------------------------------------------------
    def enqueue(self, s: _SimReq) -> None:
        if self.preble_local:
            hits = self._leading_hits(s)
            h = hits * self.bs / max(1, s.prompt)
            g = 0 if h <= 0 else min(9, max(0, math.ceil(10 * h) - 1))
            s.group_hint = g
            self.groups[g].append(s)
        else:
            self.waiting.append(s)
        self.n_waiting += 1

    def _leading_hits(self, s: _SimReq) -> int:
        cap = (s.prompt - 1) // self.bs if s.prompt > 0 else 0
        cache = self.cache
        n = 0
        for k in s.keys[:cap]:
            if k not in cache:
                break
            n += 1
        return n

    def _candidates(self):
        """Waiting requests in the order this engine's local scheduler would admit them."""
        if not self.preble_local:
            yield from self.waiting
            return
        for off in range(10):
            g = (self.turn - off) % 10
            q = self.groups[g]
            for s in list(q)[: (g + 1) * 10]:
                yield s

    def _pop_waiting(self, s: _SimReq) -> None:
        if self.preble_local:
            q = self.groups[s.group_hint]
            if q and q[0] is s:
                q.popleft()
            else:
                q.remove(s)
        else:
            self.waiting.popleft()
        self.n_waiting -= 1

    # ---- blocks -----------------------------------------------------------------------------------
    def _admit(self, s: _SimReq) -> bool:
        """Touch the request's cache hits and reserve the rest of its blocks; False if it does not fit now."""
        bs = self.bs
        cap = (s.prompt - 1) // bs if s.prompt > 0 else 0
        cache, lru = self.cache, self.lru
        hits = 0
        hits_in_lru = 0
        for k in s.keys[:cap]:
            rc = cache.get(k)
            if rc is None:
                break
            hits += 1
            if rc == 0:
                hits_in_lru += 1
        total = -(-(s.prompt + s.output) // bs)
        need = total - hits
        if need > self.free + len(lru) - hits_in_lru:
            return False
        for k in s.keys[:hits]:
            rc = cache[k]
            if rc == 0:
                del lru[k]
            cache[k] = rc + 1
        s.held = s.keys[:hits]
        s.cached = s.computed = hits * bs
        self._allocate(need)
        s.reserved = need
        return True

    def _allocate(self, n: int) -> None:
        take = min(n, self.free)
        self.free -= take
        rest = n - take
        if rest <= 0:
            return
        removed = []
        lru, cache = self.lru, self.cache
        for _ in range(rest):
            k, _ = lru.popitem(last=False)
            del cache[k]
            removed.append(k)
        self.evicted_blocks += len(removed)
        self.sim.router.index.apply_removed(self.backend_id, removed)

    def _register(self, s: _SimReq, upto_tokens: int) -> None:
        """Cache the request's newly computed full prompt blocks; report them as BlockStored."""
        bs = self.bs
        first = len(s.held)
        last = min(upto_tokens // bs, len(s.keys))
        if last <= first:
            return
        cache, lru = self.cache, self.lru
        keys = s.keys
        run_start = -1
        for i in range(first, last):
            k = keys[i]
            rc = cache.get(k)
            s.reserved -= 1
            if rc is None:  # a new block: this request's physical block becomes a cached one
                cache[k] = 1
                if run_start < 0:
                    run_start = i
            else:  # computed meanwhile by another request: share that block, free ours
                if rc == 0:
                    del lru[k]
                cache[k] = rc + 1
                self.free += 1
                if run_start >= 0:
                    self._emit_stored(s, run_start, i)
                    run_start = -1
        if run_start >= 0:
            self._emit_stored(s, run_start, last)
        s.held = keys[:last]

    def _emit_stored(self, s: _SimReq, i0: int, i1: int) -> None:
        bs = self.bs
        self.stored_blocks += i1 - i0
        self.sim.router.index.apply_stored(self.backend_id, s.keys[i0:i1], s.keys[i0 - 1] if i0 else None,
                                           s.tokens[i0 * bs: i1 * bs], bs, None, None)

    def _release(self, s: _SimReq) -> None:
        self.free += s.reserved
        s.reserved = 0
        cache, lru = self.cache, self.lru
        for k in reversed(s.held):  # reverse order: the tail blocks are evicted first
            rc = cache[k] - 1
            cache[k] = rc
            if rc == 0:
                lru[k] = None
        s.held = []

    def check_invariants(self) -> None:
        """Block accounting (for tests): every physical block is free, reserved or cached, once."""
        running = [s for s in self.prefilling] + [s for _, _, s in self.decode_heap]
        reserved = sum(s.reserved for s in running)
        assert self.free >= 0, self.free
        assert self.free + reserved + len(self.cache) == self.capacity, (self.free, reserved, len(self.cache))
        refs: dict[int, int] = {}
        for s in running:
            for k in s.held:
                refs[k] = refs.get(k, 0) + 1
        for k, rc in self.cache.items():
            assert rc == refs.get(k, 0), (k, rc, refs.get(k, 0))
            assert (rc == 0) == (k in self.lru), k
        assert len(self.lru) == sum(1 for rc in self.cache.values() if rc == 0)

    # ---- steps ------------------------------------------------------------------------------------
    def maybe_start(self, now: float) -> None:
        if not self.busy:
            self._start_step(now)

    def _start_step(self, now: float) -> None:
        cfg = self.sim.config
        budget = cfg.max_batched_tokens - self.n_dec
        batch: list[tuple[_SimReq, int]] = []
        prefill_tokens = 0
        pairs = 0.0
        for s in self.prefilling:
            if budget <= 0:
                break
            n = min(s.prompt - s.computed, budget)
            batch.append((s, n))
            budget -= n
            prefill_tokens += n
            pairs += n * (s.computed + (n + 1) / 2)
        seqs = self.n_dec + len(self.prefilling)
        if budget > 0 and self.n_waiting and seqs < cfg.max_num_seqs:
            admitted = []
            for s in self._candidates():
                if budget <= 0 or seqs >= cfg.max_num_seqs:
                    break
                if not self._admit(s):
                    break  # head-of-line: wait for memory
                admitted.append(s)
                s.admitted = now
                seqs += 1
                n = min(s.prompt - s.computed, budget)
                batch.append((s, n))
                budget -= n
                prefill_tokens += n
                pairs += n * (s.computed + (n + 1) / 2)
            for s in admitted:
                self._pop_waiting(s)
                self.prefilling.append(s)
            if self.preble_local:
                self.turn = (self.turn - 1) % 10
        if not batch and self.n_dec == 0:
            self.busy = False
            return
        dec_ctx = self.dec_base + self.n_dec * self.step_idx
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
        sim = self.sim
        done_prefill = False
        for s, n in self.batch:
            s.computed += n
            self._register(s, s.computed)
            if s.computed >= s.prompt:
                done_prefill = True
                s.first = now
                sim.router.first_token(s.inflight)
                if s.output <= 1:
                    self._finish(s, now)
                else:
                    s.join_step = self.step_idx
                    self._heap_seq += 1
                    heapq.heappush(self.decode_heap, (self.step_idx + s.output - 1, self._heap_seq, s))
                    self.n_dec += 1
                    self.dec_base += s.prompt + 1 - s.join_step
        if done_prefill:
            self.prefilling = [s for s in self.prefilling if s.computed < s.prompt]
        self.batch = []
        heap = self.decode_heap
        while heap and heap[0][0] <= self.step_idx:
            _, _, s = heapq.heappop(heap)
            self.n_dec -= 1
            self.dec_base -= s.prompt + 1 - s.join_step
            self._finish(s, now)
        self._start_step(now)

    def _finish(self, s: _SimReq, now: float) -> None:
        self._release(s)
        s.end = now
        self.sim.complete(s, now)


class Simulator:
    """Runs one policy over one request list. Use `simulate()` unless you need the objects."""

    def __init__(self, requests: Sequence[Request], policy: str | Policy | Callable[[], Policy],
                 config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.profile = self.config.profile
        self.requests = list(requests)
        self.now = 0.0
        if isinstance(policy, str):
            self.policy = make_policy(policy)
        elif callable(policy) and not hasattr(policy, "choose"):
            self.policy = policy()
        else:
            self.policy = policy  # type: ignore[assignment]
        self.router = Router(model=self.config.model, tokenizer=None,  # type: ignore[arg-type]
                             policy=self.policy, predicted_ttl=self.config.predicted_ttl, clock=lambda: self.now)
        self.engines: list[SimEngine] = []
        self.by_backend: dict[int, SimEngine] = {}
        for i in range(self.config.gpus):
            backend = self.router.add_backend(f"sim://gpu{i}", external_events=True)
            backend.healthy = True
            backend.block_size = self.config.block_size
            backend.capacity_blocks = self.config.capacity()
            self.router.index.set_capacity(backend.backend_id, backend.capacity_blocks)
            eng = SimEngine(self, i, backend.backend_id)
            self.engines.append(eng)
            self.by_backend[backend.backend_id] = eng
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
        router = self.router
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
        self.router.finish(s.prepared, s.inflight, ok=True, output_tokens=s.output)
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
                "error": s.error,
            })
        busy = [e.busy_time for e in self.engines]
        summary = summarize(records)
        mean_busy = float(np.mean(busy)) if busy else 0.0
        summary.update({
            "policy": self.policy.name,
            "gpus": self.config.gpus,
            "imbalance": (max(busy) / mean_busy) if mean_busy > 0 else None,
            "gpu_busy_s": busy,
            "gpu_requests": [sum(1 for s in self.sreqs if s.engine == e.index) for e in self.engines],
            "steps": sum(e.steps for e in self.engines),
            "evicted_blocks": sum(e.evicted_blocks for e in self.engines),
            "stored_blocks": sum(e.stored_blocks for e in self.engines),
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
