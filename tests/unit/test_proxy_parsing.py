"""The request path's parsing helpers, against the plain definitions they stand in for."""

from __future__ import annotations

import random

import msgspec
import pytest

from preble_router.proxy import MAX_JSON_DEPTH, _brackets_over, _nested_deeper


@pytest.mark.parametrize("raw", [b"", b"{}", b"[" * 64, b"{" * 64, b"[" * 65, b"[{" * 32, b"[{" * 32 + b"[",
                                 b'{"p": "' + b"x" * 5000 + b"[" * 40 + b'", "q": [' + b"{" * 30 + b"]}"])
@pytest.mark.parametrize("limit", [0, 1, 63, 64, 65])
def test_brackets_over_is_the_count(raw: bytes, limit: int) -> None:
    assert _brackets_over(raw, limit) == (raw.count(b"[") + raw.count(b"{") > limit)


def test_brackets_over_random() -> None:
    rng = random.Random(3)
    for _ in range(500):
        raw = bytes(rng.choice(b"[{}]x\"") for _ in range(rng.randrange(0, 200)))
        limit = rng.randrange(0, 80)
        assert _brackets_over(raw, limit) == (raw.count(b"[") + raw.count(b"{") > limit)


def test_nested_deeper_at_the_limit() -> None:
    ok = b'{"prompt": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    deep = b'{"prompt": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert not _nested_deeper(ok, msgspec.json.decode(ok), MAX_JSON_DEPTH)
    assert _nested_deeper(deep, msgspec.json.decode(deep), MAX_JSON_DEPTH)
    # Many brackets, but in a string: walked, and found shallow.
    wide = b'{"prompt": "' + b"[" * 500 + b'"}'
    assert not _nested_deeper(wide, msgspec.json.decode(wide), MAX_JSON_DEPTH)
