"""benchmarks.chaos end to end, its KV-event-stream drop only: real vLLM CPU replicas, the router with its default
policy, one replica's events through a ZMQ forwarder that is SIGSTOPped for 10 s under load."""

from __future__ import annotations

import pytest

from benchmarks.chaos import run_chaos

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(150)
def test_kv_event_feed_drop_loses_nothing_and_the_feed_comes_back(tiny_model, tmp_path):
    result = run_chaos(tiny_model, ["feed_drop"], duration=20.0, inject_at=3.0, log_dir=tmp_path, recover_cap=15.0)
    (fault,) = result["faults"]
    summary = {k: v for k, v in fault.items() if k not in ("records", "timeline")}
    print(summary)
    assert fault["error"] is None, summary
    assert fault["lost"] == 0, fault["lost_requests"]
    assert fault["refused"] == 0
    assert fault["succeeded"] + fault["failed_clear"] == fault["sent"] and fault["succeeded"] > 0
    checks = fault["checks"]
    assert checks["went_silent"], summary  # within --kv-events-silence (5 s) of a request that stored blocks
    assert checks["estimated_while_silent"], summary
    assert checks["flowing_again"], summary
    assert checks["events_index_after"], summary
    assert fault["recover_s"] is not None
