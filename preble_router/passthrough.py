"""Forwarding the requests the router does not prefix-route: the rest of vLLM's API.

Two kinds, one table each (ENDPOINTS, FAN_OUT): adding an endpoint is one line.

- Balanced: the request goes to the least-loaded healthy backend (by the merged load view's requests in flight,
  then pending prefill tokens) that serves its model, and counts there in the load tracker while in flight, so
  prefix-aware routing sees it. A backend that fails before answering (transport error, 5xx) is marked down and
  another is tried, up to --max-attempts; the reply is relayed as it comes, status, headers and body as the
  backend gave them. JSON bodies are read whole and checked as completions' are (size 413, malformed 400, a
  non-string model 400, an unknown model 404). Multipart uploads (audio) are streamed to the backend as they
  arrive, never held whole (413 from Content-Length, or from a running count once past --max-body-bytes); their
  model is a form field the router does not parse, so they go to the least-loaded healthy backend of all, and
  an upload already sent is never retried (it is not kept).
- Fanned out (LoRA adapters): the request goes to every healthy backend serving the router's model (all healthy
  ones if none lists it) at once; the reply lists each backend's status and body. 200 when every backend
  answered 2xx; else the first failing backend's status (in backend order; 502 for one that could not be
  reached), with an OpenAI-style error beside the per-backend detail, so a client sees one failure and can
  read which backends did take the change. Every backend is then probed again, so /v1/models and the
  router's LoRA list follow at once.

Not under --max-concurrency's slots: these are short, and none holds an engine's generation slot for long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from preble_router.backends import Backend, mark_failure, probe_backend
from preble_router.errors import error_body, error_response
from preble_router.load import InFlight
from preble_router.served_models import ServedModels

if TYPE_CHECKING:
    from preble_router.proxy import Proxy

log = logging.getLogger(__name__)

JSON, MULTIPART, NONE = "json", "multipart", "none"


@dataclass(frozen=True)
class Endpoint:
    path: str
    methods: tuple[str, ...]
    body: str  # JSON (read whole, checked, model-filtered), MULTIPART (streamed through), NONE


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/embeddings", ("POST",), JSON),
    Endpoint("/pooling", ("POST",), JSON),
    Endpoint("/classify", ("POST",), JSON),
    Endpoint("/score", ("POST",), JSON),
    Endpoint("/v1/score", ("POST",), JSON),
    Endpoint("/rerank", ("POST",), JSON),
    Endpoint("/v1/rerank", ("POST",), JSON),
    Endpoint("/v2/rerank", ("POST",), JSON),
    Endpoint("/tokenize", ("POST",), JSON),
    Endpoint("/detokenize", ("POST",), JSON),
    Endpoint("/v1/audio/transcriptions", ("POST",), MULTIPART),
    Endpoint("/v1/audio/translations", ("POST",), MULTIPART),
    Endpoint("/version", ("GET",), NONE),
)

# Sent to every backend (under /v1/: behind --api-key).
FAN_OUT: tuple[str, ...] = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class _TooLarge(Exception):
    pass


class Passthrough:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def routes(self) -> list[Route]:
        routes = [Route(e.path, self._balanced_handler(e), methods=list(e.methods)) for e in ENDPOINTS]
        routes += [Route(path, self._fan_out_handler(path), methods=["POST"]) for path in FAN_OUT]
        return routes

    def _balanced_handler(self, endpoint: Endpoint):  # noqa: ANN202 (a Starlette endpoint)
        async def handle(request: Request) -> Any:
            return await self.balanced(request, endpoint)
        return handle

    def _fan_out_handler(self, path: str):  # noqa: ANN202
        async def handle(request: Request) -> Any:
            return await self.fan_out(request, path)
        return handle

    # ---- balanced ---------------------------------------------------------------------------------------
    def candidates(self, model: str | None, exclude: set[int]) -> list[Backend]:
        """Healthy backends not in exclude that serve `model` (served_models.py: all when no backend lists it;
        none when its backends are all down), least loaded first by the merged load view."""
        router = self.proxy.router
        serving = ServedModels.eligible(model, list(router.backends.values()))
        healthy = [b for b in serving if b.healthy and b.backend_id not in exclude]
        now = router.clock()

        def load(b: Backend) -> tuple[int, int]:
            view = router.load.view(b.backend_id, now)
            return view.in_flight, view.pending_prefill_tokens

        return sorted(healthy, key=load)  # stable: ties keep backend order

    async def balanced(self, request: Request, endpoint: Endpoint) -> Any:
        from preble_router.proxy import _forwarded_headers, _invalid_fields

        proxy = self.proxy
        limit = proxy.config.max_body_bytes
        model = None
        body: bytes | AsyncIterator[bytes] = b""
        length: int | None = None
        if endpoint.body == JSON:
            parsed = await proxy._parse(request)
            if isinstance(parsed, Response):
                return parsed
            fields, body = parsed
            if (invalid := _invalid_fields(fields)) is not None:
                return invalid
            model = fields.get("model")
            if model is not None and not proxy.router.knows_model(model):
                return error_response(404, f"The model `{model}` does not exist.", "model_not_found", "model")
        elif endpoint.body == MULTIPART:
            declared = request.headers.get("content-length")
            if declared is not None:
                if not (declared.isascii() and declared.isdigit()):
                    return error_response(400, "invalid Content-Length", "invalid_request")
                length = int(declared)
                if length > limit:
                    return _too_large(limit)
            body = _streamed_body(request, limit)
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        headers = _forwarded_headers(request.scope["headers"], proxy.config.backend_api_key)
        if endpoint.body == NONE:
            headers = [(n, v) for n, v in headers if n != b"content-type"]
        streamed = endpoint.body == MULTIPART
        tried: set[int] = set()
        last_error = "no healthy backend"
        for attempt in range(proxy.config.max_attempts):
            ranked = self.candidates(model, tried)
            if not ranked:
                break
            backend = ranked[0]
            tried.add(backend.backend_id)
            inflight = self._begin(backend)
            assert proxy.upstream is not None
            try:
                resp = await proxy.upstream.request(request.method, backend.url, path, headers, body,
                                                    body_length=length)
            except _TooLarge:
                self._finish(inflight, backend, endpoint, 413)
                return _too_large(limit)
            except ClientDisconnect:
                self._finish(inflight, backend, endpoint, 499)
                return Response(status_code=499)
            except (*_transport_errors(),) as exc:
                self._finish(inflight, backend, endpoint, 502)
                last_error = self._failed(backend, f"{type(exc).__name__} {exc}".strip())
                if streamed:  # the upload went (in part) to that backend and is not kept: nothing to resend
                    break
                continue
            if resp.status >= 500 and not streamed and attempt + 1 < proxy.config.max_attempts:
                try:
                    detail = (await resp.read_any())[:500].decode(errors="replace")
                except (*_transport_errors(),):
                    detail = ""
                resp.close()
                self._finish(inflight, backend, endpoint, resp.status)
                proxy.metrics.errors.labels(backend.url, f"http_{resp.status}").inc()
                last_error = f"backend {backend.url} answered {resp.status}: {detail}"
                continue
            return self._relay(resp, inflight, backend, endpoint, attempt)
        if not tried:
            return error_response(503, "no healthy backend", "no_healthy_backend")
        return error_response(502, f"all backends failed; last error: {last_error}", "backend_failure")

    def _relay(self, resp: Any, inflight: InFlight, backend: Backend, endpoint: Endpoint, attempt: int) -> Any:
        from preble_router.proxy import _RelayResponse, _relayed_headers

        transport_errors = _transport_errors()

        async def chunks() -> AsyncIterator[bytes]:
            status = 499
            try:
                while chunk := await resp.read_any():
                    yield chunk
                status = resp.status
            except transport_errors as exc:  # cut off mid-reply: the client sees a truncated body
                status = 502
                mark_failure(backend, str(exc) or type(exc).__name__)
                self.proxy.metrics.errors.labels(backend.url, "mid_reply").inc()
            finally:
                if status == resp.status:
                    resp.release()
                else:
                    resp.close()
                self._finish(inflight, backend, endpoint, status)

        extra = [(b"x-preble-backend", backend.url.encode("latin-1")),
                 (b"x-preble-attempts", b"%d" % (attempt + 1))]
        relay = _RelayResponse(chunks(), resp.status, _relayed_headers(resp.headers, extra))

        def abandon() -> None:  # the client left before the relay began
            resp.close()
            self._finish(inflight, backend, endpoint, 499)

        relay.on_close.append(abandon)
        return relay

    def _begin(self, backend: Backend) -> InFlight:
        """Counted as a request in flight there (no prompt blocks, no prefill tokens), until _finish."""
        router = self.proxy.router
        inflight = router.load.begin(backend.backend_id, 0, router.clock())
        inflight.backend = backend
        return inflight

    def _finish(self, inflight: InFlight, backend: Backend, endpoint: Endpoint, status: int) -> None:
        if inflight.done:
            return
        self.proxy.router.load.finish(inflight, self.proxy.router.clock(), ok=status < 400)
        self.proxy.metrics.child(self.proxy.metrics.requests, backend.url, endpoint.path, str(status)).inc()

    def _failed(self, backend: Backend, reason: str) -> str:
        message = f"backend {backend.url} failed: {reason}"
        mark_failure(backend, message)
        self.proxy.metrics.errors.labels(backend.url, reason.split(" ", 1)[0]).inc()
        if self.proxy.probes is not None:  # let the health loop re-admit it as soon as it answers again
            asyncio.get_running_loop().create_task(probe_backend(self.proxy.probes, backend))
        return message

    # ---- fanned out ----------------------------------------------------------------------------------------
    async def fan_out(self, request: Request, path: str) -> Response:
        from preble_router.proxy import _forwarded_headers

        proxy = self.proxy
        parsed = await proxy._parse(request)
        if isinstance(parsed, Response):
            return parsed
        _, raw = parsed
        targets = [b for b in ServedModels.eligible(proxy.router.model, list(proxy.router.backends.values()))
                   if b.healthy]
        if not targets:
            return error_response(503, "no healthy backend", "no_healthy_backend")
        headers = _forwarded_headers(request.scope["headers"], proxy.config.backend_api_key)
        results = await asyncio.gather(*(self._send_one(b, path, headers, raw) for b in targets))
        if proxy.probes is not None:  # their model lists changed: /v1/models and lora_models follow now
            await asyncio.gather(*(probe_backend(proxy.probes, b) for b in targets))
        per_backend = {b.url: {"status": status, "body": body} for b, (status, body) in zip(targets, results)}
        failed = [status for status, _ in results if not 200 <= status < 300]
        if not failed:
            return JSONResponse({"backends": per_backend})
        status = failed[0]
        reply = error_body(status, f"{len(failed)} of {len(targets)} backends failed {path}", "fan_out_failed")
        reply["backends"] = per_backend
        return JSONResponse(reply, status_code=status)

    async def _send_one(self, backend: Backend, path: str, headers: list[tuple[bytes, bytes]],
                        raw: bytes) -> tuple[int, Any]:
        """(status, body: JSON when it parses, else text) of one backend; 502 and the error if unreachable."""
        assert self.proxy.upstream is not None
        try:
            resp = await asyncio.wait_for(self.proxy.upstream.post(backend.url, path, headers, raw),
                                          self.proxy.config.request_timeout)
            content = await resp.read()
        except (*_transport_errors(),) as exc:
            return 502, f"backend unreachable: {type(exc).__name__} {exc}".strip()
        try:
            return resp.status, msgspec.json.decode(content)
        except msgspec.DecodeError:
            return resp.status, content.decode(errors="replace")


def _too_large(limit: int) -> Response:
    return error_response(413, f"request body exceeds {limit} bytes", "payload_too_large")


def _transport_errors() -> tuple[type[BaseException], ...]:
    from preble_router.proxy import _TRANSPORT_ERRORS
    return _TRANSPORT_ERRORS


async def _streamed_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The client's body as it arrives, raising _TooLarge once past `limit` bytes."""
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        yield chunk
        if not message.get("more_body", False):
            return
