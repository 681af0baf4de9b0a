"""Faults with real vLLM CPU replicas behind the real router: a replica killed under load, then restarted."""

from __future__ import annotations

import pytest

from benchmarks.faults import run_fault_scenario

pytestmark = pytest.mark.e2e


def test_killed_replica_loses_no_request_and_comes_back(tiny_model):
    result = run_fault_scenario(tiny_model, requests=40, rate=4.0, kill_at=3.0)
    summary = {k: v for k, v in result.items() if k != "records"}
    print(summary)
    assert result["lost"] == 0, result["records"]
    assert result["succeeded"] + result["failed_with_clear_error"] == result["sent"]
    # Non-streaming requests never reached the client before the failure: all of them are retried elsewhere.
    assert all(r["outcome"] == "ok" for r in result["records"] if not r["stream"]), result["records"]
    assert result["victim_marked_down"]
    assert result["recovery_s_after_restart_ready"] is not None
    assert result["restarted_replica_served"] >= 1 and result["restarted_replica_events_indexed"]
