"""A FAKE OpenAI-compatible vLLM backend: no model, no GPU, answers in microseconds.

This is not vLLM. It imitates just enough of a vLLM 0.32 OpenAI server for the router's unit tests and
the router overhead benchmark (``benchmarks/overhead.py``) to run without starting a real engine:

- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI-shaped JSON, or with
  ``"stream": true`` SSE chunks (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``). ``usage`` carries
  ``prompt_tokens_details.cached_tokens: 0``; ``prompt_tokens`` is a rough whitespace word count.
- FAKE ``POST /v1/messages`` (Anthropic) and ``POST /v1/responses`` (OpenAI Responses), whole or streamed as
  vLLM 0.32 streams them (``event: NAME`` + ``data:`` lines; Messages' usage in ``message_delta``, Responses' in
  ``response.completed``, cached tokens 0). Responses are stored (unless ``"store": false``), as vLLM with
  ``VLLM_ENABLE_RESPONSES_API_STORE=1``: ``previous_response_id``, ``GET /v1/responses/{id}`` and
  ``POST /v1/responses/{id}/cancel`` (400: a finished response) answer from this fake's store, and an id it does
  not hold gets vLLM's 404 body. Their streams honour ``fail_mode`` ``"500"``, ``"hang"`` and
  ``"die_mid_stream"`` (the first events, then the drop).
- ``GET /v1/models``, ``GET /health``, ``GET /version``, ``GET /load``, ``POST /tokenize``.
- Echoes (no model): ``POST /v1/embeddings``, ``/pooling``, ``/classify``, ``/score``, ``/rerank`` (and their
  ``/v1``, ``/v2`` forms), ``/detokenize`` answer what they received; ``/v1/audio/transcriptions`` and
  ``/translations`` the upload's size and sha256; ``/v1/load_lora_adapter`` / ``unload_lora_adapter`` add or
  remove an adapter listed in ``/v1/models`` with ``parent`` set, as vLLM does. Counted in ``by_endpoint``.
- ``GET /metrics``: Prometheus text in vLLM 0.32's names and labels (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:cache_config_info{...} 1.0``,
  prefix-cache and token counters).
- Every response carries the header ``x-fake-backend: <name>`` (the port unless a name is given), and
  completion bodies say ``"system_fingerprint": "fake-backend:<name>"``, so tests can see routing.
- Fault injection (``fail_mode``) for generation endpoints: ``"500"`` (HTTP 500 every time),
  ``"die_mid_stream"`` (two SSE chunks, then the connection is dropped; non-streaming requests get half
  a body, then the drop), ``"hang"`` (never answers until the client goes away or the server stops),
  ``"stall_mid_stream"`` (streams: the first chunk, then nothing until the client goes away; non-streaming
  requests hang).
- ``GET /preble/load`` (the Preble plugin's load report: running, waiting, pending_prefill_tokens, decode_batch,
  kv_cache_usage) once ``preble_load`` is turned on (``/_fake/config``); 404 otherwise, as plain vLLM.
- Test hooks (not in vLLM): ``GET /_fake/stats`` (request counts) and ``POST /_fake/config``
  (change ``fail_mode``, ``delay_s``, ``tokens_per_response`` at run time; ``extra_waiting`` and
  ``extra_pending_prefill_tokens``: load another router sent, added to the reported figures; ``preble_load``).

Token ids (``/tokenize``) are crc32 hashes of whitespace-separated words: deterministic across
processes, so two fakes agree, but unrelated to any real tokenizer.

CLI::

    python -m testkit.fake_backend --port 8001 [--model tiny] [--workers N] [--fail-mode 500]

In-process (tests)::

    url, stop = run_fake_backend_in_thread(fail_mode="500")
    ...
    stop()
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import time
import uuid
import zlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from testkit.in_thread import listen_socket, serve_in_thread

try:  # fastest JSON available; the fake must never be the bottleneck of a benchmark
    import orjson as _orjson

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)

    _loads = _orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import msgspec as _msgspec

        _enc = _msgspec.json.Encoder()
        _dumps = _enc.encode
        _loads = _msgspec.json.decode
    except ImportError:

        def _dumps(obj: Any) -> bytes:
            return json.dumps(obj, separators=(",", ":")).encode()

        _loads = json.loads


FAIL_MODES = (None, "500", "die_mid_stream", "hang", "stall_mid_stream")
VOCAB = 32000
MAX_MODEL_LEN = 8192
FAKE_VERSION = "0.32.0+fake"
# Pooling-model endpoints, answered by an echo of the request (no model behind them).
ECHO_PATHS = ("/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank",
              "/v2/rerank", "/detokenize")
ENV_CONFIG = "FAKE_BACKEND_CONFIG"  # JSON kwargs for the multi-worker factory


class FakeBackendAbort(Exception):
    """Raised on purpose to drop a connection mid-response (fail_mode="die_mid_stream")."""


def _is_fake_abort(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    if isinstance(exc, FakeBackendAbort):
        return True
    for sub in getattr(exc, "exceptions", ()) or ():  # ExceptionGroup from anyio task groups
        if _is_fake_abort(sub):
            return True
    return _is_fake_abort(exc.__cause__) or _is_fake_abort(exc.__context__)


class _QuietAbortFilter(logging.Filter):
    """Keeps uvicorn from printing a traceback for every deliberate mid-stream abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_fake_abort(record.exc_info[1]))


def _install_log_filter() -> None:
    for name in ("uvicorn.error", "uvicorn"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _QuietAbortFilter) for f in lg.filters):
            lg.addFilter(_QuietAbortFilter())


def _words(text: str) -> list[str]:
    return text.split()


def _token_ids(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % VOCAB for w in text.split()]


def _prompt_list(prompt: Any) -> list[Any]:
    """vLLM accepts str, list[str], list[int], list[list[int]]; return one entry per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        if not prompt:
            return [""]
        if isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)
    return [""]


def _count_tokens(p: Any) -> int:
    if isinstance(p, str):
        # Rough whitespace word count; str.count is ~10x faster than len(p.split()) on long prompts.
        p = p.strip()
        return (p.count(" ") + p.count("\n") + 1) if p else 0
    if isinstance(p, list):
        return len(p)
    return 0


def _chat_text(messages: Any) -> str:
    parts = []
    for m in messages or []:
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):  # content parts
            parts.extend(x.get("text", "") for x in c if isinstance(x, dict))
    return " ".join(parts)


class FakeState:
    """Mutable per-process state of one fake backend (counters, in-flight, knobs)."""

    def __init__(self, model, block_size, num_gpu_blocks, delay_s, tokens_per_response, fail_mode, name,
                 inter_token_delay_s):
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, got {fail_mode!r}")
        self.model = model
        self.block_size = int(block_size)
        self.num_gpu_blocks = int(num_gpu_blocks)
        self.delay_s = float(delay_s)
        self.inter_token_delay_s = float(inter_token_delay_s)
        self.tokens_per_response = int(tokens_per_response)
        self.fail_mode = fail_mode
        self.name = name  # None: the port, learned from the first request
        self.running = 0
        self.running_blocks = 0
        self.requests_total = 0
        self.completed_total = 0
        self.failed_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.by_endpoint: dict[str, int] = {}
        self.started = time.time()
        self.extra_waiting = 0  # requests "another router" sent: reported, never served
        self.extra_pending_prefill_tokens = 0
        self.preble_load = False  # serve GET /preble/load (the Preble plugin's report)
        self.responses: dict[str, dict[str, Any]] = {}  # the fake Responses store: id -> the response object
        self.loras: dict[str, str] = {}  # LoRA adapters loaded at run time: name -> path

    def backend_name(self, request: Request) -> str:
        if self.name is None:
            server = request.scope.get("server")
            self.name = str(server[1]) if server and server[1] is not None else "fake"
        return self.name

    def begin(self, gen: _Generation) -> None:
        """A generation starts: it runs (and holds its prompt's blocks) until end()."""
        self.running += 1
        self.running_blocks += gen.blocks

    def end(self, gen: _Generation, ok: bool) -> None:
        self.running -= 1
        self.running_blocks -= gen.blocks
        if ok:
            self.completed_total += 1
            self.prompt_tokens_total += gen.prompt_tokens
            self.generation_tokens_total += gen.completion_tokens
        else:
            self.failed_total += 1


# -------------------------------------------------------------------- generation: what one request gets back


class _Generation:
    """One completion (or chat completion) request as the fake answers it: sizes, ids and the OpenAI bodies."""

    def __init__(self, st: FakeState, request: Request, body: dict[str, Any], prompts: list[Any], chat: bool):
        self.chat = chat
        prompt_counts = [_count_tokens(p) for p in prompts]
        self.prompt_tokens = sum(prompt_counts)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        n_out = st.tokens_per_response
        if isinstance(max_tokens, int) and max_tokens >= 0:
            n_out = min(n_out, max_tokens)
        self.n_out = n_out
        self.finish = "length" if isinstance(max_tokens, int) and n_out >= max_tokens else "stop"
        self.model = body.get("model") or st.model
        self.stream = bool(body.get("stream"))
        so = body.get("stream_options") or {}
        self.include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        self.req_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.response_id = "resp_" + self.req_id[-32:]
        self.created = int(time.time())
        self.fp = "fake-backend:" + st.backend_name(request)
        self.blocks = sum(math.ceil(c / st.block_size) for c in prompt_counts) if st.block_size > 0 else 0
        self.n_choices = len(prompts)
        self.completion_tokens = n_out * self.n_choices
        self.usage = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": None,
                                      "multimodal_tokens": None},
        }

    def completion_body(self) -> bytes:
        """The whole non-streaming reply."""
        text = "".join(f" t{i}" for i in range(self.n_out))
        if self.chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text,
                                                "reasoning_content": None, "tool_calls": []},
                        "logprobs": None, "finish_reason": self.finish, "stop_reason": None}]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": self.finish,
                        "stop_reason": None, "prompt_logprobs": None} for i in range(self.n_choices)]
            obj = "text_completion"
        return _dumps({"id": self.req_id, "object": obj, "created": self.created, "model": self.model,
                       "choices": choices, "usage": self.usage, "system_fingerprint": self.fp,
                       "service_tier": None, "prompt_logprobs": None, "kv_transfer_params": None})

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, i: int, piece: str | None, fin: str | None, first: bool = False) -> bytes:
        """One SSE event: choice i's next piece of text (chat: first=True is the role-only delta)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
                delta["content"] = ""
            elif piece is not None:
                delta["content"] = piece
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin,
                        "stop_reason": None}]
        else:
            choices = [{"index": i, "text": piece or "", "logprobs": None, "finish_reason": fin,
                        "stop_reason": None}]
        return b"data: " + _dumps({"id": self.req_id, "object": self.chunk_object, "created": self.created,
                                   "model": self.model, "choices": choices, "system_fingerprint": self.fp}) + b"\n\n"

    def usage_chunk(self) -> bytes:
        return b"data: " + _dumps({"id": self.req_id, "object": self.chunk_object, "created": self.created,
                                   "model": self.model, "choices": [], "usage": self.usage,
                                   "system_fingerprint": self.fp}) + b"\n\n"


async def _sleep_like_generation(st: FakeState, gen: _Generation) -> None:
    """A non-streaming request's wait: prefill, then every token."""
    if st.delay_s > 0:
        await asyncio.sleep(st.delay_s)
    if st.inter_token_delay_s > 0:
        await asyncio.sleep(st.inter_token_delay_s * gen.n_out)


async def _sse_events(st: FakeState, gen: _Generation, mode: str | None):
    """The SSE stream of one request, with the fail mode's breakage; ends the generation in st however it stops."""
    ok = False
    sent = 0
    try:
        if st.delay_s > 0:
            await asyncio.sleep(st.delay_s)
        if gen.chat:
            yield gen.chunk(0, None, None, first=True)
            sent += 1
        per_step = 1 if gen.chat else gen.n_choices
        for t in range(gen.n_out):
            for i in range(per_step):
                if mode == "stall_mid_stream" and sent >= 1:
                    await asyncio.sleep(3600)  # cancelled when the client goes away
                if mode == "die_mid_stream" and sent >= 2:
                    raise FakeBackendAbort("fake backend: fail_mode=die_mid_stream")
                last = t == gen.n_out - 1
                yield gen.chunk(i, f" t{t}", gen.finish if last else None)
                sent += 1
            if st.inter_token_delay_s > 0 and t < gen.n_out - 1:
                await asyncio.sleep(st.inter_token_delay_s)
        if gen.n_out == 0:
            for i in range(per_step):
                yield gen.chunk(i, "", gen.finish)
        if mode == "die_mid_stream":
            raise FakeBackendAbort("fake backend: fail_mode=die_mid_stream")
        if gen.include_usage:
            yield gen.usage_chunk()
        yield b"data: [DONE]\n\n"
        ok = True
    finally:
        st.end(gen, ok)


def _prompts(body: dict[str, Any], chat: bool) -> list[Any] | str:
    """The request's prompts (one entry per choice), or why the body is invalid."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "'messages' must be a list"
        return [_chat_text(messages)]
    if "prompt" not in body:
        return "'prompt' is required"
    return _prompt_list(body.get("prompt"))


# -------------------------------------------------------------------- fake Messages and Responses


def _sse(event: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _messages_body(gen: _Generation) -> dict[str, Any]:
    return {"id": "msg_" + gen.req_id[-24:], "type": "message", "role": "assistant", "model": gen.model,
            "content": [{"type": "text", "text": "".join(f" t{i}" for i in range(gen.n_out))}],
            "stop_reason": "max_tokens" if gen.finish == "length" else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.n_out, "cache_read_input_tokens": 0}}


def _response_body(gen: _Generation, body: dict[str, Any], status: str) -> dict[str, Any]:
    done = status == "completed"
    text = "".join(f" t{i}" for i in range(gen.n_out)) if done else ""
    return {"id": gen.response_id, "object": "response", "created_at": gen.created, "model": gen.model,
            "status": status, "previous_response_id": body.get("previous_response_id"),
            "output": [{"type": "message", "id": "msg_" + gen.req_id[-24:], "role": "assistant", "status": status,
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}] if done else [],
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.n_out,
                      "total_tokens": gen.prompt_tokens + gen.n_out, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}} if done else None}


async def _api_events(st: FakeState, gen: _Generation, body: dict[str, Any], responses: bool, mode: str | None):
    """A fake Messages or Responses stream (vLLM's event names); ends the generation in st however it stops.
    mode "die_mid_stream": the first events, then the connection drops."""
    ok = False
    try:
        if st.delay_s > 0:
            await asyncio.sleep(st.delay_s)
        if responses:
            seq = 0
            yield _sse("response.created", {"type": "response.created", "sequence_number": seq,
                                            "response": _response_body(gen, body, "in_progress")})
            for t in range(gen.n_out):
                seq += 1
                if mode == "die_mid_stream" and t == 1:
                    raise FakeBackendAbort("fake backend: fail_mode=die_mid_stream")
                yield _sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": f" t{t}",
                                                          "output_index": 0, "content_index": 0,
                                                          "sequence_number": seq})
            final = _response_body(gen, body, "completed")
            if body.get("store") is not False:
                st.responses[gen.response_id] = final
            yield _sse("response.completed", {"type": "response.completed", "sequence_number": seq + 1,
                                              "response": final})
        else:
            whole = _messages_body(gen)
            yield _sse("message_start", {"type": "message_start", "message": {
                **whole, "content": [], "stop_reason": None,
                "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0}}})
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
            for t in range(gen.n_out):
                if mode == "die_mid_stream" and t == 1:
                    raise FakeBackendAbort("fake backend: fail_mode=die_mid_stream")
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": f" t{t}"}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": whole["stop_reason"],
                                                                            "stop_sequence": None},
                                         "usage": whole["usage"]})
            yield _sse("message_stop", {"type": "message_stop"})
        ok = True
    finally:
        st.end(gen, ok)


def _response_not_found(response_id: str) -> dict[str, Any]:
    """vLLM 0.32's body for an id it does not hold."""
    return {"error": {"message": f"Response with id '{response_id}' not found.", "type": "invalid_request_error",
                      "param": "response_id", "code": 404}}


def _api_prompt(body: dict[str, Any], responses: bool) -> str:
    """The fake's idea of a Messages or Responses prompt (its words are counted, as for chat), or raises."""
    if responses:
        items = body.get("input")
        if isinstance(items, str):
            return " ".join(filter(None, [body.get("instructions") or "", items]))
        if not isinstance(items, list):
            raise ValueError("'input' must be a string or a list")
        return " ".join(filter(None, [body.get("instructions") or "", _chat_text(items)]))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    system = body.get("system")
    return " ".join(filter(None, [system if isinstance(system, str) else "", _chat_text(messages)]))


# -------------------------------------------------------------------- the other endpoints' bodies


def _metrics_text(st: FakeState) -> str:
    """GET /metrics: Prometheus text with vLLM 0.32's metric names and labels."""
    lbl = f'engine="0",model_name="{st.model}"'
    usage = min(1.0, st.running_blocks / st.num_gpu_blocks) if st.num_gpu_blocks > 0 else 0.0
    cache_labels = ",".join(f'{k}="{v}"' for k, v in (
        ("block_size", st.block_size), ("cache_dtype", "auto"), ("calculate_kv_scales", "False"),
        ("cpu_offload_gb", "0"), ("enable_prefix_caching", "True"), ("engine", "0"),
        ("gpu_memory_utilization", "0.9"), ("hash_block_size", "None"),
        ("is_attention_free", "False"), ("num_cpu_blocks", "None"),
        ("num_gpu_blocks", st.num_gpu_blocks), ("num_gpu_blocks_override", "None"),
        ("prefix_caching_hash_algo", "sha256"), ("sliding_window", "None"), ("swap_space", "4.0"),
    ))
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lbl}}} {float(st.running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lbl}}} {float(st.extra_waiting)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lbl}}} {usage}",
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{lbl}}} {float(st.prompt_tokens_total)}",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{lbl}}} 0.0",
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{lbl}}} {float(st.prompt_tokens_total)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{lbl}}} {float(st.generation_tokens_total)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{{lbl},finished_reason="length"}} {float(st.completed_total)}',
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f"vllm:cache_config_info{{{cache_labels}}} 1.0",
        "",
    ]
    return "\n".join(lines)


def _tokenize_body(body: dict[str, Any]) -> dict[str, Any] | str:
    """POST /tokenize's reply for a JSON object body, or why the body is invalid."""
    if "messages" in body:
        text = _chat_text(body.get("messages"))
    else:
        text = body.get("prompt") or ""
        if not isinstance(text, str):
            return "'prompt' must be a string"
    toks = _token_ids(text)
    out: dict[str, Any] = {"count": len(toks), "max_model_len": MAX_MODEL_LEN, "tokens": toks, "token_strs": None}
    if body.get("return_token_strs"):
        out["token_strs"] = _words(text)
    return out


# -------------------------------------------------------------------- the app


class _FakeBackend:
    """The endpoints of one fake backend over its FakeState (see the module docstring)."""

    def __init__(self, st: FakeState):
        self.st = st

    # ---- replies

    def headers(self, request: Request) -> dict[str, str]:
        out = {"x-fake-backend": self.st.backend_name(request)}
        if request.headers.get("x-fake-set-cookie"):  # for proxies' tests: set a cookie, echo what came in
            out["set-cookie"] = "fake-session=secret; Path=/"
            out["x-fake-got-cookie"] = request.headers.get("cookie", "")
        return out

    def json_response(self, request: Request, obj: Any, status: int = 200) -> Response:
        return Response(_dumps(obj), status_code=status, media_type="application/json",
                        headers=self.headers(request))

    def error(self, request: Request, status: int, msg: str, typ: str = "BadRequestError") -> Response:
        return self.json_response(request, {"error": {"message": msg, "type": typ, "param": None,
                                                      "code": status}}, status)

    @staticmethod
    async def hang(request: Request) -> Response:
        # Never answer; return (to free the task) once the client has gone away.
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return Response(status_code=499)

    # ---- generation

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def counted_body(self, request: Request, endpoint: str) -> dict | Response:
        """A generation request counted under `endpoint`, its JSON object body or a 400 (counted failed)."""
        st = self.st
        st.requests_total += 1
        st.by_endpoint[endpoint] = st.by_endpoint.get(endpoint, 0) + 1
        try:
            body = _loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
        except Exception as e:  # noqa: BLE001
            st.failed_total += 1
            return self.error(request, 400, f"invalid JSON body: {e}")
        return body

    async def generate(self, request: Request, chat: bool) -> Response:
        st = self.st
        body = await self.counted_body(request, "chat" if chat else "completions")
        if isinstance(body, Response):
            return body

        mode = st.fail_mode
        if mode == "500":
            st.failed_total += 1
            return self.error(request, 500, "fake backend: fail_mode=500", "InternalServerError")
        if mode == "hang" or (mode == "stall_mid_stream" and not body.get("stream")):
            return await self.hang(request)

        prompts = _prompts(body, chat)
        if isinstance(prompts, str):
            st.failed_total += 1
            return self.error(request, 400, prompts)
        gen = _Generation(st, request, body, prompts, chat)
        st.begin(gen)
        if gen.stream:
            return StreamingResponse(_sse_events(st, gen, mode), media_type="text/event-stream; charset=utf-8",
                                     headers=self.headers(request))
        try:
            await _sleep_like_generation(st, gen)
        except BaseException:
            st.end(gen, False)
            raise
        payload = gen.completion_body()
        if mode == "die_mid_stream":
            st.end(gen, False)
            return _TruncatedResponse(payload, self.headers(request))
        st.end(gen, True)
        return Response(payload, media_type="application/json", headers=self.headers(request))

    # ---- fake Messages and Responses

    async def messages(self, request: Request) -> Response:
        return await self.api_generate(request, responses=False)

    async def responses_create(self, request: Request) -> Response:
        return await self.api_generate(request, responses=True)

    async def api_generate(self, request: Request, responses: bool) -> Response:
        st = self.st
        body = await self.counted_body(request, "responses" if responses else "messages")
        if isinstance(body, Response):
            return body
        try:
            prompt = _api_prompt(body, responses)
        except Exception as e:  # noqa: BLE001
            st.failed_total += 1
            return self.error(request, 400, f"invalid request: {e}")
        if st.fail_mode == "500":
            st.failed_total += 1
            return self.error(request, 500, "fake backend: fail_mode=500", "InternalServerError")
        if st.fail_mode == "hang":
            return await self.hang(request)
        previous = body.get("previous_response_id") if responses else None
        if previous is not None and previous not in st.responses:
            st.failed_total += 1
            return self.json_response(request, _response_not_found(str(previous)), 404)
        limit = body.get("max_output_tokens") if responses else body.get("max_tokens")
        gen = _Generation(st, request, {**body, "max_tokens": limit}, [prompt], chat=True)
        st.begin(gen)
        if gen.stream:
            return StreamingResponse(_api_events(st, gen, body, responses, st.fail_mode),
                                     media_type="text/event-stream; charset=utf-8", headers=self.headers(request))
        try:
            await _sleep_like_generation(st, gen)
        except BaseException:
            st.end(gen, False)
            raise
        st.end(gen, True)
        if not responses:
            return self.json_response(request, _messages_body(gen))
        whole = _response_body(gen, body, "completed")
        if body.get("store") is not False:
            st.responses[gen.response_id] = whole
        return self.json_response(request, whole)

    async def response_retrieve(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        stored = self.st.responses.get(response_id)
        if stored is None:
            return self.json_response(request, _response_not_found(response_id), 404)
        return self.json_response(request, stored)

    async def response_cancel(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if response_id not in self.st.responses:
            return self.json_response(request, _response_not_found(response_id), 404)
        return self.json_response(request, {"error": {"message": "Cannot cancel a synchronous response.",
                                                      "type": "invalid_request_error", "param": "response_id",
                                                      "code": 400}}, 400)

    # ---- info endpoints

    async def health(self, request: Request) -> Response:
        return Response(b"", headers=self.headers(request))

    async def version(self, request: Request) -> Response:
        return self.json_response(request, {"version": FAKE_VERSION})

    async def load(self, request: Request) -> Response:
        return self.json_response(request, {"server_load": self.st.running})

    async def preble_load(self, request: Request) -> Response:
        st = self.st
        if not st.preble_load:
            return self.error(request, 404, "Not Found", "NotFound")
        return self.json_response(request, {
            "time": time.time(), "running": st.running, "waiting": st.extra_waiting, "decode_batch": st.running,
            "prefill_batch": 0, "pending_prefill_tokens": st.extra_pending_prefill_tokens,
            "kv_cache_usage": min(1.0, st.running_blocks / st.num_gpu_blocks) if st.num_gpu_blocks > 0 else 0.0})

    async def models(self, request: Request) -> Response:
        st = self.st
        return self.json_response(request, {"object": "list", "data": [{
            "id": st.model, "object": "model", "created": int(st.started), "owned_by": "vllm",
            "root": st.model, "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": []}] + [{
            "id": name, "object": "model", "created": int(st.started), "owned_by": "vllm", "root": path,
            "parent": st.model, "max_model_len": MAX_MODEL_LEN, "permission": []} for name, path in st.loras.items()]})

    def count(self, key: str) -> None:
        self.st.by_endpoint[key] = self.st.by_endpoint.get(key, 0) + 1

    async def echo(self, request: Request) -> Response:
        """Embeddings, pooling, score, rerank...: what came in, and from whom (no real output). Honours
        fail_mode "500"; ``fake_sleep_s`` in the body holds the reply that long."""
        self.count(request.url.path)
        raw = await request.body()
        if self.st.fail_mode == "500":
            return self.error(request, 500, "fake backend: fail_mode=500", "InternalServerError")
        try:
            body = _loads(raw)
        except Exception as e:  # noqa: BLE001
            return self.error(request, 400, f"invalid JSON body: {e}")
        if isinstance(body, dict) and body.get("fake_sleep_s"):
            await asyncio.sleep(float(body["fake_sleep_s"]))
        return self.json_response(request, {"object": "fake.echo", "path": request.url.path,
                                            "backend": self.st.backend_name(request), "body": body})

    async def upload(self, request: Request) -> Response:
        """Audio: the upload's size and sha256 as received, and whether it came chunked."""
        self.count(request.url.path)
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return self.json_response(request, {"text": "fake transcript", "bytes": size, "sha256": digest.hexdigest(),
                                            "content_type": request.headers.get("content-type", ""),
                                            "chunked": "chunked" in request.headers.get("transfer-encoding", "")})

    async def lora(self, request: Request) -> Response:
        """/v1/load_lora_adapter and /v1/unload_lora_adapter as vLLM answers them (text on success, 400 on a
        repeat or an unknown name); fail_mode "500" fails them."""
        self.count(request.url.path)
        if self.st.fail_mode == "500":
            return self.error(request, 500, "fake backend: fail_mode=500", "InternalServerError")
        try:
            body = _loads(await request.body())
            name = body["lora_name"]
        except Exception as e:  # noqa: BLE001
            return self.error(request, 400, f"invalid body: {e}")
        loading = request.url.path.endswith("/load_lora_adapter")
        if loading == (name in self.st.loras):
            return self.error(request, 400, f"The lora adapter '{name}' has {'already been' if loading else 'not been'}"
                              " loaded.", "InvalidUserInput")
        if loading:
            self.st.loras[name] = str(body.get("lora_path", ""))
        else:
            del self.st.loras[name]
        return Response(f"Success: LoRA adapter '{name}' {'added' if loading else 'removed'} successfully.",
                        media_type="text/plain", headers=self.headers(request))

    async def tokenize(self, request: Request) -> Response:
        try:
            body = _loads(await request.body())
        except Exception as e:  # noqa: BLE001
            return self.error(request, 400, f"invalid JSON body: {e}")
        if not isinstance(body, dict):
            return self.error(request, 400, "body must be a JSON object")
        out = _tokenize_body(body)
        if isinstance(out, str):
            return self.error(request, 400, out)
        return self.json_response(request, out)

    async def metrics(self, request: Request) -> Response:
        return Response(_metrics_text(self.st), media_type="text/plain; version=0.0.4; charset=utf-8",
                        headers=self.headers(request))

    # ---- test hooks (not vLLM)

    async def fake_stats(self, request: Request) -> Response:
        st = self.st
        return self.json_response(request, {
            "name": st.backend_name(request), "running": st.running, "requests_total": st.requests_total,
            "completed_total": st.completed_total, "failed_total": st.failed_total,
            "by_endpoint": st.by_endpoint, "fail_mode": st.fail_mode, "pid": os.getpid()})

    async def fake_config(self, request: Request) -> Response:
        st = self.st
        try:
            body = _loads(await request.body())
        except Exception as e:  # noqa: BLE001
            return self.error(request, 400, f"invalid JSON body: {e}")
        if "fail_mode" in body:
            if body["fail_mode"] not in FAIL_MODES:
                return self.error(request, 400, f"fail_mode must be one of {FAIL_MODES}")
            st.fail_mode = body["fail_mode"]
        for k in ("delay_s", "inter_token_delay_s"):
            if k in body:
                setattr(st, k, float(body[k]))
        if "tokens_per_response" in body:
            st.tokens_per_response = int(body["tokens_per_response"])
        for k in ("extra_waiting", "extra_pending_prefill_tokens"):
            if k in body:
                setattr(st, k, int(body[k]))
        if "preble_load" in body:
            st.preble_load = bool(body["preble_load"])
        return await self.fake_stats(request)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/responses", self.responses_create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.response_retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}/cancel", self.response_cancel, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ping", self.health, methods=["GET", "POST"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/load", self.load, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/preble/load", self.preble_load, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            *(Route(p, self.echo, methods=["POST"]) for p in ECHO_PATHS),
            Route("/v1/audio/transcriptions", self.upload, methods=["POST"]),
            Route("/v1/audio/translations", self.upload, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.lora, methods=["POST"]),
            Route("/_fake/stats", self.fake_stats, methods=["GET"]),
            Route("/_fake/config", self.fake_config, methods=["POST"]),
        ]


def make_fake_backend_app(
    model: str = "tiny",
    block_size: int = 32,
    num_gpu_blocks: int = 4096,
    delay_s: float = 0.0,
    tokens_per_response: int = 8,
    fail_mode: str | None = None,
    name: str | None = None,
    inter_token_delay_s: float = 0.0,
) -> Starlette:
    """Build the FAKE vLLM backend as a Starlette app (see module docstring).

    delay_s: wait before the first token (a stand-in for prefill); inter_token_delay_s: between
    streamed tokens. name: value of ``x-fake-backend`` (default: the port the request came in on).
    """
    _install_log_filter()
    st = FakeState(model, block_size, num_gpu_blocks, delay_s, tokens_per_response, fail_mode, name,
                   inter_token_delay_s)
    app = Starlette(routes=_FakeBackend(st).routes())
    app.state.fake = st
    return app


class _TruncatedResponse(Response):
    """Announces the full Content-Length, sends half the body, then drops the connection."""

    def __init__(self, payload: bytes, headers: dict[str, str]):
        super().__init__(payload, media_type="application/json", headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2],
                    "more_body": True})
        raise FakeBackendAbort("fake backend: fail_mode=die_mid_stream (non-streaming)")


# -------------------------------------------------------------------- running it


def _app_from_env() -> Starlette:
    """uvicorn factory for --workers N: kwargs come from $FAKE_BACKEND_CONFIG."""
    return make_fake_backend_app(**json.loads(os.environ.get(ENV_CONFIG, "{}")))


def _uvicorn_fast_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = {"access_log": False, "log_level": "warning", "lifespan": "off"}
    try:
        import uvloop  # noqa: F401

        kw["loop"] = "uvloop"
    except ImportError:
        kw["loop"] = "asyncio"
    try:
        import httptools  # noqa: F401

        kw["http"] = "httptools"
    except ImportError:
        kw["http"] = "h11"
    return kw


def run_fake_backend_in_thread(host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 10.0,
                               **kwargs: Any):
    """Serve a fake backend from a uvicorn.Server in a daemon thread (port 0: a free port).

    Returns (url, stop_fn). kwargs go to make_fake_backend_app (name defaults to the port).
    """
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    kwargs.setdefault("name", str(port))
    app = make_fake_backend_app(**kwargs)
    kw = _uvicorn_fast_kwargs()
    kw["loop"] = "asyncio"  # uvloop policy in a non-main thread is fine, but asyncio is the safe choice
    stop = serve_in_thread(app, sock, name=f"fake-backend-{port}", ready_timeout=ready_timeout, host=host, port=port,
                           timeout_graceful_shutdown=1, **kw)
    url = f"http://{host}:{port}"
    app.state.url = url
    return url, stop


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description="FAKE OpenAI-compatible vLLM backend (no model).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--name", default=None, help="x-fake-backend value (default: the port)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--num-gpu-blocks", type=int, default=4096)
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--inter-token-delay-s", type=float, default=0.0)
    ap.add_argument("--tokens-per-response", type=int, default=8)
    ap.add_argument("--fail-mode", choices=[m for m in FAIL_MODES if m], default=None)
    a = ap.parse_args(argv)
    cfg = {"model": a.model, "block_size": a.block_size, "num_gpu_blocks": a.num_gpu_blocks,
           "delay_s": a.delay_s, "tokens_per_response": a.tokens_per_response, "fail_mode": a.fail_mode,
           "name": a.name or str(a.port), "inter_token_delay_s": a.inter_token_delay_s}
    kw = _uvicorn_fast_kwargs()
    _install_log_filter()
    if a.workers > 1:
        os.environ[ENV_CONFIG] = json.dumps(cfg)
        uvicorn.run("testkit.fake_backend:_app_from_env", factory=True, host=a.host, port=a.port,
                    workers=a.workers, timeout_graceful_shutdown=2, **kw)
    else:
        uvicorn.run(make_fake_backend_app(**cfg), host=a.host, port=a.port, timeout_graceful_shutdown=2, **kw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
