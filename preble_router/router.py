"""The routing core: request tokens -> block keys -> cache index + load view -> policy -> decision.

Owns the backends, the cache index and its event consumers, the load tracker and the policy. No HTTP
here: the proxy calls prepare / decide / dispatch / observe, and so can tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from urllib.parse import urlsplit

import httpx

from preble_router.backends import Backend, fetch_engine_load, fetch_kv_event_sources, probe_backend
from preble_router.block_hash import BlockKeyCache, chain_root
from preble_router.cache_index import CacheIndex
from preble_router.kv_events import KvEventSubscriber, advertised_feed
from preble_router.load import InFlight, LoadTracker
from preble_router.peer_sync import PEER_SILENCE_S, PeerEvent, PeerEventKind
from preble_router.policies import BackendState, ClusterSnapshot, Decision, Policy, Reason, RouteRequest
from preble_router.served_models import ServedModels
from preble_router.upstream import UpstreamPool

if TYPE_CHECKING:  # transformers is heavy; the simulator routes token ids and never loads it
    from preble_router.tokens import PromptTokenizer

log = logging.getLogger(__name__)


# Defaults of the CLI's --predicted-ttl, --kv-events-silence and --load-poll-interval too (their help says what
# they do).
PREDICTED_TTL_S = 3.0
EVENTS_SILENCE_S = 5.0
# The load feed is off by default: a lone router counts its own requests exactly, and polling vLLM's /metrics
# takes the API server's CPU on every poll (on CPU replicas it slowed every request: BENCHMARKS.md). Routers that
# do not know each other (no peer sync) need it, to see each other's queues: FLEET_LOAD_POLL_S is what the README
# tells them to set.
LOAD_POLL_INTERVAL_S = 0.0
FLEET_LOAD_POLL_S = 0.25


def load_stale_after(poll_interval: float) -> float:
    """Seconds an engine's load report is merged after it came (a poll waits as long at most): four polls, 1 s
    at least; with the feed off, forever (nothing is polled)."""
    return max(1.0, 4 * poll_interval) if poll_interval > 0 else float("inf")


@dataclass(slots=True)
class PreparedRequest:
    request_id: str
    tokens: Sequence[int]  # array("I") from the tokenizer, or the ids a client sent
    lora: str | None
    cache_salt: str | None
    max_tokens: int | None
    keys_by_block_size: dict[int, list[int]] = field(default_factory=dict)
    model: str | None = None  # as the client named it: only backends listing it are eligible (served_models)
    snapshot: ClusterSnapshot | None = None  # what the latest decision saw
    matched_blocks: dict[int, int] = field(default_factory=dict)  # per backend, leading blocks the index holds
    route: RouteRequest | None = None  # the policy's view, built once (keys do not change after prepare)


class Endpoint(enum.StrEnum):
    """The prefix-routed endpoints: Router.prepare renders each as vLLM does (equal to their metric label)."""

    COMPLETIONS = "completions"  # POST /v1/completions
    CHAT = "chat"  # POST /v1/chat/completions
    MESSAGES = "messages"  # POST /v1/messages (Anthropic), rendered through the chat template
    RESPONSES = "responses"  # POST /v1/responses (OpenAI), rendered through the chat template


class BlockSource(enum.Enum):
    """Where the router learns which KV blocks a backend holds (Router.add_backend)."""

    # The engine's KV events: its kv_endpoint, or (none given) the one it advertises at GET /kv_event_sources.
    # Routed on the estimate until they flow, and again whenever they go silent.
    EVENTS = "events"
    ESTIMATED = "estimated"  # the router's own estimate: what it sent there, LRU-bounded by the capacity
    # The caller applies the engine's block changes to Router.index itself (apply_stored / apply_removed), as
    # the simulator's engines do: exact from the start, never estimated.
    EXTERNAL = "external"


class PeerPublisher(Protocol):
    """Where a router sends its own requests' events for its peers (peer_sync.PeerSync, or the simulator's bus)."""

    router_id: str

    def publish(self, kind: PeerEventKind, **fields: object) -> None: ...


@dataclass(slots=True)
class PeerState:
    """What this router knows of one peer router: its last event, its event numbering, its requests in flight."""

    last_seen: float
    last_seq: int
    events: int = 0
    lost: int = 0  # events missing from its numbering (dropped, or sent while this router was not listening)
    skipped: int = 0  # dispatches to a backend this router does not route to (unknown or unhealthy here)
    flights: dict[int, tuple[PreparedRequest, InFlight]] = field(default_factory=dict)  # dispatch no -> request


def cacheable_tokens(matched_blocks: int, block_size: int, prompt_tokens: int) -> int:
    """Tokens vLLM will report as cached: it always recomputes the prompt's last token."""
    if prompt_tokens <= 0:
        return 0
    return min(matched_blocks, (prompt_tokens - 1) // block_size) * block_size


class Router:
    def __init__(
        self,
        *,
        model: str,
        tokenizer: PromptTokenizer | None,
        policy: Policy,
        predicted_ttl: float = PREDICTED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        kv_events_auto: bool = False,
        events_silence: float = EVENTS_SILENCE_S,
        load_poll_interval: float = 0.0,
        models: Mapping[str, str] | None = None,
    ) -> None:
        """predicted_ttl: seconds a request's predicted blocks outlive the request (events still in flight).
        kv_events_auto: backends given no event endpoint subscribe to what the engine advertises.
        events_silence: seconds requests may wait for a live KV event before the backend's feed counts as silent
        and it is routed on the estimate.
        load_poll_interval: seconds between polls of each healthy backend's own load report (its load feed,
        merged with this router's counts: load.py); 0: off (no polling, and none here by default: the CLI turns
        it on; the simulator feeds reports itself through load.apply_report).
        models: other served models, name -> tokenizer directory (served_models.py): backends may serve
        different models, and a request goes only to those serving its own."""
        self.model = model
        self.served = ServedModels(model, tokenizer, models)
        self.kv_events_auto = kv_events_auto
        self.events_silence = events_silence
        self.tokenizer = tokenizer
        self.policy = policy
        self.clock = clock
        self.index = CacheIndex(predicted_ttl=predicted_ttl, clock=clock)
        self.index.on_evicted = self._blocks_evicted
        self.load_poll_interval = load_poll_interval
        self.load = LoadTracker(stale_after=load_stale_after(load_poll_interval))
        # Blocks stored for requests this router did not send are other routers' (several routers, one fleet):
        # the load view counts them before the engine's next report does (load.py, "unseen").
        self.index.on_foreign_stored = self._foreign_stored
        self._load_task: asyncio.Task | None = None
        self._load_client: httpx.AsyncClient | None = None
        self._block_keys = BlockKeyCache()  # shared prefixes are hashed once, not once a request
        self.backends: dict[int, Backend] = {}
        self._subscribers: dict[int, KvEventSubscriber] = {}
        self._next_request = 0
        self._merge_inline_system: dict[str, bool] = {}  # per model, Messages' inline-system merge (probed once)
        # Peer routers of the same fleet (peer_sync.py): this router's events go to `peers`; theirs come to
        # apply_peer and are replayed through the same bookkeeping as this router's own requests.
        self.peers: PeerPublisher | None = None
        self.peer_sync: Any = None  # its transport (peer_sync.PeerSync), if any: start() / async stop()
        self.peer_states: dict[str, PeerState] = {}
        self.peer_flight_ttl = 600.0  # s: a peer's request whose end never came is forgotten after this long
        self._dispatches = 0
        self._rebalancer = True  # the one router of its peers that rebalances: the least router id (_elect)
        self.peer_events_forgotten = 0  # events and losses of peers forgotten (silent): the counters stay monotonic
        self.peer_lost_forgotten = 0

    # ---- backends -------------------------------------------------------------------------------
    def add_backend(self, url: str, kv_endpoint: str | None = None, replay_endpoint: str | None = None, *,
                    blocks: BlockSource | None = None, block_size: int | None = None,
                    capacity_blocks: int | None = None, healthy: bool = False) -> Backend:
        """Register a backend (the same URL again: the one registered).

        blocks: where its cached blocks come from (BlockSource); by default EVENTS when a kv_endpoint is given or
        the router has kv_events_auto, else ESTIMATED. block_size, capacity_blocks: known up front (a simulated
        engine); else learned from its /metrics by the health probes. healthy: routable at once, before any
        probe (nothing probes a simulated engine)."""
        url = url.rstrip("/")
        known = self.backend_by_url(url)
        if known is not None:
            return known
        if blocks is None:
            blocks = BlockSource.EVENTS if kv_endpoint or self.kv_events_auto else BlockSource.ESTIMATED
        if kv_endpoint and blocks is not BlockSource.EVENTS:
            raise ValueError(f"backend {url}: a KV-event endpoint, but blocks={blocks.name}")
        backend_id = min(set(range(len(self.backends) + 1)) - set(self.backends))
        backend = Backend(backend_id, url, kv_endpoint, replay_endpoint, healthy=healthy, block_size=block_size,
                          capacity_blocks=capacity_blocks,
                          kv_auto=blocks is BlockSource.EVENTS and kv_endpoint is None)
        self.backends[backend_id] = backend
        # EVENTS starts on the estimate: its subscriber switches it once events flow.
        self.index.add_backend(backend_id, model=self.model, estimated=blocks is not BlockSource.EXTERNAL,
                               capacity_blocks=capacity_blocks)
        self.load.add_backend(backend_id, url)
        if kv_endpoint:
            self._subscribe(backend, kv_endpoint, replay_endpoint)
        return backend

    def backend_by_url(self, url: str) -> Backend | None:
        """The registered backend of this URL (as registered: no trailing slash), if any."""
        return next((b for b in self.backends.values() if b.url == url), None)

    def _subscribe(self, backend: Backend, endpoint: str, replay_endpoint: str | None, topic: str = "") -> None:
        backend.kv_endpoint, backend.replay_endpoint = endpoint, replay_endpoint
        sub = KvEventSubscriber(backend.backend_id, endpoint, self.index, replay_endpoint=replay_endpoint,
                                topic=topic, silence_after=self.events_silence, on_feed_change=self._feed_changed)
        self._subscribers[backend.backend_id] = sub
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no running loop yet: start_event_consumers() will start it
            return
        sub.start()

    def _feed_changed(self, backend_id: int, flowing: bool) -> None:
        """A backend's event feed started or stopped: its index entry follows events or the estimate."""
        if backend_id in self.backends:
            self.index.set_estimated(backend_id, not flowing, self.clock())

    async def discover_kv_events(self, client: httpx.AsyncClient, backend: Backend) -> None:
        """--kv-events auto: subscribe to what the engine advertises, once it answers."""
        sources = await fetch_kv_event_sources(client, backend)
        if sources is None or not backend.kv_auto or backend.backend_id in self._subscribers:
            return  # no answer yet (next probe), or settled meanwhile
        backend.kv_auto = False
        feed = advertised_feed(sources, urlsplit(backend.url).hostname or "127.0.0.1")
        backend.kv_problem = feed.problem
        if feed.endpoint is None:
            # An engine without events is a choice (INFO); one whose events cannot be reached is a mistake.
            log.log(logging.WARNING if feed.publishes else logging.INFO,
                    "backend %s: routed on the estimated index: %s", backend.url, feed.problem)
            return
        if feed.problem:
            log.warning("backend %s: %s", backend.url, feed.problem)
        log.info("backend %s: following its KV events at %s (replay %s)", backend.url, feed.endpoint,
                 feed.replay_endpoint)
        self._subscribe(backend, feed.endpoint, feed.replay_endpoint, feed.topic)

    def check_event_feeds(self) -> None:
        """Re-evaluate every event feed (the health loop calls this): silent feeds fall back to the estimate."""
        now = self.clock()
        for backend_id, sub in self._subscribers.items():
            backend = self.backends.get(backend_id)
            if backend is not None and backend.healthy:
                sub.check(now)

    async def remove_backend(self, url: str) -> None:
        backend = self.backend_by_url(url.rstrip("/"))
        if backend is None:
            return
        backend_id = backend.backend_id
        sub = self._subscribers.pop(backend_id, None)
        if sub:
            await sub.stop()
        self.index.remove_backend(backend_id)
        self.load.remove_backend(backend_id)
        self.policy.on_backend_removed(backend_id)
        del self.backends[backend_id]

    def _foreign_stored(self, backend_id: int, stored_tokens: int) -> None:
        if backend_id in self.backends:
            self.load.foreign_started(backend_id, stored_tokens, self.clock())

    def _blocks_evicted(self, backend_id: int, keys: list[int]) -> None:
        """The index dropped blocks of backend_id (events, clears, estimated LRU): tell the policy."""
        callback = getattr(self.policy, "on_blocks_evicted", None)  # a policy written before the callback
        if callback is not None and backend_id in self.backends:
            callback(backend_id, keys)

    def start_event_consumers(self) -> None:
        """Start the KV-event subscribers, the peer sync and, with load_poll_interval, the load feed (on the running
        loop)."""
        for sub in self._subscribers.values():
            sub.start()
        if self.peer_sync is not None:
            self.peer_sync.start()  # attaches itself (attach_peers)
        if self.load_poll_interval > 0 and self._load_task is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load_feed_loop())

    async def stop(self) -> None:
        for sub in self._subscribers.values():
            await sub.stop()
        if self.peer_sync is not None:
            self.peers = None
            await self.peer_sync.stop()
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
            self._load_task = None
        if self._load_client is not None:
            await self._load_client.aclose()
            self._load_client = None

    # ---- the load feed (load.py has the merge rule) ---------------------------------------------------------
    async def _load_feed_loop(self) -> None:
        # Its own client: one small GET per backend per interval, each waiting until the report would be stale.
        self._load_client = httpx.AsyncClient(timeout=httpx.Timeout(self.load.stale_after),
                                              limits=httpx.Limits(max_keepalive_connections=64))
        while True:
            try:
                await self.poll_loads(self._load_client)
            except Exception:  # a bug here must never stop the feed
                log.exception("load feed poll failed")
            await asyncio.sleep(self.load_poll_interval)

    async def poll_loads(self, client: httpx.AsyncClient) -> None:
        """Ask every healthy backend for its load once and merge the answers; expire reports gone stale."""
        await asyncio.gather(*(self._poll_load(client, b) for b in self.healthy()))
        self.load.check(self.clock())

    async def _poll_load(self, client: httpx.AsyncClient, backend: Backend) -> None:
        mark = self.load.mark(backend.backend_id)
        try:
            report = await fetch_engine_load(client, backend)
            error = None if report is not None else "neither /preble/load nor vLLM's gauges in /metrics"
        except httpx.HTTPError as exc:
            report, error = None, str(exc) or type(exc).__name__
        if self.backends.get(backend.backend_id) is not backend:
            return  # it left meanwhile (its id may name another backend now)
        if report is None:
            self.load.feed_failed(backend.backend_id, error or "no report")
        else:
            self.load.apply_report(backend.backend_id, report, mark, self.clock())

    def load_debug(self, backend_id: int) -> dict[str, Any]:
        """The backend's load feed, engine figures, local and merged load (for /debug/backends)."""
        return self.load.debug(backend_id, self.clock())

    def subscriber(self, backend_id: int) -> KvEventSubscriber | None:
        return self._subscribers.get(backend_id)

    async def probe_all(self, client: httpx.AsyncClient, metadata_interval: float = 0.0,
                        liveness: UpstreamPool | None = None) -> None:
        """Probe every backend; read a backend's models and /metrics too when it has not been for
        metadata_interval seconds (backends.probe_backend: 0 reads them every probe; liveness, the pool for the
        probes that are one GET /health)."""
        now = time.monotonic()
        await asyncio.gather(*(probe_backend(client, b, metadata=b.metadata_due(now, metadata_interval),
                                             liveness=liveness)
                               for b in list(self.backends.values())))
        for b in self.backends.values():
            if b.capacity_blocks is not None:
                self.index.set_capacity(b.backend_id, b.capacity_blocks)
            self.index.set_model(b.backend_id, self.served.model_of(b))  # its events' keys chain from it
        pending = [b for b in self.backends.values() if b.kv_auto and b.healthy]
        if pending:
            await asyncio.gather(*(self.discover_kv_events(client, b) for b in pending))

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def known_models(self) -> set[str]:
        return {m for b in self.backends.values() for m in b.models} | self.served.names

    def knows_model(self, name: str) -> bool:
        """name in known_models(), without building the set (it is asked on every request)."""
        return self.served.configured(name) or any(name in b.models for b in self.backends.values())

    # ---- the request path -------------------------------------------------------------------------
    def prepare(self, endpoint: Endpoint | str, body: dict[str, Any]) -> PreparedRequest:
        """Tokens and block keys of a request body to one of the prefix-routed endpoints (Endpoint), rendered as
        vLLM renders it (raises tokens.PromptError on a bad prompt). A Responses request that continues a stored
        one (previous_response_id) has a history only its backend knows: its tokens are the new input alone (a
        lower bound, for load) and it has no block keys, so nothing is matched or predicted for it."""
        requested = body.get("model")
        base = self.served.base_of(requested, self.backends.values())
        tokenizer = self.served.tokenizer(base)
        assert tokenizer is not None, "a router without a tokenizer routes token ids (prepare_tokens)"
        keyed = True
        if endpoint == Endpoint.COMPLETIONS:
            tokens = tokenizer.completion_tokens(body)
        else:
            # Imported here: chat_convert needs tokens.py (transformers), which the simulator never loads.
            from preble_router.chat_convert import messages_to_chat, responses_to_chat

            if endpoint == Endpoint.MESSAGES:
                body = messages_to_chat(body, merge_inline_system=self._merges_inline_system(base, tokenizer))
            elif endpoint == Endpoint.RESPONSES:
                keyed = body.get("previous_response_id") is None
                body = responses_to_chat(body)
            elif endpoint != Endpoint.CHAT:
                raise ValueError(f"no prefix-routed endpoint {endpoint!r}")
            tokens = tokenizer.chat_tokens(body)
        # A model name listed as a LoRA adapter selects it in vLLM: its blocks are its own.
        lora = requested if any(requested in b.lora_models for b in self.backends.values()) else None
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        # The router numbers requests itself: a client's request_id may repeat, and policies key state by id.
        return self.prepare_tokens(tokens, lora=lora, cache_salt=salt,
                                   max_tokens=max_tokens if isinstance(max_tokens, int) else None, keyed=keyed,
                                   model=requested if isinstance(requested, str) else None)

    def _merges_inline_system(self, model: str, tokenizer: PromptTokenizer) -> bool:
        """Whether vLLM merges a Messages request's inline system messages for this model (probed once)."""
        merges = self._merge_inline_system.get(model)
        if merges is None:
            from preble_router.chat_convert import requires_system_first

            merges = self._merge_inline_system[model] = requires_system_first(tokenizer.tokenizer)
        return merges

    def prepare_tokens(self, tokens: Sequence[int], *, lora: str | None = None, cache_salt: str | None = None,
                       max_tokens: int | None = None, request_id: str | None = None,
                       keyed: bool = True, model: str | None = None) -> PreparedRequest:
        """Block keys of a tokenized prompt, for each block size among the backends (keyed=False: none). model:
        as the client named it (None: the default model)."""
        self._next_request += 1
        prepared = PreparedRequest(request_id or str(self._next_request), tokens, lora, cache_salt, max_tokens,
                                   model=model)
        if not keyed:
            return prepared
        root = chain_root(self.served.base_of(model, self.backends.values()), lora, cache_salt)
        for block_size in {b.block_size for b in self.backends.values() if b.block_size}:
            prepared.keys_by_block_size[block_size] = self._block_keys.keys(tokens, block_size, root)
        return prepared

    def snapshot(self, prepared: PreparedRequest, exclude: set[int] = frozenset()) -> ClusterSnapshot:
        now = self.clock()
        serving = ServedModels.eligible(prepared.model or self.model, list(self.backends.values()))
        eligible = [b for b in serving if b.healthy and b.backend_id not in exclude]
        states = []
        matches: dict[int, int] = {}
        for block_size, keys in prepared.keys_by_block_size.items():
            ids = [b.backend_id for b in eligible if b.block_size == block_size]
            if ids:
                matches.update(self.index.match(keys, ids, now))
        prepared.matched_blocks = matches
        view = self.load.view
        for b in eligible:
            load = view(b.backend_id, now)  # the merged view (load.py)
            held = matches.get(b.backend_id, 0)
            keys = prepared.keys_by_block_size.get(b.block_size or 0)
            if held and keys and held < len(keys) and self.index.foreign_prefill_at(b.backend_id, keys[held - 1], now):
                # Another router's request is prefilling this prompt's prefix there right now and has stored up to
                # where the match ends: the rest of the shared prefix is on its way, as our own prediction would
                # say for a request of ours (behind one router this never happens).
                held = len(keys)
            matched = cacheable_tokens(held, b.block_size or 1, len(prepared.tokens))
            states.append(BackendState(
                backend_id=b.backend_id,
                url=b.url,
                matched_tokens=matched,
                in_flight=load.in_flight,
                pending_prefill_tokens=load.pending_prefill_tokens,
                running_decode=load.running_decode,
                capacity_blocks=b.capacity_blocks,
                cached_blocks=self.index.blocks_held(b.backend_id),
                unseen_dispatches=load.unseen_dispatches,
            ))
        return ClusterSnapshot(now=now, backends=tuple(states), shared=self.load.foreign_recent(now),
                               rebalancer=self._rebalancer)

    def route_request(self, prepared: PreparedRequest) -> RouteRequest:
        if prepared.route is None:
            block_size = next(iter(prepared.keys_by_block_size), 0)
            prepared.route = RouteRequest(
                request_id=prepared.request_id,
                prompt_tokens=len(prepared.tokens),
                block_hashes=tuple(prepared.keys_by_block_size.get(block_size, ())),
                block_size=block_size,
                max_tokens=prepared.max_tokens,
            )
        return prepared.route

    def decide(self, prepared: PreparedRequest, exclude: set[int] = frozenset()) -> Decision | None:
        """The policy's pick among healthy backends not in `exclude`; None when there is none."""
        snapshot = self.snapshot(prepared, exclude)
        if not snapshot.backends:
            return None
        prepared.snapshot = snapshot
        return self.policy.choose(self.route_request(prepared), snapshot)

    def dispatch(self, prepared: PreparedRequest, decision: Decision) -> InFlight:
        """Record that the request goes to decision.backend_id (predicted blocks + load), and tell the peers."""
        inflight = self._record_dispatch(prepared, decision)
        if self.peers is not None:
            self._dispatches += 1
            inflight.dispatch_no = self._dispatches
            backend = inflight.backend
            keys = prepared.keys_by_block_size.get(backend.block_size or 0, ())
            self.peers.publish(PeerEventKind.DISPATCHED, request=self._dispatches, backend=backend.url,
                               keys=array("Q", keys).tobytes(), block_size=backend.block_size or 0,
                               prompt_tokens=len(prepared.tokens), matched_tokens=decision.matched_tokens,
                               reason=str(decision.reason), group_blocks=decision.group_blocks,
                               model=prepared.model, max_tokens=prepared.max_tokens)
        return inflight

    def _record_dispatch(self, prepared: PreparedRequest, decision: Decision) -> InFlight:
        now = self.clock()
        backend = self.backends[decision.backend_id]
        keys = prepared.keys_by_block_size.get(backend.block_size or 0, [])
        route = self.route_request(prepared)
        assert prepared.snapshot is not None, "dispatch() follows decide()"
        self.policy.on_dispatched(route, decision, prepared.snapshot)
        # Blocks match() found there a moment ago (all of them: a prompt's last block counts, though vLLM never
        # reports it cached): an estimated backend then only touches them, an events backend predicts the rest.
        held = prepared.matched_blocks.get(decision.backend_id, 0)
        predicted = self.index.record_routed(decision.backend_id, keys, now, held)
        inflight = self.load.begin(decision.backend_id, len(prepared.tokens) - decision.matched_tokens, now)
        inflight.route = route
        inflight.backend = backend
        inflight.predicted = predicted
        if len(keys) > held and decision.backend_id in self._subscribers:
            # It should make the engine store blocks: once it ends, their events are due (feed health).
            inflight.cacheable_tokens = cacheable_tokens(len(keys), backend.block_size or 1, len(prepared.tokens))
        return inflight

    def _still_there(self, inflight: InFlight) -> bool:
        """False once the request's backend left (its id may now name another backend)."""
        return self.backends.get(inflight.backend_id) is inflight.backend

    def first_token(self, inflight: InFlight, at: float | None = None) -> None:
        """The request's first token came (at: when, if not now: a peer's request, timed by that peer)."""
        now = self.clock() if at is None else at
        if inflight.first_token_at is None and not inflight.done:
            if self._still_there(inflight):
                self.policy.on_first_token(inflight.route, inflight.backend_id, now)
            if inflight.dispatch_no and self.peers is not None:
                self.peers.publish(PeerEventKind.FIRST_TOKEN, request=inflight.dispatch_no,
                                   elapsed=now - inflight.started)
        self.load.first_token(inflight, now)

    def finish(self, prepared: PreparedRequest, inflight: InFlight, *, ok: bool, output_tokens: int | None,
               cached_tokens: int | None = None, at: float | None = None) -> None:
        """The request ended. cached_tokens: what the engine reported as cached (usage), when it did. at: when,
        if not now (a peer's request, timed by that peer)."""
        now = self.clock() if at is None else at
        if not inflight.done and inflight.dispatch_no and self.peers is not None:
            self.peers.publish(PeerEventKind.FINISHED, request=inflight.dispatch_no, ok=ok,
                               output_tokens=output_tokens, elapsed=now - inflight.started)
        if not inflight.done and self._still_there(inflight):
            self.policy.on_finished(inflight.route, inflight.backend_id, now, output_tokens, ok)
            if inflight.predicted is not None:
                self.index.release_routed(inflight.predicted, now)
            expected = inflight.cacheable_tokens
            # New blocks were stored unless the engine says it had all it could report cached.
            if ok and expected and (cached_tokens is None or cached_tokens < expected):
                sub = self._subscribers.get(inflight.backend_id)
                if sub is not None:
                    sub.note_routed(now, inflight.started)
        self.load.finish(inflight, now, ok=ok, output_tokens=output_tokens)

    # ---- peer routers (peer_sync.py) ------------------------------------------------------------------
    def attach_peers(self, peers: PeerPublisher) -> None:
        self.peers = peers
        self._elect()

    def _elect(self) -> None:
        """Of this router and the peers it hears, the least id moves and replicates prefix groups (policies read
        ClusterSnapshot.rebalancer): a move is one router's own state, so several movers would undo each other."""
        self._rebalancer = self.peers is None or all(self.peers.router_id < rid for rid in self.peer_states)

    def apply_peer(self, event: PeerEvent) -> None:
        """A peer router's event: its dispatches, first tokens and ends go through this router's own bookkeeping
        (predicted blocks, load counts, the policy's history), so both route on the traffic of both."""
        now = self.clock()
        peer = self.peer_states.get(event.router)
        if peer is None:
            peer = self.peer_states[event.router] = PeerState(now, event.seq - 1)
            log.info("peer router %s: first event; its requests now count here", event.router)
            self._elect()
        if event.seq > peer.last_seq + 1:
            gap = event.seq - peer.last_seq - 1
            peer.lost += gap
            log.warning("peer router %s: %d events lost (its requests in flight may be miscounted until they "
                        "end or time out)", event.router, gap)
        peer.last_seq = max(peer.last_seq, event.seq)
        peer.last_seen = now
        peer.events += 1
        kind = event.kind
        if kind == PeerEventKind.DISPATCHED:
            self._apply_peer_dispatch(peer, event)
        # Timed as the peer timed them (its elapsed time since its dispatch, counted from when the dispatch got
        # here), not by when they got here: events that queued together behind a busy loop would otherwise show a
        # prefill as instant to the policy's time model. (A time past now by at most the dispatch's delay.)
        elif kind == PeerEventKind.FIRST_TOKEN:
            flight = peer.flights.get(event.request)
            if flight is not None:
                self.first_token(flight[1], at=flight[1].started + event.elapsed)
        elif kind == PeerEventKind.FINISHED:
            flight = peer.flights.pop(event.request, None)
            if flight is not None:
                self.finish(flight[0], flight[1], ok=event.ok, output_tokens=event.output_tokens,
                            at=flight[1].started + event.elapsed)

    def _apply_peer_dispatch(self, peer: PeerState, event: PeerEvent) -> None:
        backend = self.backend_by_url(event.backend)
        if backend is None or not backend.healthy or (backend.block_size or 0) != event.block_size:
            peer.skipped += 1
            return
        keys = memoryview(event.keys).cast("Q").tolist() if event.keys else []
        # The peer's tokens are not sent: only their count is read (range stands in for them).
        prepared = PreparedRequest(f"peer-{event.router}-{event.request}", range(event.prompt_tokens), None, None,
                                   event.max_tokens, model=event.model)
        if keys:
            prepared.keys_by_block_size[event.block_size] = keys
        prepared.snapshot = self.snapshot(prepared)  # this router's view of it (its policy's callback reads it)
        if all(b.backend_id != backend.backend_id for b in prepared.snapshot.backends):
            peer.skipped += 1  # not eligible here (another model)
            return
        try:
            reason = Reason(event.reason)
        except ValueError:
            reason = Reason.EXPLORE
        decision = Decision(backend.backend_id, reason, event.matched_tokens, group_blocks=event.group_blocks)
        peer.flights[event.request] = (prepared, self._record_dispatch(prepared, decision))

    def check_peers(self) -> None:
        """Forget peers gone silent (their requests in flight with them) and peer requests past the TTL."""
        now = self.clock()
        for router_id, peer in list(self.peer_states.items()):
            silent = now - peer.last_seen > PEER_SILENCE_S
            stale = [no for no, (_, inflight) in peer.flights.items()
                     if silent or now - inflight.started > self.peer_flight_ttl]
            for no in stale:
                prepared, inflight = peer.flights.pop(no)
                self.finish(prepared, inflight, ok=False, output_tokens=None)
            if silent:
                log.warning("peer router %s: silent for %.1f s; forgot it and its %d requests in flight (the "
                            "engines' reports cover them)", router_id, now - peer.last_seen, len(stale))
                self.peer_events_forgotten += peer.events
                self.peer_lost_forgotten += peer.lost
                del self.peer_states[router_id]
                self._elect()

    def peer_load(self) -> dict[int, tuple[int, int]]:
        """Per backend, the peers' requests in flight and their pending prefill tokens counted in this router's
        load (for its metrics of its own requests). O(peer requests in flight): for scrapes, not routing."""
        out: dict[int, tuple[int, int]] = {}
        for peer in self.peer_states.values():
            for _, inflight in peer.flights.values():
                if not inflight.done and self._still_there(inflight):
                    n, tokens = out.get(inflight.backend_id, (0, 0))
                    prefill = inflight.uncached_tokens if inflight.first_token_at is None else 0
                    out[inflight.backend_id] = (n + 1, tokens + prefill)
        return out

    def peers_debug(self) -> dict[str, Any]:
        """For /debug/backends: this router's peers and what it knows of each."""
        now = self.clock()
        debug = getattr(self.peers, "debug", None)
        return {
            **(debug() if debug is not None else {}),
            "peers": {rid: {"last_seen_s_ago": round(now - p.last_seen, 3), "events": p.events, "lost": p.lost,
                            "skipped": p.skipped, "in_flight": len(p.flights)}
                      for rid, p in self.peer_states.items()},
        }
