"""Settings declared once (preble_router.settings): flags, defaults and the dataclasses built back from them."""

from __future__ import annotations

import argparse
import dataclasses
import math

from preble_router import cli
from preble_router.policies import PrebleConfig
from preble_router.proxy import ProxyConfig
from preble_router.settings import add_flags, from_args, setting


@dataclasses.dataclass
class _Demo:
    rate: float = setting(1.5, "Rate.", flag="--demo-rate")
    count: int = setting(3, "Count.", flag="--demo-count")
    on: bool = setting(True, "0 or 1.", flag="--demo-on", type=int, choices=[0, 1])
    loud: bool = setting(False, "A switch.", flag="--loud")
    key: str | None = setting(None, "From the environment.", flag="--demo-key", env="DEMO_KEY")
    hidden: float = setting(9.0, "No flag: keeps its default.")


def _parse(argv: list[str]) -> _Demo:
    p = argparse.ArgumentParser()
    add_flags(p, _Demo)
    return from_args(_Demo, p.parse_args(argv))


def test_flags_round_trip_types_and_defaults(monkeypatch):
    monkeypatch.delenv("DEMO_KEY", raising=False)
    assert _parse([]) == _Demo()
    got = _parse(["--demo-rate", "inf", "--demo-count", "7", "--demo-on", "0", "--loud", "--demo-key", "k"])
    assert got == _Demo(rate=math.inf, count=7, on=False, loud=True, key="k")
    assert got.on is False and got.loud is True
    monkeypatch.setenv("DEMO_KEY", "from-env")
    assert _parse([]).key == "from-env"


def test_router_defaults_are_the_dataclasses_defaults(monkeypatch):
    for var in ("PREBLE_API_KEY", "PREBLE_ADMIN_KEY", "PREBLE_BACKEND_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    args = cli.build_parser().parse_args(["--model", "m"])
    assert from_args(PrebleConfig, args) == PrebleConfig()
    assert from_args(ProxyConfig, args) == ProxyConfig()
    args = cli.build_parser().parse_args(["--model", "m", "--preble-eviction-pending", "0", "--preble-warmup", "5",
                                          "--admin-open", "--max-queue", "7"])
    assert from_args(PrebleConfig, args) == PrebleConfig(eviction_pending=False, warmup_per_backend=5)
    assert from_args(ProxyConfig, args) == ProxyConfig(admin_open=True, max_queue=7)


def test_sim_takes_the_preble_settings():
    from benchmarks.cli import build_parser, sim_policy

    args = build_parser().parse_args(["sim", "-w", "tool", "--preble-load-signal", "window",
                                      "--preble-exploit-overflow", "inf"])
    policy = sim_policy(args, "preble")()
    assert policy.config == PrebleConfig(load_signal="window", exploit_overflow=math.inf)
    assert sim_policy(args, "round_robin") == "round_robin"


def test_every_preble_setting_has_a_flag():
    """#20: a sweep of any PrebleConfig field needs no code (preble-bench sim / suite and the router take them all)."""
    missing = [f.name for f in dataclasses.fields(PrebleConfig) if not (f.metadata or {}).get("flag")]
    assert missing == []
    args = cli.build_parser().parse_args(["--model", "m", "--preble-rebalance-interval", "2.5",
                                          "--preble-eviction-refresh", "0", "--preble-default-output-tokens", "64"])
    config = from_args(PrebleConfig, args)
    assert (config.rebalance_interval, config.eviction_refresh, config.default_output_tokens) == (2.5, 0.0, 64)
