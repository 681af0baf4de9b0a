"""Fuzz the router: generated bodies (JSON-ish and raw bytes), headers, paths and methods, sent over HTTP to a
real `preble-router` in front of FAKE backends (testkit/fake_backend.py).

Every reply must satisfy `problems()`: no 5xx from the router's own code (a 502/503/504 is a backend's failure,
allowed only with a JSON error body), every error status with an OpenAI-style `{"error": {...}}` body, and the
router still answering a good request afterwards. tests/proxy/test_fuzz.py runs a bounded number of examples; this
command runs a longer fuzz and prints how many inputs it tried and the counts by status::

    python -m benchmarks.fuzz --examples 5000 [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ADMIN_KEY = "fuzz-admin"
MODEL = "tiny"
GOOD = {"model": MODEL, "prompt": "the router still answers", "max_tokens": 2}

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/debug/route",
         "/debug/backends", "/reset_prefix_cache", "/v1/embeddings", "/", "/v1/completions/", "/debug"]
METHODS = ["POST"] * 8 + ["GET", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
          "cache_salt", "add_special_tokens", "chat_template_kwargs", "tools", "add_generation_prompt",
          "continue_final_message", "n", "temperature", "echo", "logprobs"]
# Anthropic Messages and OpenAI Responses (#17): their bodies' own fields, and the stored-response paths.
PATHS += ["/v1/messages", "/v1/responses", "/v1/responses/resp_fuzz", "/v1/responses/resp_fuzz/cancel"]
FIELDS += ["system", "input", "instructions", "previous_response_id", "max_output_tokens", "store"]
# Headers the client library frames itself (a made-up Content-Length would leave the server waiting for bytes).
_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "te", "trailer", "expect"}

# ---- strategies ---------------------------------------------------------------------------------------------------
_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # lone surrogates included
_ints = st.one_of(st.integers(-3, 70_000), st.integers(), st.sampled_from([2**31, 2**32, 2**63, 2**64, -(2**63)]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=True, allow_infinity=True), _any_text,
                     st.sampled_from([MODEL, "user", "assistant", "system", "text", "content", "role"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                        st.dictionaries(_any_text, inner, max_size=5)),
                     max_leaves=30)
_message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system", "assistant",
                                                                                  "tool"]), _json),
                                               "content": st.one_of(_any_text, _json)})
_field_value = {
    "model": st.one_of(st.just(MODEL), _json),
    "prompt": st.one_of(_any_text, st.lists(_ints, max_size=80), st.lists(st.lists(_ints, max_size=40), max_size=3),
                        _json),
    "messages": st.one_of(st.lists(_message, max_size=4), _json),
    "stream": st.one_of(st.booleans(), _json),
}
_openai_body = st.fixed_dictionaries(
    {}, optional={name: _field_value.get(name, _json) for name in FIELDS}).flatmap(
    lambda d: st.dictionaries(_any_text, _json, max_size=3).map(lambda extra: {**extra, **d}))
# Well-formed requests with odd values in the other fields: these get past parsing to routing and forwarding.
_good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _any_text})
_routable_body = st.one_of(
    st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.one_of(_any_text, st.lists(st.integers(0, 999),
                                                                                          max_size=80))}),
    st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(_good_message, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"model": st.just(MODEL), "input": _any_text}),  # a Responses prompt
).flatmap(lambda d: st.fixed_dictionaries({}, optional={name: _field_value.get(name, _json) for name in FIELDS
                                                        if name not in ("model", "prompt", "messages", "input")})
          .map(lambda extra: {**extra, **d}))


def _encode(obj: Any) -> bytes:
    # allow_nan: NaN / Infinity are not JSON, so they make malformed bodies too; ensure_ascii escapes surrogates.
    return json.dumps(obj, allow_nan=True).encode()


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


bodies = st.one_of(
    _routable_body.map(_encode),
    _routable_body.map(_encode),
    _openai_body.map(_encode),
    _json.map(_encode),
    st.binary(max_size=300),
    st.integers(1, 5000).map(_nested),
    _openai_body.map(_encode).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda i: b[:i])),  # cut off
)
_header_name = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~"), min_size=1,
                       max_size=20).filter(lambda n: n not in _FRAMING)
# Header values as bytes the HTTP grammar allows: visible ASCII, obs-text (0x80-0xff), inner spaces and tabs.
_header_value = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F or c == 0x09).strip(b" \t"))
headers = st.lists(st.one_of(
    st.tuples(_header_name, _header_value),
    st.tuples(st.sampled_from(["content-type", "authorization", "accept", "accept-encoding", "cookie", "user-agent"]),
              st.one_of(_header_value, st.sampled_from([b"application/json", b"Bearer " + ADMIN_KEY.encode(),
                                                        b"Bearer wrong", b"text/event-stream", b"gzip"])))),
    max_size=6)
paths = st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS[:2]), st.sampled_from(PATHS[:2]), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                               exclude_characters="#?"), max_size=30)
                  .map(lambda p: "/" + p))


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...]
    body: bytes


cases = st.builds(Case, st.sampled_from(METHODS), paths, headers.map(tuple), bodies)


# ---- the checks -------------------------------------------------------------------------------------------------
def problems(case: Case, status: int, content_type: str, body: bytes) -> list[str]:
    """What is wrong with the router's reply to case (nothing: an empty list)."""
    found = []
    if status == 500 or status >= 505 or status == 501:
        found.append(f"status {status}: the router's own failure")
    if status >= 400 and case.method != "HEAD":  # a reply to HEAD has no body
        try:
            error = json.loads(body).get("error") if content_type.startswith("application/json") else None
        except (ValueError, AttributeError):
            error = None
        if not (isinstance(error, dict) and error.get("message") and error.get("type")):
            found.append(f"status {status} without an OpenAI error body: {content_type!r} {body[:200]!r}")
    return found


def send(client: httpx.Client, url: str, case: Case) -> tuple[int, str, bytes]:
    """The reply as (status, content type, body); a stream is read to its end."""
    with client.stream(case.method, url + case.path, content=case.body, headers=list(case.headers)) as r:
        return r.status_code, r.headers.get("content-type", ""), r.read()


def still_answers(client: httpx.Client, url: str) -> str | None:
    r = client.post(url + "/v1/completions", json=GOOD)
    return None if r.status_code == 200 else f"a good request then got {r.status_code}: {r.text[:200]}"


@dataclass
class Tally:
    tried: int = 0
    by_status: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def check_case(client: httpx.Client, url: str, case: Case, tally: Tally) -> list[str]:
    """Send one case and a good request after it; the problems found (also recorded in tally)."""
    try:
        status, content_type, body = send(client, url, case)
    except httpx.LocalProtocolError:  # a header the client library refuses to send: not an input the router sees
        return []
    except httpx.HTTPError as exc:
        found = [f"transport error {type(exc).__name__}: {exc}"]
        status = 0
    else:
        found = problems(case, status, content_type, body)
    tally.tried += 1
    tally.by_status[status] += 1
    after = still_answers(client, url)
    if after:
        found.append(after)
    if found:
        tally.failures.append(f"{case!r:.600}: {'; '.join(found)}")
    return found


def fuzz(url: str, examples: int, *, seed: int | None = None, on_problem: Callable[[Case, list[str]], None]
         | None = None) -> Tally:
    """Run `examples` generated cases against the router at url; on_problem (say, raising) sees each failure."""
    tally = Tally()
    # TCP_NODELAY: the client writes head and body apart, and Nagle's algorithm would hold the body for an ACK.
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(timeout=30, transport=transport) as client:
        # No seed: derandomized, the same inputs every run (CI); a seed: a different, repeatable sample.
        @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                  suppress_health_check=list(HealthCheck))
        @given(cases)
        def run(case: Case) -> None:
            found = check_case(client, url, case, tally)
            if found and on_problem is not None:
                on_problem(case, found)

        if seed is not None:
            run = hypothesis.seed(seed)(run)
        run()
    return tally


# ---- the benchmark command ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from testkit.fake_backend import run_fake_backend_in_thread
    from testkit.router_process import router_argv, start_router
    from testkit.tiny_model import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="generated inputs to send")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: a fixed derandomized run)")
    ap.add_argument("--model-dir", default=None, help="tokenizer dir (default: a tiny model built under .cache/)")
    a = ap.parse_args(argv)
    model = Path(a.model_dir) if a.model_dir else build_tiny_model(
        Path(__file__).resolve().parent.parent / ".cache" / "fuzz-model", size="tiny")
    fakes = [run_fake_backend_in_thread(model=MODEL) for _ in range(2)]
    try:
        argv_ = router_argv([u for u, _ in fakes], model, policy="preble",
                            extra=["--admin-key", ADMIN_KEY, "--max-body-bytes", "1000000"])
        with start_router(argv_, ready_timeout=120) as url:
            t0 = time.monotonic()
            tally = fuzz(url, a.examples, seed=a.seed)
            elapsed = time.monotonic() - t0
    finally:
        for _, stop in fakes:
            stop()
    print(f"inputs tried: {tally.tried} in {elapsed:.1f} s ({tally.tried / elapsed:.0f}/s)")
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.by_status.items())))
    print(f"problems: {len(tally.failures)}")
    for line in tally.failures[:20]:
        print("  " + line)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
