"""Routing policies: pure objects behind one interface (base.Policy), used live and in the simulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from preble_router.policies.base import BackendState, ClusterSnapshot, Decision, Policy, Reason, RouteRequest
from preble_router.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from preble_router.policies.lmetric import LMetricPolicy
from preble_router.policies.preble import PrebleConfig, PreblePolicy
from preble_router.policies.simple import LeastLoadPolicy, RoundRobinPolicy
from preble_router.policies.time_model import TimeModel

POLICIES: dict[str, Callable[..., Policy]] = {
    "round_robin": RoundRobinPolicy,
    "least_load": LeastLoadPolicy,
    "cache_aware": CacheAwarePolicy,
    "preble": PreblePolicy,
    "lmetric": LMetricPolicy,
}


def make_policy(name: str, **kwargs: Any) -> Policy:
    """A policy by name; kwargs go to its constructor (e.g. config=PrebleConfig(...), time_model=...)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return factory(**kwargs)


__all__ = [
    "BackendState",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "ClusterSnapshot",
    "Decision",
    "LMetricPolicy",
    "LeastLoadPolicy",
    "POLICIES",
    "Policy",
    "Reason",
    "PrebleConfig",
    "PreblePolicy",
    "TimeModel",
    "RouteRequest",
    "RoundRobinPolicy",
    "make_policy",
]
