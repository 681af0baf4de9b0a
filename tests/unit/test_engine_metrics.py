"""benchmarks.engine_metrics on canned vLLM /metrics text (no replicas)."""

from __future__ import annotations

from benchmarks.engine_metrics import EngineCounters, parse


def _metrics(done: int, e2e_sum: float, queue_sum: float) -> str:
    return f"""# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {done - 1}.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} 1.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {done}.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="m"}} {done}.0
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="m"}} {e2e_sum}
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_count{{engine="0",model_name="m"}} {done}.0
vllm:request_queue_time_seconds_sum{{engine="0",model_name="m"}} {queue_sum}
"""


def test_a_run_is_the_difference_of_two_scrapes():
    before = EngineCounters()
    before.requests["a"], before.times["a"] = parse(_metrics(10, 5.0, 1.0))
    after = EngineCounters()
    after.requests["a"], after.times["a"] = parse(_metrics(14, 7.0, 1.4))
    ran = after.since(before)
    assert ran.requests == {"a": 4.0}  # every finish reason counts
    means = ran.mean_times()
    assert means["engine_e2e_avg_s"] == 0.5 and means["engine_queue_avg_s"] == 0.1
    assert means["engine_prefill_avg_s"] is None  # not in this text: no mean rather than a zero


def test_means_pool_the_replicas_by_request():
    c = EngineCounters()
    c.requests["a"], c.times["a"] = parse(_metrics(1, 1.0, 0.0))
    c.requests["b"], c.times["b"] = parse(_metrics(3, 0.6, 0.0))
    assert c.mean_times()["engine_e2e_avg_s"] == 0.4
