"""The Responses id store (LRU, bounded) and the stream scan that learns a streamed response's id."""

from __future__ import annotations

import json

import pytest

from preble_router.proxy import _STREAM_ID_SCAN_BYTES, _streamed_response_id
from preble_router.response_store import ResponseStore


def test_lru_bounded_and_refreshed_by_use():
    store = ResponseStore(capacity=2)
    store.learn("a", "http://x")
    store.learn("b", "http://y")
    assert store.holder("a") == "http://x"  # a is now the most recently used
    store.learn("c", "http://y")
    assert len(store) == 2 and "b" not in store and store.holder("a") == "http://x"
    store.learn("a", "http://z")  # the latest reply that named it wins
    assert store.holder("a") == "http://z" and store.holder("nope") is None
    with pytest.raises(ValueError):
        ResponseStore(capacity=0)


def _created(response_id: str) -> bytes:
    event = {"type": "response.created", "sequence_number": 0, "response": {"id": response_id, "status": "queued"}}
    return b"event: response.created\ndata: " + json.dumps(event).encode() + b"\n\n"


def test_stream_id_found_across_chunks():
    stream = _created("resp_1") + b"event: response.in_progress\ndata: {}\n\n"
    head = b""
    for i in range(0, len(stream), 7):  # fed in small pieces: incomplete until the event's blank line
        found = _streamed_response_id(head + stream[i:i + 7])
        if isinstance(found, str):
            break
        assert isinstance(found, bytes)
        head = found
    assert found == "resp_1"


def test_stream_without_the_event_is_given_up():
    assert _streamed_response_id(b"data: {}\n\n") == b"data: {}\n\n"  # might still come
    assert _streamed_response_id(b"x" * _STREAM_ID_SCAN_BYTES) is None
    assert _streamed_response_id(b"event: response.created\ndata: {oops\n\n") is None
