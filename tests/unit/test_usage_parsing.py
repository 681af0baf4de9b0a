"""Cached-token fields of every API's usage, and the last usage object of a stream's tail (vLLM 0.32's shapes)."""

from __future__ import annotations

from preble_router.proxy import _cached_tokens_from_usage, _output_tokens_from_usage, _usage_from_sse_tail


def test_cached_tokens_of_each_api():
    assert _cached_tokens_from_usage({"prompt_tokens_details": {"cached_tokens": 32}}) == 32
    assert _cached_tokens_from_usage({"input_tokens": 608, "input_tokens_details": {"cached_tokens": 576}}) == 576
    assert _cached_tokens_from_usage({"input_tokens": 31, "cache_read_input_tokens": 576}) == 576
    assert _cached_tokens_from_usage({"prompt_tokens": 5}) is None and _cached_tokens_from_usage(None) is None
    assert _output_tokens_from_usage({"completion_tokens": 4}) == _output_tokens_from_usage({"output_tokens": 4}) == 4


def test_usage_from_each_stream_tail():
    chat = b'data: {"choices":[],"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":0}}}\n\ndata: [DONE]\n\n'
    assert _usage_from_sse_tail(chat)["prompt_tokens"] == 9
    anthropic = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":607}}}\n\n'
                 b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":31,'
                 b'"cache_read_input_tokens":576}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert _usage_from_sse_tail(anthropic)["cache_read_input_tokens"] == 576
    # response.completed: its line starts before the tail (long instructions and output), usage near its end.
    responses = (b'ctions":"x } { \\" y","usage":{"input_tokens":608,"input_tokens_details":{"cached_tokens":576,'
                 b'"input_tokens_per_turn":[]},"output_tokens":4},"user":null},"type":"response.completed"}\n\n')
    assert _usage_from_sse_tail(responses)["input_tokens_details"]["cached_tokens"] == 576
    assert _usage_from_sse_tail(b'data: {"usage":null}\n\n') is None
    assert _usage_from_sse_tail(b'data: {"usage":{"prompt_tokens":') is None  # cut off
