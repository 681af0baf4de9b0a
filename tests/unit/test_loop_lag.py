"""The event-loop lag monitor: a blocked loop is measured, counted and logged (rate-limited)."""

from __future__ import annotations

import asyncio
import logging
import time

from preble_router.loop_lag import LoopLagMonitor


def test_a_blocking_callback_shows_as_lag_and_is_logged(caplog):
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval=0.01, warn_s=0.05)

    async def main() -> None:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # a callback that holds the loop
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="preble_router.loop_lag"):
        asyncio.run(main())
    assert max(seen) >= 0.08
    assert monitor.stats.stalls >= 1 and monitor.stats.worst_s == max(seen)
    assert any("event loop stalled" in r.message for r in caplog.records)
    view = monitor.debug(time.monotonic())
    assert view["stalls"] == monitor.stats.stalls and view["worst_s"] >= 0.08


def test_stall_warnings_are_rate_limited_but_all_stalls_counted(caplog):
    monitor = LoopLagMonitor(None, warn_s=0.1, warn_every=60.0)
    with caplog.at_level(logging.WARNING, logger="preble_router.loop_lag"):
        for i in range(5):
            monitor.record(0.3, now=100.0 + i)
        monitor.record(0.01, now=110.0)
        monitor.record(0.3, now=170.0)
    lines = [r.message for r in caplog.records if "event loop stalled" in r.message]
    assert len(lines) == 2  # the first stall, and the first after warn_every
    assert "(5 stalls" in lines[1]  # the four unlogged ones and this one
    assert monitor.stats.stalls == 6 and monitor.stats.last_s == 0.3 and monitor.stats.samples == 7
