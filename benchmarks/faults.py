"""Fault scenario on real vLLM CPU replicas: kill one replica under load, then restart it.

    python -m benchmarks.faults [--requests 60] [--rate 4] [--kill-at 4]

Every request must end accounted for: a 200, an OpenAI-style error, or (for a stream cut mid-way) an error
event; none may hang or vanish. Prints requests sent, succeeded, retried (answered by another backend
after a failure), failed with a clear error, lost, and the time from the restart to the replica taking
traffic again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.demo import ROOT
from benchmarks.vllm_replicas import Replica, start_replicas
from testkit.router_process import router_argv, start_router
from testkit.tiny_model import build_tiny_model


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: bool) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": [(i * 7 + j) % 900 + 5 for j in range(200)], "max_tokens": 160,
            "ignore_eos": True, "stream": stream}
    out: dict[str, Any] = {"id": i, "stream": stream}
    try:
        if stream:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                out["status"], out["attempts"] = r.status_code, int(r.headers.get("x-preble-attempts", "0"))
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            out["outcome"] = "ok" if events and events[-1] == "data: [DONE]" and not any(
                '"error"' in e for e in events) else "error_event" if any('"error"' in e for e in events) else "cut"
            if r.status_code != 200:
                out["outcome"] = "http_error"
        else:
            r = await client.post(url + "/v1/completions", json=body)
            out["status"], out["attempts"] = r.status_code, int(r.headers.get("x-preble-attempts", "0"))
            out["outcome"] = "ok" if r.status_code == 200 else "http_error" if "error" in r.json() else "unclear"
    except httpx.HTTPError as exc:  # the router itself failed us: that would be a lost request
        out["outcome"], out["error"] = "lost", repr(exc)
    return out


async def _load(url: str, n: int, rate: float, on_tick: Any) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        tasks = []
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            on_tick(time.monotonic() - start)
            tasks.append(asyncio.create_task(_one(client, url, i, stream=i % 3 == 0)))
        return list(await asyncio.gather(*tasks))


def run_fault_scenario(model: Path, *, requests: int = 60, rate: float = 4.0, kill_at: float = 4.0,
                       log_dir: Path | None = None) -> dict[str, Any]:
    with start_replicas(model, 2, block_size=32, log_dir=log_dir) as replicas:
        victim: Replica = replicas[0]
        argv = router_argv(replicas, model, policy="preble",
                           extra=["--health-interval", "0.5", "--max-attempts", "3", "--admin-open"])  # /debug/backends
        with start_router(argv) as url:
            killed = {"done": False}

            def tick(elapsed: float) -> None:
                if elapsed >= kill_at and not killed["done"]:
                    killed["done"] = True
                    victim.kill()

            records = asyncio.run(_load(url, requests, rate, tick))
            victim_down = not _healthy(url, victim.url)
            restarted_at = time.monotonic()
            victim.restart()  # returns once vLLM answers /health again (its own startup: tens of seconds)
            ready_at = time.monotonic()
            recovered = None
            while time.monotonic() - ready_at < 60:
                if _healthy(url, victim.url):
                    recovered = time.monotonic() - ready_at
                    break
                time.sleep(0.1)
            # New prefixes go to the emptier (restarted) replica: it takes traffic and its events flow again.
            after = [httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": [1000 + k] * 200, "max_tokens": 2}) for k in range(4)]
            served_by_victim = sum(r.headers.get("x-preble-backend") == victim.url for r in after)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _view(url)[victim.url]["indexed_blocks"] == 0:
                time.sleep(0.2)
            events_back = _view(url)[victim.url]["indexed_blocks"] > 0
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {
        "sent": len(records),
        "succeeded": outcomes.get("ok", 0),
        "retried": sum(1 for r in records if r.get("attempts", 0) > 1),
        "failed_with_clear_error": outcomes.get("http_error", 0) + outcomes.get("error_event", 0),
        "lost": outcomes.get("lost", 0) + outcomes.get("cut", 0) + outcomes.get("unclear", 0),
        "victim_marked_down": victim_down,
        "replica_restart_s": round(ready_at - restarted_at, 1),
        "recovery_s_after_restart_ready": recovered,
        "restarted_replica_served": served_by_victim,
        "restarted_replica_events_indexed": events_back,
        "records": records,
    }


def _view(url: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(url + "/debug/backends", timeout=10).json()["backends"]}


def _healthy(url: str, backend: str) -> bool:
    return bool(_view(url)[backend]["healthy"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--kill-at", type=float, default=4.0, help="seconds into the load")
    args = ap.parse_args(argv)
    model = build_tiny_model(ROOT / ".cache" / "models" / "tiny", size="tiny")
    result = run_fault_scenario(model, requests=args.requests, rate=args.rate, kill_at=args.kill_at)
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
