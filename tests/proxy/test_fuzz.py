"""Fuzz the router over HTTP in front of FAKE backends with generated bodies, headers, paths and methods
(benchmarks/fuzz.py holds the strategies and checks; `python -m benchmarks.fuzz` runs a longer fuzz)."""

from __future__ import annotations

import pytest

from benchmarks.fuzz import ADMIN_KEY, MODEL, Case, fuzz
from testkit.fake_backend import run_fake_backend_in_thread
from testkit.in_thread import serve_router

EXAMPLES = 250  # bounded for CI: a few seconds here


@pytest.fixture(scope="module")
def router(tiny_model):
    fakes = [run_fake_backend_in_thread(model=MODEL) for _ in range(2)]
    try:
        with serve_router(["--backends", *(u for u, _ in fakes), "--model", str(tiny_model), "--served-model-name",
                           MODEL, "--admin-key", ADMIN_KEY, "--max-body-bytes", "1000000",
                           "--health-interval", "0.5"]) as (url, _):
            yield url
    finally:
        for _, stop in fakes:
            stop()


def test_no_router_failure_and_every_error_in_json(router):
    def fail(case: Case, found: list[str]) -> None:
        raise AssertionError(f"{case!r:.2000}: {'; '.join(found)}")

    tally = fuzz(router, EXAMPLES, on_problem=fail)
    assert tally.tried >= EXAMPLES // 2  # (inputs the client library refuses to send are not counted)
    assert 200 in tally.by_status and 400 in tally.by_status and 404 in tally.by_status
