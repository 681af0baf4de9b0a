"""Open-loop async load generator for any OpenAI-compatible endpoint (a vLLM server or the router).

Each request is sent at its arrival time (relative to the start of the run), whatever the server is doing
(open loop), except that a request with ``depends_on`` waits until that request has completed (an agent's
next step); it is then sent at max(arrival, completion of the dependency).

The request is ``POST {url}/v1/completions`` with the prompt as token ids (vLLM accepts ``prompt: [ids]``,
so no tokenizer is involved and equal prefixes stay equal token sequences), ``max_tokens`` = the request's
output tokens, ``ignore_eos: true`` (the asked length is produced), ``stream: true`` with
``stream_options: {"include_usage": true}``.

Recorded per request (a dict, see report.py): start (seconds since the run began), TTFT, the time of every
streamed chunk (``token_times``, seconds after start), end-to-end latency, the HTTP status, the error
(timeouts, transport failures, HTTP errors, streams that end without ``[DONE]`` or carry an error event:
every request yields a record), the router's ``x-preble-backend`` / ``x-preble-matched-tokens`` /
``x-preble-decision`` headers when present, and ``usage`` (prompt, completion and
``prompt_tokens_details.cached_tokens``; vLLM reports the latter only with
``--enable-prompt-tokens-details``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from benchmarks.report import summarize
from benchmarks.workloads import Request, tokens_to_text

ROUTER_HEADERS = {"x-preble-backend": "backend", "x-preble-matched-tokens": "matched_tokens",
                  "x-preble-decision": "decision"}


async def discover_model(client: httpx.AsyncClient, url: str, timeout: float = 10.0) -> str:
    """The first model the server lists at /v1/models."""
    r = await client.get(f"{url}/v1/models", timeout=timeout)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return str(data[0]["id"])


def request_path(r: Request) -> str:
    """Where the request goes: chat completions for a request with messages, else completions."""
    return "/v1/chat/completions" if r.messages is not None else "/v1/completions"


def request_body(r: Request, model: str, prompt_format: str = "ids",
                 extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body send_one sends for r (streamed, usage included, exactly output_tokens generated)."""
    body: dict[str, Any] = {"model": model}
    if r.messages is not None:
        body["messages"] = r.messages
    elif prompt_format == "text":
        body["prompt"] = r.text if r.text is not None else tokens_to_text(r.tokens)
    else:
        body["prompt"] = r.tokens
    body.update({
        "max_tokens": int(r.output_tokens),
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    if extra_body:
        body.update(extra_body)
    return body


async def send_one(client: httpx.AsyncClient, url: str, r: Request, model: str, *, t0: float, timeout: float,
                   prompt_format: str = "ids", extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send one request now; always returns a record, never raises (except on cancellation)."""
    body = request_body(r, model, prompt_format, extra_body)
    start = time.perf_counter()
    rec: dict[str, Any] = {
        "id": r.id, "group": r.group, "depends_on": r.depends_on, "arrival": r.arrival, "start": start - t0,
        "end": None, "ttft": None, "latency": None, "token_times": [], "status": None,
        "prompt_tokens": r.prompt_tokens, "cached_tokens": None, "output_tokens": 0,
        "expected_output_tokens": r.output_tokens, "backend": None, "matched_tokens": None, "decision": None,
        "error": None,
    }
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url + request_path(r), json=body, timeout=timeout) as resp:
            rec["status"] = resp.status_code
            for header, key in ROUTER_HEADERS.items():
                value = resp.headers.get(header)
                if value is not None:
                    rec[key] = int(value) if key == "matched_tokens" and value.lstrip("-").isdigit() else value
            if resp.status_code >= 400:
                detail = (await resp.aread())[:300].decode(errors="replace")
                rec["error"] = f"HTTP {resp.status_code}: {detail}"
            else:
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        rec["error"] = f"bad SSE chunk: {data[:200]}"
                        break
                    if isinstance(obj, dict) and obj.get("error"):
                        err = obj["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        rec["error"] = f"error event: {msg}"
                        break
                    if obj.get("choices") and not _role_only(obj):
                        chunks += 1
                        rec["token_times"].append(now - start)
                        if rec["ttft"] is None:
                            rec["ttft"] = now - start
                    if obj.get("usage"):
                        usage = obj["usage"]
                if not done and rec["error"] is None:
                    rec["error"] = "stream ended without [DONE]"
    except httpx.TimeoutException as exc:
        rec["error"] = f"timeout ({type(exc).__name__}) after {time.perf_counter() - start:.1f}s"
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
    except Exception as exc:  # noqa: BLE001 - a record must come back whatever happened
        rec["error"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
    end = time.perf_counter()
    if usage:
        rec["prompt_tokens"] = usage.get("prompt_tokens", rec["prompt_tokens"])
        rec["output_tokens"] = usage.get("completion_tokens", chunks)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            rec["cached_tokens"] = int(details["cached_tokens"])
    else:
        rec["output_tokens"] = chunks
    if rec["error"] is None:
        rec["end"] = end - t0
        rec["latency"] = end - start
    else:
        rec["failed_after"] = end - start
    return rec


def _role_only(chunk: dict[str, Any]) -> bool:
    """A chat stream's opening chunk: the assistant role and no token yet (not a first token)."""
    delta = chunk["choices"][0].get("delta") if isinstance(chunk["choices"][0], dict) else None
    return isinstance(delta, dict) and "role" in delta and not delta.get("content")


async def run_load(requests: Sequence[Request], url: str | Sequence[str], *, model: str | None = None,
                   timeout: float = 600.0,
                   progress: bool = True, prompt_format: str = "ids", extra_body: dict[str, Any] | None = None,
                   max_connections: int = 4096, client: httpx.AsyncClient | None = None) -> list[dict[str, Any]]:
    """Replay `requests` (arrival times set) against url, open loop; one record per request, in input order.
    Several urls (routers side by side): the k-th request to arrive goes to urls[k % len(urls)]."""
    urls = [url.rstrip("/")] if isinstance(url, str) else [u.rstrip("/") for u in url]
    url = urls[0]
    own_client = client is None
    if client is None:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections,
                                                       max_keepalive_connections=max_connections),
                                   timeout=httpx.Timeout(timeout, pool=None))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="requests", unit="req")
    try:
        if model is None:
            model = await discover_model(client, url)
        ids = {r.id for r in requests}
        finished: dict[str, asyncio.Event] = {r.id: asyncio.Event() for r in requests}
        results: dict[str, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        async def task(r: Request, url: str) -> None:
            try:
                if r.depends_on is not None and r.depends_on in ids:
                    await finished[r.depends_on].wait()
                results[r.id] = await send_one(client, url, r, model, t0=t0, timeout=timeout,
                                               prompt_format=prompt_format, extra_body=extra_body)
            except Exception as exc:  # noqa: BLE001 - defensive: send_one already catches
                results[r.id] = {"id": r.id, "start": time.perf_counter() - t0, "error": repr(exc), "ttft": None,
                                 "latency": None, "end": None, "prompt_tokens": r.prompt_tokens,
                                 "cached_tokens": None, "output_tokens": 0}
            finally:
                finished[r.id].set()
                if bar is not None:
                    bar.update(1)

        tasks = []
        for k, r in enumerate(sorted(requests, key=lambda q: q.arrival)):
            delay = t0 + r.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(task(r, urls[k % len(urls)])))
        await asyncio.gather(*tasks)
    finally:
        if bar is not None:
            bar.close()
        if own_client:
            await client.aclose()
    return [results[r.id] for r in requests]


def run_load_sync(requests: Sequence[Request], url: str | Sequence[str], **kw: Any) -> list[dict[str, Any]]:
    return asyncio.run(run_load(requests, url, **kw))


def live_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    s = summarize(records)
    backends: dict[str, int] = {}
    decisions: dict[str, int] = {}
    for r in records:
        if r.get("backend"):
            backends[r["backend"]] = backends.get(r["backend"], 0) + 1
        if r.get("decision"):
            decisions[r["decision"]] = decisions.get(r["decision"], 0) + 1
    errors: dict[str, int] = {}
    for r in records:
        if r.get("error"):
            kind = str(r["error"]).split(":")[0][:60]
            errors[kind] = errors.get(kind, 0) + 1
    s.update({"backends": backends, "decisions": decisions, "error_kinds": errors})
    # Through our router: how far its index's prediction (matched tokens, at dispatch) was from what vLLM found
    # cached (at prefill). Over: blocks claimed that the engine had evicted, or not stored yet; under: blocks held
    # that the index did not know of (another router's, or events not yet applied).
    judged = [r for r in records if isinstance(r.get("matched_tokens"), int) and r.get("cached_tokens") is not None]
    if judged:
        s["over_predicted_tokens"] = sum(max(0, r["matched_tokens"] - r["cached_tokens"]) for r in judged)
        s["under_predicted_tokens"] = sum(max(0, r["cached_tokens"] - r["matched_tokens"]) for r in judged)
    if backends:  # live: max/mean of requests per backend (busy time is not observable from outside)
        counts = list(backends.values())
        s["imbalance"] = max(counts) / (sum(counts) / len(counts))
    return s


async def reset_prefix_caches(urls: Sequence[str], timeout: float = 10.0) -> dict[str, str]:
    """POST /reset_prefix_cache to each vLLM server (needs VLLM_SERVER_DEV_MODE=1 there); best effort."""
    out = {}
    async with httpx.AsyncClient(timeout=timeout) as client:
        for u in urls:
            try:
                r = await client.post(f"{u.rstrip('/')}/reset_prefix_cache")
                out[u] = str(r.status_code)
            except httpx.HTTPError as exc:
                out[u] = f"failed: {type(exc).__name__}"
    return out
