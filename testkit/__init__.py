"""Test support shared by the tests and the benchmarks: stand-ins for vLLM and helpers to run servers.

- ``fake_backend``: a FAKE OpenAI-compatible vLLM server (no model), in a thread or as ``python -m``.
- ``fake_kv_publisher``: a stand-in for vLLM's ZMQ KV-event publisher (live feed and replay).
- ``tiny_model``: a small random-weight Llama and tokenizer, built offline, that real vLLM can serve.
- ``router_process``: `preble-router` (or any server) as a subprocess, stopped with its process group.
- ``in_thread``: the router (or any ASGI app) served by uvicorn in a thread of this process.
- ``ports``: free TCP ports.

Nothing here imports ``tests``; the benchmarks may import it.
"""
