"""Backend probing: block size and capacity from vLLM's metrics; engine load from the Preble plugin's report
when the replica runs it, else from vLLM's gauges. Against FAKE HTTP transports (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import time

import httpx

from preble_router.backends import Backend, parse_cache_config, parse_engine_gauges, probe_backend

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 5.0
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",num_gpu_blocks="384",engine="0"} 1.0
"""


def fake_vllm(with_plugin: bool) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}, {"id": "adapter", "parent": "tiny"}]})
        if path == "/metrics":
            return httpx.Response(200, text=METRICS)
        if path == "/preble/load" and with_plugin:
            return httpx.Response(200, json={"running": 2, "waiting": 7, "pending_prefill_tokens": 4096})
        return httpx.Response(404)

    return httpx.MockTransport(handle)


def probe(with_plugin: bool) -> Backend:
    backend = Backend(0, "http://fake")

    async def go() -> None:
        async with httpx.AsyncClient(transport=fake_vllm(with_plugin)) as client:
            await probe_backend(client, backend)

    asyncio.run(go())
    return backend


def test_parsers():
    assert parse_cache_config(METRICS) == (32, 384)
    assert parse_engine_gauges(METRICS) == (3, 5)
    assert parse_engine_gauges("") == (None, None)


def test_probe_reads_plugin_report_when_present():
    b = probe(with_plugin=True)
    assert b.healthy and (b.block_size, b.capacity_blocks) == (32, 384) and b.lora_models == {"adapter"}
    assert (b.load_source, b.engine_running, b.engine_waiting, b.engine_pending_prefill_tokens) == ("preble", 2, 7, 4096)


def test_probe_falls_back_to_vllm_gauges():
    b = probe(with_plugin=False)
    assert (b.load_source, b.engine_running, b.engine_waiting, b.engine_pending_prefill_tokens) == ("metrics", 3, 5, None)



def test_metadata_is_read_once_an_interval_and_whenever_a_backend_comes_back():
    """Health probes are one GET /health; /v1/models and /metrics are read on the first probe, once the metadata
    interval has passed, and at once when a backend that was down answers again."""
    seen: list[str] = []
    transport = fake_vllm(with_plugin=False)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return transport.handle_request(request)

    backend = Backend(0, "http://fake")

    def probe_now(interval: float) -> list[str]:
        seen.clear()

        async def go() -> None:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
                await probe_backend(client, backend, metadata=backend.metadata_due(time.monotonic(), interval))

        asyncio.run(go())
        return list(seen)

    first = probe_now(60.0)
    assert "/v1/models" in first and "/metrics" in first and backend.capacity_blocks == 384
    assert probe_now(60.0) == ["/health"]  # healthy and read within the interval: liveness only
    backend.healthy = False  # e.g. a request to it failed in transport
    assert "/v1/models" in probe_now(60.0) and backend.healthy
    assert "/metrics" in probe_now(0.0)  # interval 0: every probe reads everything
    backend.metadata_at -= 61
    assert "/metrics" in probe_now(60.0)


def test_a_liveness_probe_goes_through_the_lean_pool():
    """A health probe that reads no metadata is one GET /health on the given pool (the proxy's own HTTP client),
    not through httpx; a backend that stops answering it is marked down with the reason."""
    from testkit.fake_backend import run_fake_backend_in_thread
    from testkit.ports import free_port
    from preble_router.upstream import UpstreamPool

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"httpx used for {request.url.path}")

    url, stop = run_fake_backend_in_thread(model="tiny")
    try:
        up = Backend(0, url, healthy=True, metadata_at=time.monotonic())
        gone = Backend(1, f"http://127.0.0.1:{free_port()}", healthy=True, metadata_at=time.monotonic())

        async def go() -> None:
            pool = UpstreamPool(connect_timeout=1.0, request_timeout=1.0)
            async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
                for b in (up, gone):
                    await probe_backend(client, b, metadata=False, liveness=pool)
            await pool.close()

        asyncio.run(go())
        assert up.healthy and up.last_error is None
        assert not gone.healthy and gone.last_error
    finally:
        stop()
