"""The OpenAI-compatible reverse proxy: parse, validate, route, forward, relay.

Streaming responses are relayed chunk by chunk as they arrive. A backend that fails before the first byte
reaches the client is marked down and the request goes to another backend; one that fails after it ends
the client's stream with an OpenAI-style error event. Every path ends the request in the load tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from preble_router.backends import Backend, mark_failure, probe_backend
from preble_router.discovery import Discovery
from preble_router.errors import error_body, error_response, sse_error_event
from preble_router.kv_events import KvEventSubscriber
from preble_router.load import InFlight
from preble_router.loop_lag import LoopLagMonitor
from preble_router.metrics import RouterMetrics
from preble_router.policies import Decision, Reason
from preble_router.response_store import DEFAULT_CAPACITY, ResponseStore
from preble_router.router import Endpoint, PreparedRequest, Router
from preble_router.settings import setting
from preble_router.tokens import PromptError
from preble_router.upstream import StreamStalled, UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)

# Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus those the client recomputes.
# Lowercase bytes, as ASGI and the upstream pool carry header names.
_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                          b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
                          b"content-encoding", b"accept-encoding", b"expect"})
# What a forwarding attempt can fail with in transport.
_TRANSPORT_ERRORS = (UpstreamError, TimeoutError)


@dataclass
class ProxyConfig:
    """The proxy's settings; preble-router takes the flagged ones as options of the same name."""

    max_body_bytes: int = setting(32 * 1024 * 1024, "Larger requests get 413.", flag="--max-body-bytes")
    max_attempts: int = setting(3, "Backends tried per request when one fails before the first byte.",
                                flag="--max-attempts")
    request_timeout: float = setting(600.0, "Seconds for a whole backend request.", flag="--request-timeout")
    health_interval: float = setting(2.0, "Seconds between backend health probes (GET /health).",
                                     flag="--health-interval")
    metadata_interval: float = setting(
        10.0, "Seconds between reads of each backend's /v1/models and /metrics (served models, KV capacity, the "
        "engine's gauges for /debug and /metrics when the load feed is off). A backend that comes back up, or whose "
        "adapters change through the router, is read at once. 0: at every health probe.",
        flag="--metadata-interval")
    probe_timeout: float = setting(
        3.0, "Seconds each health-probe request may take: a backend that accepts connections but does not answer "
        "(paused, hung) leaves the healthy set within --health-interval plus this.", flag="--probe-timeout")
    # A backend that accepts connections but never answers (a paused process, a stuck engine) must not hold
    # requests for request_timeout. Whole replies: _fail_unanswered_on_down_backends.
    first_byte_timeout: float = setting(
        60.0, "Seconds a streamed request waits for its backend's first chunk (its first token, after prefill: set "
        "it a few seconds above the longest prefill). Past it the backend is marked down and the request goes to "
        "another (up to --max-attempts). Non-streamed replies arrive only once generated, so they have no such "
        "limit (those a backend has not begun to answer when it fails a health probe go elsewhere). 0: no limit.",
        flag="--first-byte-timeout")
    stream_idle_timeout: float = setting(
        60.0, "Seconds a stream may go without a chunk once started; then the backend is marked down and the "
        "client's stream ends with an error event and [DONE]. 0: no limit.", flag="--stream-idle-timeout")
    api_key: str | None = setting(
        None, "Require `Authorization: Bearer KEY` on /v1/* (default: $PREBLE_API_KEY; none: open).",
        flag="--api-key", env="PREBLE_API_KEY")
    admin_key: str | None = setting(
        None, "Require this key on /debug/* and /reset_prefix_cache (default: $PREBLE_ADMIN_KEY). Without it (and "
        "without --admin-open) they answer 403.", flag="--admin-key", env="PREBLE_ADMIN_KEY")
    admin_open: bool = setting(
        False, "UNSAFE: without --admin-key, serve /debug/* and /reset_prefix_cache to anyone who can reach the "
        "port (one request empties every replica's prefix cache). Without either they answer 403. For local "
        "experiments only.", flag="--admin-open")
    backend_api_key: str | None = setting(
        None, "API key of the vLLM backends (their --api-key); replaces the client's Authorization.",
        flag="--backend-api-key", env="PREBLE_BACKEND_API_KEY")
    max_concurrency: int = setting(0, "Requests forwarded at once; more wait in a queue (0: unbounded).",
                                   flag="--max-concurrency")
    max_queue: int = setting(1024, "Requests that may wait for a slot; beyond this they get 429.",
                             flag="--max-queue")
    startup_wait: float = setting(10.0, "Seconds to wait at startup for every backend to pass a first health "
                                  "probe.", flag="--startup-wait")
    response_store_size: int = setting(
        DEFAULT_CAPACITY, "Stored Responses whose backend the router remembers (LRU): a follow-up with "
        "previous_response_id, GET /v1/responses/ID and its cancel go to the backend that stored it. An id it "
        "forgot (or never saw: another router's) is looked up by asking the healthy backends.",
        flag="--response-store-size")
    connect_timeout: float = setting(5.0, "Seconds to connect to a backend; also the limit of the short requests the "
                                     "router makes itself (/v1/models, /reset_prefix_cache).")


_decode_json = msgspec.json.Decoder().decode


class _ReplyFields(msgspec.Struct):
    """The two fields of a whole reply the router reads: decoded into this, the rest (choices, their text) is
    parsed past without building its objects."""

    id: Any = None
    usage: Any = None


_decode_reply = msgspec.json.Decoder(_ReplyFields).decode
# How much of a Responses stream is scanned for its response.created event (vLLM sends it first).
_STREAM_ID_SCAN_BYTES = 65536
# Arrays and objects a request body may nest. Real bodies nest a few levels (tool schemas a dozen or so); past
# this the body is refused before anything walks it (templates, the backend's own parser).
MAX_JSON_DEPTH = 64


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    # The first Content-Length, as Starlette's request.headers would give it, read from the raw ASGI list without
    # building that Headers object.
    declared = next((value for name, value in request.scope["headers"] if name == b"content-length"), None)
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    # ASGI messages read directly: Starlette's request.stream() keeps state for a later request.body(), unused here.
    receive = request.receive
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _brackets_over(raw: bytes, limit: int) -> bool:
    """Whether raw holds more than `limit` opening brackets ([ and { together). Found one by one with bytes.find
    (memchr), stopping past the limit: bytes.count walks the whole body a byte at a time, twice, which on a long
    prompt cost more than everything else in parsing but the decode."""
    seen = 0
    for bracket in (b"[", b"{"):
        at = raw.find(bracket)
        while at >= 0:
            seen += 1
            if seen > limit:
                return True
            at = raw.find(bracket, at + 1)
    return False


def _nested_deeper(raw: bytes, body: Any, limit: int) -> bool:
    """Whether the decoded body nests arrays/objects more than `limit` levels. Walked with a stack, not by
    recursion, and only when the raw bytes hold more brackets than the limit (most bodies: one prompt string or
    one token list, so no walk at all)."""
    if not _brackets_over(raw, limit):
        return False
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _invalid_fields(body: dict[str, Any]) -> Response | None:
    """The fields the router itself reads, checked for a type it can use (the rest is the backend's to judge)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return error_response(400, "'model' must be a string", "invalid_type", "model")
    return None


def _cached_tokens_from_usage(usage: Any) -> int | None:
    """The prompt tokens the engine found cached: usage.prompt_tokens_details.cached_tokens (completions, chat),
    input_tokens_details.cached_tokens (Responses) or cache_read_input_tokens (Anthropic Messages)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    cached = details.get("cached_tokens") if isinstance(details, dict) else usage.get("cache_read_input_tokens")
    return cached if isinstance(cached, int) else None


def _output_tokens_from_usage(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("completion_tokens", usage.get("output_tokens"))
    return tokens if isinstance(tokens, int) else None


class Proxy:
    def __init__(self, router: Router, config: ProxyConfig | None = None, *,
                 discovery: Callable[[Router], Awaitable[Discovery]] | None = None) -> None:
        self.router = router
        self._start_discovery = discovery  # called at startup, on the serving loop
        self.discovery: Discovery | None = None
        self.config = config or ProxyConfig()
        self.metrics = RouterMetrics(router)
        # Two clients, one job each. Forwarded requests go through upstream.UpstreamPool, built for this path
        # alone (see its docstring for the measured reason). Probes, /v1/models and resets (a few per second)
        # use httpx.
        self.upstream: UpstreamPool | None = None
        self.client: httpx.AsyncClient | None = None
        self.probes: httpx.AsyncClient | None = None  # health probes, with their own short timeout
        self.liveness: UpstreamPool | None = None  # the probes that are one GET /health
        self._health_task: asyncio.Task | None = None
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag.observe)
        self._lag_task: asyncio.Task | None = None
        self.responses = ResponseStore(self.config.response_store_size)  # response id -> its backend's URL
        self._slots = asyncio.Semaphore(self.config.max_concurrency) if self.config.max_concurrency > 0 else None
        self._queued = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.request_timeout, connect=self.config.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.probes = httpx.AsyncClient(timeout=httpx.Timeout(self.config.probe_timeout),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        # No cookie jar, no decompression: one pool serves every client, and bytes go back as the backend sent them.
        self.upstream = UpstreamPool(connect_timeout=self.config.connect_timeout,
                                     request_timeout=self.config.request_timeout)
        # The health loop's GET /health: a pool of its own, whose whole-reply limit is the probe timeout.
        self.liveness = UpstreamPool(connect_timeout=min(self.config.connect_timeout, self.config.probe_timeout),
                                     request_timeout=self.config.probe_timeout)
        if self._start_discovery is not None:  # before the first probe, so discovered backends are probed too
            self.discovery = await self._start_discovery(self.router)
        self.router.start_event_consumers()
        deadline = time.monotonic() + self.config.startup_wait
        while True:
            await self.router.probe_all(self.probes)
            if all(b.healthy for b in self.router.backends.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        self._health_task = asyncio.create_task(self._health_loop())
        self._lag_task = asyncio.create_task(self.loop_lag.run(), name="event-loop-lag")

    async def shutdown(self) -> None:
        for task in (self._health_task, self._lag_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.metrics.close()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.router.stop()
        if self.client:
            await self.client.aclose()
        if self.probes:
            await self.probes.aclose()
        if self.upstream:
            await self.upstream.close()
        if self.liveness:
            await self.liveness.close()

    async def _health_loop(self) -> None:
        assert self.probes is not None
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.router.probe_all(self.probes, self.config.metadata_interval, self.liveness)
                self._fail_unanswered_on_down_backends()
                self.router.check_event_feeds()
            except Exception:  # a probe bug must never stop health checking
                log.exception("health probe failed")
            self.metrics.publish_state()

    def _fail_unanswered_on_down_backends(self) -> None:
        """A backend that just failed its probe (hung, or gone) would hold the requests it has not begun to answer
        until request_timeout: whole replies have no first-byte limit. Fail them now; _forward retries them on
        another backend, as nothing of theirs has reached a client."""
        if self.upstream is None:
            return
        for backend in list(self.router.backends.values()):
            if not backend.healthy:
                failed = self.upstream.fail_unanswered(backend.url, f"failed its health probe: {backend.last_error}")
                if failed:
                    log.warning("backend %s failed its probe: %d unanswered requests go elsewhere", backend.url,
                                failed)

    # ---- endpoints ------------------------------------------------------------------------------
    def app(self) -> ASGIApp:
        from preble_router.passthrough import Passthrough  # (it imports this module's helpers)

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            await self.startup()
            try:
                yield
            finally:
                await self.shutdown()

        app = Starlette(
            middleware=[Middleware(_AuthMiddleware, proxy=self)],
            exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/responses", self.responses_create, methods=["POST"]),
                Route("/v1/responses/{response_id}", self.response_retrieve, methods=["GET"]),
                Route("/v1/responses/{response_id}/cancel", self.response_cancel, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/debug/route", self.debug_route, methods=["POST"]),
                Route("/debug/backends", self.debug_backends, methods=["GET"]),
                Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
                *Passthrough(self).routes(),  # the rest of vLLM's API: balanced, or fanned out (passthrough.py)
            ],
            lifespan=lifespan,
        )
        return _HotRoutes(app, self)

    async def completions(self, request: Request) -> Response | _WholeResponse:
        return await self._handle(request, Endpoint.COMPLETIONS, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response | _WholeResponse:
        return await self._handle(request, Endpoint.CHAT, "/v1/chat/completions")

    async def messages(self, request: Request) -> Response | _WholeResponse:
        return await self._handle(request, Endpoint.MESSAGES, "/v1/messages")

    async def responses_create(self, request: Request) -> Response | _WholeResponse:
        return await self._handle(request, Endpoint.RESPONSES, "/v1/responses")

    async def response_retrieve(self, request: Request) -> Response | _WholeResponse:
        return await self._to_response_holder(request, "GET", "")

    async def response_cancel(self, request: Request) -> Response | _WholeResponse:
        return await self._to_response_holder(request, "POST", "/cancel")

    async def models(self, request: Request) -> Response:
        seen: dict[str, dict] = {}
        assert self.client is not None
        for backend in self.router.healthy():
            try:
                r = await self.client.get(f"{backend.url}/v1/models", timeout=self.config.connect_timeout)
                r.raise_for_status()
                for m in r.json().get("data", []):
                    seen.setdefault(m["id"], m)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):  # any reply a backend sends
                continue
        if not seen and not self.router.healthy():
            return error_response(503, "no healthy backend", "no_healthy_backend")
        return JSONResponse({"object": "list", "data": list(seen.values())})

    async def health(self, request: Request) -> Response:
        if self.router.healthy():
            return JSONResponse({"status": "ok", "healthy_backends": len(self.router.healthy())})
        return error_response(503, "no healthy backend", "no_healthy_backend")

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @staticmethod
    def _feed_view(backend: Backend, sub: KvEventSubscriber | None, now: float) -> dict[str, Any] | None:
        if sub is None:
            return {"state": "auto_pending", "problem": backend.kv_problem} if backend.kv_auto else (
                {"state": "none", "problem": backend.kv_problem} if backend.kv_problem else None)
        st = sub.stats
        return {"state": sub.state.value, "endpoint": sub.endpoint, "replay_endpoint": sub.replay_endpoint,
                "connected": st.connected, "replay_ok": st.replay_ok, "events": st.events, "batches": st.batches,
                "last_event_age_s": None if st.last_live_time is None else round(now - st.last_live_time, 3),
                "routed_since_event": st.routed_since_event, "silences": st.silences, "gaps": st.gaps,
                "resets": st.resets, "last_seq": st.last_seq, "problem": backend.kv_problem}

    async def debug_backends(self, request: Request) -> Response:
        now = time.monotonic()
        out = []
        for b in self.router.backends.values():
            load = self.router.load.get(b.backend_id)
            sub = self.router.subscriber(b.backend_id)
            out.append({
                "id": b.backend_id, "url": b.url, "healthy": b.healthy, "block_size": b.block_size,
                "capacity_blocks": b.capacity_blocks, "models": list(b.models), "last_error": b.last_error,
                "in_flight": load.in_flight, "pending_prefill_tokens": load.pending_prefill_tokens,
                "indexed_blocks": self.router.index.blocks_held(b.backend_id),
                "engine_load": {"source": b.load_source, "running": b.engine_running, "waiting": b.engine_waiting,
                                "pending_prefill_tokens": b.engine_pending_prefill_tokens},
                "index": "estimated" if self.router.index.is_estimated(b.backend_id) else "events",
                "load": self.router.load_debug(b.backend_id),  # load feed, engine report, local and merged views
                "kv_events": self._feed_view(b, sub, now),
            })
        peers = self.router.peers_debug() if self.router.peers is not None else None
        return JSONResponse({"policy": self.router.policy.name, "backends": out, "peer_sync": peers,
                             "event_loop": self.loop_lag.debug(now)})

    async def reset_prefix_cache(self, request: Request) -> Response:
        """Empty every backend's prefix cache (vLLM's dev-mode endpoint) and the index with it: the engine's
        AllBlocksCleared event is only published at its next step, so the index is cleared here at once."""
        assert self.client is not None
        results = {}
        for backend in list(self.router.backends.values()):
            try:
                r = await self.client.post(f"{backend.url}/reset_prefix_cache", timeout=self.config.connect_timeout)
                ok = r.status_code == 200
                results[backend.url] = "ok" if ok else f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                ok, results[backend.url] = False, f"failed: {type(exc).__name__}"
            if ok:
                self.router.index.apply_cleared(backend.backend_id)
        status = 200 if all(v == "ok" for v in results.values()) else 502
        body: dict[str, Any] = {"backends": results}
        if status != 200:  # an error like every other, with what each backend said
            body.update(error_body(502, "some backends did not reset their prefix cache", "reset_failed"))
        return JSONResponse(body, status_code=status)

    async def debug_route(self, request: Request) -> Response:
        """The decision and per-backend view for a request body, without sending it."""
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        parsed, _ = parsed
        if (invalid := _invalid_fields(parsed)) is not None:
            return invalid
        endpoint = request.query_params.get("endpoint") or ("chat" if "messages" in parsed else "completions")
        if endpoint not in Endpoint.__members__.values():
            return error_response(400, f"?endpoint= takes one of {', '.join(Endpoint)}", "invalid_endpoint",
                                  "endpoint")
        try:
            prepared = self.router.prepare(endpoint, parsed)
        except PromptError as exc:
            return error_response(400, str(exc), "invalid_prompt")
        decision = self.router.decide(prepared)  # deciding changes nothing until dispatch()
        if decision is None or prepared.snapshot is None:
            return error_response(503, "no healthy backend", "no_healthy_backend")
        snapshot = prepared.snapshot
        return JSONResponse({
            "backend": self.router.backends[decision.backend_id].url,
            "reason": decision.reason,
            "matched_tokens": decision.matched_tokens,
            "prompt_tokens": len(prepared.tokens),
            "costs": {self.router.backends[i].url: c for i, c in decision.costs.items()},
            "backends": [{"url": s.url, "matched_tokens": s.matched_tokens, "in_flight": s.in_flight,
                          "pending_prefill_tokens": s.pending_prefill_tokens, "cached_blocks": s.cached_blocks}
                         for s in snapshot.backends],
        })

    # ---- the request path ------------------------------------------------------------------------
    async def _parse(self, request: Request) -> tuple[dict[str, Any], bytes] | Response:
        """The request's JSON object and its raw bytes (forwarded as they came), or an error response."""
        try:
            raw = await _read_body(request, self.config.max_body_bytes)
        except _TooLarge:
            return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes", "payload_too_large")
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            body = _decode_json(raw)  # msgspec: much faster than json.loads on long prompts
        except msgspec.DecodeError as exc:
            return error_response(400, f"malformed JSON body: {exc}", "invalid_json")
        except RecursionError:  # the decoder's own depth guard, met before ours
            return error_response(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_json")
        if _nested_deeper(raw, body, MAX_JSON_DEPTH):
            return error_response(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json")
        return body, raw

    async def _handle(self, request: Request, endpoint: Endpoint, path: str) -> Response | _WholeResponse:
        received = time.perf_counter()
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        body, raw = parsed
        if (invalid := _invalid_fields(body)) is not None:
            return invalid
        model = body.get("model")
        if model is not None and not self.router.knows_model(model):
            return error_response(404, f"The model `{model}` does not exist.", "model_not_found", "model")
        try:
            # In the event loop: shared prefixes tokenize from cached chunks in well under a millisecond, and a
            # thread hop would cost as much (the tokenizer holds the GIL anyway).
            prepared = self.router.prepare(endpoint, body)
        except PromptError as exc:
            return error_response(400, str(exc), "invalid_prompt")
        pinned: Backend | None = None
        learn_id = endpoint == Endpoint.RESPONSES and body.get("store") is not False
        if endpoint == Endpoint.RESPONSES and (previous := body.get("previous_response_id")) is not None:
            holder = await self._response_holder(previous)
            if isinstance(holder, Response):
                return holder
            pinned = holder
        stream = bool(body.get("stream"))
        forward = functools.partial(self._forward, request, raw, endpoint, path, prepared, stream, received,
                                    pinned=pinned, learn_id=learn_id)
        if self._slots is None:
            return await forward()
        if self._slots.locked() and self._queued >= self.config.max_queue:
            self.metrics.rejected.inc()
            return error_response(429, "the router's queue is full; retry later", "queue_full")
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            response = await forward()
        except BaseException:
            self._slots.release()
            raise
        if isinstance(response, _RelayResponse):
            response.on_close.append(self._slots.release)  # the slot is held until the stream ends
        else:
            self._slots.release()
        return response

    async def _forward(self, request: Request, raw: bytes, endpoint: str, path: str, prepared: PreparedRequest,
                       stream: bool, received: float, *, pinned: Backend | None = None,
                       learn_id: bool = False) -> Response | _WholeResponse:
        """Decide, send, relay; retried on another backend when one fails before the first byte. pinned: the only
        backend that can serve it (the holder of its previous response), never retried elsewhere. learn_id: the
        reply's Responses id is remembered with its backend."""
        assert self.upstream is not None
        headers = _forwarded_headers(request.scope["headers"], self.config.backend_api_key)
        # Progress limits for streams only: a whole reply's first byte comes after its whole generation.
        first_byte_timeout = (self.config.first_byte_timeout or None) if stream else None
        idle_timeout = (self.config.stream_idle_timeout or None) if stream else None
        # A pinned request's policy sees its holder alone (the others count as tried).
        tried: set[int] = set() if pinned is None else set(self.router.backends) - {pinned.backend_id}
        last_error = "no healthy backend" if pinned is None else f"it is down: {pinned.last_error}"
        for attempt in range(self.config.max_attempts):
            decision = self.router.decide(prepared, tried)
            if decision is None:
                break
            if pinned is not None:
                decision = dataclasses.replace(decision, reason=Reason.PREVIOUS_RESPONSE)
            tried.add(decision.backend_id)
            backend = self.router.backends[decision.backend_id]
            inflight = self.router.dispatch(prepared, decision)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("route %s -> %s (%s, %d/%d tokens cached) costs=%s loads=%s", prepared.request_id,
                          backend.url, decision.reason, decision.matched_tokens, len(prepared.tokens),
                          {self.router.backends[i].url: round(c, 1) for i, c in decision.costs.items()},
                          {s.url: (s.in_flight, s.pending_prefill_tokens, s.cached_blocks)
                           for s in (prepared.snapshot.backends if prepared.snapshot else ())})
            if attempt == 0:
                self.metrics.overhead.observe(time.perf_counter() - received)
                self.metrics.child(self.metrics.decisions, self.router.policy.name, decision.reason).inc()
                self.metrics.matched_tokens.observe(decision.matched_tokens)
            else:
                self.metrics.retries.inc()
            sent = time.perf_counter()
            try:
                resp = await self.upstream.post(backend.url, path, headers, raw, first_byte_timeout=first_byte_timeout,
                                                idle_timeout=idle_timeout)
            except _TRANSPORT_ERRORS as exc:
                last_error = self._transport_failure(prepared, inflight, backend, exc, endpoint)
                continue
            if resp.status >= 500:
                try:
                    detail = (await resp.read_any())[:500].decode(errors="replace")
                except _TRANSPORT_ERRORS:
                    detail = ""
                resp.close()
                last_error = f"backend {backend.url} answered {resp.status}: {detail}"
                self.metrics.errors.labels(backend.url, f"http_{resp.status}").inc()
                self._end(prepared, inflight, backend, endpoint, resp.status, ok=False)
                continue
            relayed = stream and resp.status == 200
            try:
                # A stream is relayed from its first chunk on; any other reply comes whole, so it is read whole.
                first = await (resp.read_any() if relayed else resp.read())
            except _TRANSPORT_ERRORS as exc:
                resp.close()
                last_error = self._transport_failure(prepared, inflight, backend, exc, endpoint)
                continue
            except BaseException:  # cancelled (the server shutting down): the connection can't be reused
                resp.close()
                self._end(prepared, inflight, backend, endpoint, 499, ok=False)
                raise
            self.router.first_token(inflight)
            self.metrics.child(self.metrics.ttft, backend.url).observe(time.perf_counter() - sent)
            decision_headers = self._decision_headers(backend, decision, attempt)
            if relayed:
                relay = _RelayResponse(self._relay(resp, first, prepared, inflight, backend, decision, endpoint,
                                                   learn_id),
                                       resp.status, _relayed_headers(resp.headers, decision_headers))

                async def abandon(resp: UpstreamResponse = resp, inflight: InFlight = inflight,
                                  backend: Backend = backend) -> None:
                    # The client left before the relay started: the generator never ran, so end it here.
                    resp.close()
                    self._end(prepared, inflight, backend, endpoint, 499, ok=False)

                relay.on_close.append(abandon)
                return relay
            content, output_tokens, usage = first, None, None  # the whole reply
            if resp.status == 200:
                # (A reply that is not a JSON object fails to decode into _ReplyFields: a ValueError.)
                with contextlib.suppress(ValueError, AttributeError, RecursionError):  # whatever the backend sent
                    reply = _decode_reply(content)
                    usage = reply.usage
                    self._observe_usage(usage, decision, backend)
                    output_tokens = _output_tokens_from_usage(usage)
                    if learn_id and isinstance(reply.id, str):
                        self.responses.learn(reply.id, backend.url)
            self._end(prepared, inflight, backend, endpoint, resp.status, ok=resp.status < 400,
                      output_tokens=output_tokens, cached_tokens=_cached_tokens_from_usage(usage))
            return _WholeResponse(resp.status, _relayed_headers(resp.headers, decision_headers, len(content)),
                                  content)
        if pinned is not None:
            return error_response(502 if pinned.backend_id in tried else 503, f"the backend that stored the previous "
                                  f"response ({pinned.url}) cannot take the request: {last_error}",
                                  "response_backend_unavailable", "previous_response_id")
        if not tried:
            return error_response(503, "no healthy backend", "no_healthy_backend")
        return error_response(502, f"all backends failed; last error: {last_error}", "backend_failure")

    async def _relay(self, resp: UpstreamResponse, first: bytes, prepared: PreparedRequest, inflight: InFlight,
                     backend: Backend, decision: Decision, endpoint: str, learn_id: bool = False
                     ) -> AsyncIterator[bytes]:
        status, output_tokens = 499, None  # 499 (client closed) unless the loop ends otherwise
        tail = b""
        head = b"" if learn_id else None  # the stream's start, until its response.created event gives the id
        try:
            yield first
            tail = first[-4096:]
            if head is not None:
                head = self._learn_streamed_id(first, backend)
            while chunk := await resp.read_any():
                yield chunk
                if head is not None:
                    head = self._learn_streamed_id(head + chunk, backend)
                # Keep the tail only: the usage chunk (when asked for) comes last, right before [DONE].
                tail = (tail + chunk)[-8192:]
            status = resp.status
        except StreamStalled as exc:  # (a TimeoutError: caught before the other transport errors)
            status = 504
            mark_failure(backend, str(exc))
            self.metrics.errors.labels(backend.url, "stream_stalled").inc()
            yield sse_error_event(504, f"backend {backend.url} stalled mid-stream: {exc}", "backend_timeout",
                                  api=endpoint)
        except _TRANSPORT_ERRORS as exc:
            status = 502
            mark_failure(backend, str(exc) or type(exc).__name__)
            self.metrics.errors.labels(backend.url, "mid_stream").inc()
            yield sse_error_event(502, f"backend {backend.url} failed mid-stream: {type(exc).__name__}",
                                  "backend_failure", api=endpoint)
        finally:
            if status == 200:
                resp.release()
            else:
                resp.close()
            usage = _usage_from_sse_tail(tail) if status == 200 else None
            if usage is not None:
                self._observe_usage(usage, decision, backend)
                output_tokens = _output_tokens_from_usage(usage)
            self._end(prepared, inflight, backend, endpoint, status, ok=status == 200, output_tokens=output_tokens,
                      cached_tokens=_cached_tokens_from_usage(usage))

    # ---- stored responses (OpenAI Responses API) --------------------------------------------------------
    async def _response_holder(self, response_id: Any) -> Backend | Response:
        """The backend that stored response_id, or the error to answer: a 404 as vLLM's when no backend has it, a
        503 when the one that has it is down or gone (never another backend: it would not have the response)."""
        if not isinstance(response_id, str):
            return error_response(400, "'previous_response_id' must be a string", "invalid_type",
                                  "previous_response_id")
        url = self.responses.holder(response_id)
        if url is None:  # forgotten, or another router's: ask the backends
            backend = await self._find_response(response_id)
            if backend is None:
                return _response_not_found(response_id)
            self.responses.learn(response_id, backend.url)
            return backend
        backend = self.router.backend_by_url(url)
        if backend is None or not backend.healthy:
            state = "no longer a backend" if backend is None else f"down: {backend.last_error}"
            return error_response(503, f"the backend that stored response '{response_id}' ({url}) is {state}",
                                  "response_backend_unavailable", "response_id")
        return backend

    async def _find_response(self, response_id: str) -> Backend | None:
        """The healthy backend whose GET /v1/responses/ID answers 200 (all asked at once), if any."""
        assert self.client is not None
        client = self.client
        path = "/v1/responses/" + quote(response_id, safe="")
        headers = {"authorization": f"Bearer {self.config.backend_api_key}"} if self.config.backend_api_key else {}

        async def holds(backend: Backend) -> bool:
            with contextlib.suppress(httpx.HTTPError):
                r = await client.get(backend.url + path, headers=headers, timeout=self.config.connect_timeout)
                return r.status_code == 200
            return False

        backends = self.router.healthy()
        found = await asyncio.gather(*(holds(b) for b in backends))
        return next((b for b, ok in zip(backends, found) if ok), None)

    async def _to_response_holder(self, request: Request, method: str, suffix: str) -> Response | _WholeResponse:
        """GET /v1/responses/ID (a stream with ?stream=true) and POST .../cancel, relayed from the backend that
        stored the response."""
        assert self.upstream is not None
        raw = b""
        if method == "POST":
            try:
                raw = await _read_body(request, self.config.max_body_bytes)
            except _TooLarge:
                return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes",
                                      "payload_too_large")
            except ClientDisconnect:
                return Response(status_code=499)
        response_id = request.path_params["response_id"]
        holder = await self._response_holder(response_id)
        if isinstance(holder, Response):
            return holder
        path = "/v1/responses/" + quote(response_id, safe="") + suffix
        if query := request.scope.get("query_string"):
            path += "?" + query.decode("latin-1")
        headers = _forwarded_headers(request.scope["headers"], self.config.backend_api_key)
        try:
            resp = await self.upstream.request(method, holder.url, path, headers, raw)
            streamed = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                           for name, value in resp.headers)
            first = await (resp.read_any() if streamed else resp.read())
        except _TRANSPORT_ERRORS as exc:
            mark_failure(holder, str(exc) or type(exc).__name__)
            return error_response(502, f"backend {holder.url} failed: {type(exc).__name__}", "backend_failure")
        extra = [(b"x-preble-backend", holder.url.encode("latin-1"))]
        if not streamed:
            return _WholeResponse(resp.status, _relayed_headers(resp.headers, extra, len(first)), first)

        async def chunks() -> AsyncIterator[bytes]:
            ok = False
            try:
                yield first
                while chunk := await resp.read_any():
                    yield chunk
                ok = True
            except _TRANSPORT_ERRORS as exc:
                yield sse_error_event(502, f"backend {holder.url} failed mid-stream: {type(exc).__name__}",
                                      "backend_failure", api=Endpoint.RESPONSES)
            finally:
                if ok:
                    resp.release()
                else:
                    resp.close()

        relay = _RelayResponse(chunks(), resp.status, _relayed_headers(resp.headers, extra))
        relay.on_close.append(resp.close)  # the client left before the stream began (a no-op after release)
        return relay

    def _learn_streamed_id(self, head: bytes, backend: Backend) -> bytes | None:
        """Remember a Responses stream's id once `head` (the stream so far) holds it; what to scan again with the
        next chunk, or None: learned, or not there."""
        found = _streamed_response_id(head)
        if isinstance(found, str):
            self.responses.learn(found, backend.url)
            return None
        return found

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _transport_failure(self, prepared: PreparedRequest, inflight: InFlight, backend: Backend,
                           exc: Exception, endpoint: str) -> str:
        message = f"backend {backend.url} failed: {type(exc).__name__} {exc}".strip()
        mark_failure(backend, message)
        self.metrics.errors.labels(backend.url, type(exc).__name__).inc()
        self._end(prepared, inflight, backend, endpoint, 502, ok=False)
        if self.probes is not None:  # let the health loop re-admit it as soon as it answers again
            asyncio.get_running_loop().create_task(probe_backend(self.probes, backend))
        return message

    def _end(self, prepared: PreparedRequest, inflight: InFlight, backend: Backend, endpoint: str, status: int,
             *, ok: bool, output_tokens: int | None = None, cached_tokens: int | None = None) -> None:
        """Every dispatched request ends here exactly once, whatever path it took."""
        if inflight.done:
            return
        self.router.finish(prepared, inflight, ok=ok, output_tokens=output_tokens, cached_tokens=cached_tokens)
        self.metrics.child(self.metrics.requests, backend.url, endpoint, str(status)).inc()
        if ok:
            self.metrics.child(self.metrics.prompt_tokens, backend.url).inc(len(prepared.tokens))

    def _observe_usage(self, usage: Any, decision: Decision, backend: Backend) -> None:
        observed = _cached_tokens_from_usage(usage)
        # A previous response's history is the backend's: the router predicts nothing for it.
        if observed is not None and decision.reason is not Reason.PREVIOUS_RESPONSE:
            self.metrics.child(self.metrics.cached_tokens, backend.url, "observed").inc(observed)
            self.metrics.child(self.metrics.cached_tokens, backend.url, "predicted").inc(decision.matched_tokens)

    @staticmethod
    def _decision_headers(backend: Backend, decision: Decision, attempt: int) -> list[tuple[bytes, bytes]]:
        """The router's headers on a routed reply, as the bytes ASGI sends (built so, not as a dict of str)."""
        headers = [
            (b"x-preble-backend", backend.url.encode("latin-1")),
            (b"x-preble-matched-tokens", str(decision.matched_tokens).encode()),
            (b"x-preble-decision", decision.reason.encode("latin-1")),
            (b"x-preble-attempts", b"%d" % (attempt + 1)),
        ]
        if decision.costs:
            headers.append((b"x-preble-cost", b"%.4f" % decision.costs.get(decision.backend_id, 0.0)))
        return headers


def _forwarded_headers(client_headers: list[tuple[bytes, bytes]], backend_api_key: str | None
                       ) -> list[tuple[bytes, bytes]]:
    """The client's headers as they go to a backend, raw bytes as uvicorn parsed them (names lowercase)."""
    headers = []
    has_type = has_agent = False
    for name, value in client_headers:
        if name in _HOP_HEADERS or (backend_api_key and name == b"authorization"):
            continue
        has_type = has_type or name == b"content-type"
        has_agent = has_agent or name == b"user-agent"
        headers.append((name, value))
    if backend_api_key:
        headers.append((b"authorization", b"Bearer " + backend_api_key.encode("latin-1")))
    if not has_type:  # the body was parsed as JSON: say so
        headers.append((b"content-type", b"application/json"))
    if not has_agent:
        headers.append((b"user-agent", b"preble-router"))
    headers.append((b"accept-encoding", b"identity"))  # bytes are relayed as the backend sends them
    return headers


def _relayed_headers(backend_headers: list[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]],
                     length: int | None = None) -> list[tuple[bytes, bytes]]:
    """A reply's headers as ASGI wants them, from the backend's raw ones (repeats such as Set-Cookie kept), plus
    the router's (as bytes); the length of a whole reply."""
    headers = [(name, value) for name, value in backend_headers if name.lower() not in _HOP_HEADERS]
    headers += extra
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    return headers


class _WholeResponse:
    """A relayed reply that is not streamed, its headers passed on as the backend sent them (Starlette's Response
    would decode and encode each one again)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status
        self.raw_headers = headers
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


class _RelayResponse(StreamingResponse):
    """A relayed stream whose cleanups run however the response ends, even if it never started streaming."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(content, status_code=status_code)
        self.raw_headers = raw_headers  # as the backend sent them (uvicorn frames the body in chunks)
        self.on_close: list[Callable[[], Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for cleanup in self.on_close:
                result = cleanup()
                if inspect.isawaitable(result):
                    await result


def _is_admin_path(path: str) -> bool:
    return path.startswith("/debug/") or path.rstrip("/") in ("/debug", "/reset_prefix_cache")


def _key_denied(scope: Scope, config: ProxyConfig) -> Response | None:
    """API key for /v1/*, admin key for /debug/* and /reset_prefix_cache (locked without one, unless admin_open);
    /health and /metrics stay open (probes and scrapers). Keys compare in constant time."""
    path: str = scope["path"]
    admin = _is_admin_path(path)
    key = config.admin_key if admin else config.api_key if path.startswith("/v1/") else None
    if key is None:
        if admin and not config.admin_open:
            return error_response(403, "admin endpoints are locked: start the router with --admin-key KEY "
                                  "(or --admin-open, which opens them to anyone)", "admin_locked")
        return None
    auth = dict(scope["headers"]).get(b"authorization", b"")
    if hmac.compare_digest(auth, f"Bearer {key}".encode()):
        return None
    return error_response(401, "missing or invalid API key", "invalid_api_key")


class _AuthMiddleware:
    def __init__(self, app: ASGIApp, proxy: Proxy) -> None:
        self.app = app
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (denied := _key_denied(scope, self.proxy.config)) is not None:
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _HotRoutes:
    """POST /v1/completions, /v1/chat/completions, /v1/messages and /v1/responses go straight to their handlers:
    Starlette's middleware and routing layers are a visible share of the router's CPU per request under load.
    Everything else (other paths and methods, lifespan) goes through the Starlette app."""

    def __init__(self, app: ASGIApp, proxy: Proxy) -> None:
        self.app = app
        self.proxy = proxy
        self.handlers = {"/v1/completions": proxy.completions, "/v1/chat/completions": proxy.chat_completions,
                         "/v1/messages": proxy.messages, "/v1/responses": proxy.responses_create}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        response = _key_denied(scope, self.proxy.config)
        if response is None:
            try:
                response = await handler(Request(scope, receive))
            except Exception:  # what Starlette's ServerErrorMiddleware would do, in the OpenAI error format
                log.exception("request failed")
                response = error_response(500, "internal router error", "internal_error")
        await response(scope, receive, send)


def _streamed_response_id(head: bytes) -> str | bytes | None:
    """The response id in the response.created event (vLLM's first) of a Responses stream that begins with
    `head`; `head` itself while that event is still incomplete; None if it is not there (or not readable)."""
    at = head.find(b"response.created")
    end = head.find(b"\n\n", at) if at >= 0 else -1
    if end < 0:
        return head if len(head) < _STREAM_ID_SCAN_BYTES else None
    line = head.rfind(b"data:", 0, end)
    with contextlib.suppress(ValueError, AttributeError, RecursionError):  # whatever the backend sent
        response_id = _decode_json(head[line + 5:end]).get("response", {}).get("id") if line >= 0 else None
        if isinstance(response_id, str):
            return response_id
    return None


def _response_not_found(response_id: str) -> Response:
    """vLLM's own answer for a response id it does not hold (its code an int, unlike the router's errors)."""
    return JSONResponse({"error": {"message": f"Response with id '{response_id}' not found.",
                                   "type": "invalid_request_error", "param": "response_id", "code": 404}},
                        status_code=404)


def _printable_path(scope: Scope) -> str:
    """The request path for an error message: JSON-safe whatever bytes it decoded from."""
    return str(scope.get("path", "")).encode("utf-8", "backslashreplace").decode("utf-8")[:200]


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI format, not its plain text."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        response = error_response(404, f"no endpoint {_printable_path(request.scope)}", "not_found")
    elif exc.status_code == 405:
        response = error_response(405, f"method {request.method} not allowed on {_printable_path(request.scope)}",
                                  "method_not_allowed")
    else:
        response = error_response(exc.status_code, str(exc.detail))
    if exc.headers:  # Allow, on a 405
        response.headers.update(exc.headers)
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    """What Starlette's ServerErrorMiddleware answers on a bug, as JSON (it raises the exception on for uvicorn to
    log)."""
    return error_response(500, "internal router error", "internal_error")


def _usage_from_sse_tail(tail: bytes) -> dict | None:
    """The stream's last usage object: the final chunk's (chat, completions), message_delta's (Anthropic) or
    response.completed's (Responses, whose event line, long with the whole response, may start before the tail).
    Found as the last `"usage": {` in the tail, read to its closing brace."""
    at = len(tail)
    while (at := tail.rfind(b'"usage":', 0, at)) >= 0:
        start = at + 8
        while tail[start:start + 1] == b" ":
            start += 1
        if tail[start:start + 1] != b"{":
            continue
        end = _object_end(tail, start)
        if end is not None:
            with contextlib.suppress(ValueError, RecursionError):  # whatever the backend sent
                usage = _decode_json(tail[start:end])
                if isinstance(usage, dict):
                    return usage
    return None


def _object_end(data: bytes, start: int) -> int | None:
    """The end of the JSON object that opens at data[start] (strings skipped), or None if data cuts it off."""
    depth, i, n = 0, start, len(data)
    while i < n:
        c = data[i]
        if c == 0x22:  # a string: skip to its closing quote
            i += 1
            while i < n and data[i] != 0x22:
                i += 2 if data[i] == 0x5C else 1
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None
