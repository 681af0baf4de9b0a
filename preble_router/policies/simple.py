"""Baseline policies: round robin and least load. Prefix-blind, as data-parallel serving is by default."""

from __future__ import annotations

from preble_router.policies.base import BackendState, ClusterSnapshot, Decision, Reason, RouteRequest, StatelessPolicy


def load_key(b: BackendState) -> tuple[int, int, int]:
    """Least load first: requests in flight, then prefill backlog, then id for a stable tie-break."""
    return (b.in_flight, b.pending_prefill_tokens, b.backend_id)


class RoundRobinPolicy(StatelessPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        # Cycle over backend ids (not list positions) so a backend leaving does not skew the rotation.
        ordered = sorted(snapshot.backends, key=lambda b: b.backend_id)
        chosen = next((b for b in ordered if b.backend_id >= self._next), ordered[0])
        return Decision(chosen.backend_id, Reason.ROUND_ROBIN, chosen.matched_tokens)

    def on_dispatched(self, request: RouteRequest, decision: Decision, snapshot: ClusterSnapshot) -> None:
        self._next = decision.backend_id + 1


class LeastLoadPolicy(StatelessPolicy):
    name = "least_load"

    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        chosen = min(snapshot.backends, key=load_key)
        return Decision(chosen.backend_id, Reason.LEAST_LOAD, chosen.matched_tokens)
