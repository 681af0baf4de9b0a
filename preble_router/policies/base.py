"""The policy interface: pure objects that pick a backend from an immutable snapshot.

A policy never does I/O and never reads a clock: the current time arrives in the snapshot. The live router
and the simulator build the same snapshot types and call the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy may know about one request."""

    request_id: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]  # router-side chained hashes of the prompt's full blocks
    block_size: int
    max_tokens: int | None = None  # the client's output cap, when it gave one


@dataclass(frozen=True, slots=True)
class BackendState:
    """One eligible backend as seen for one request (healthy ones only, minus any already tried)."""

    backend_id: int
    url: str
    matched_tokens: int  # leading prompt tokens cached there (confirmed by events or predicted)
    in_flight: int  # requests sent and not finished
    pending_prefill_tokens: int  # uncached prompt tokens of in-flight requests still before their first token
    running_decode: int  # in-flight requests past their first token
    capacity_blocks: int | None = None  # KV-cache size, when known
    cached_blocks: int | None = None  # blocks the index records there
    # Other routers' requests among in_flight that only the engine's KV events show so far (load.py): > 0 only
    # behind several routers, between two engine load reports.
    unseen_dispatches: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    now: float  # seconds, from whoever drives the policy (wall clock live, simulated time in the simulator)
    backends: tuple[BackendState, ...]
    # Other routers' requests were seen on the fleet lately (load.LoadTracker.foreign_recent): this router's
    # history sees only its share of the traffic. Always False for a lone router.
    shared: bool = False
    # This router is the one of its peer-synced routers (peer_sync.py) that moves and replicates prefix groups;
    # the others see its dispatches and follow them. Always True for a lone router.
    rebalancer: bool = True

    def by_id(self, backend_id: int) -> BackendState:
        for b in self.backends:
            if b.backend_id == backend_id:
                return b
        raise KeyError(backend_id)


class Reason(StrEnum):
    """Why a policy chose its backend (a metric label and /debug/route's "reason"; equal to its string)."""

    ROUND_ROBIN = "round_robin"  # round_robin: the next backend in turn
    LEAST_LOAD = "least_load"  # least_load: fewest requests in flight
    CACHE_HIT = "cache_hit"  # cache_aware: the longest match, loads balanced enough
    IMBALANCED = "imbalanced"  # cache_aware: loads too far apart, so the least loaded
    MIN_TREE = "min_tree"  # cache_aware: no useful match, so the backend holding the least
    LMETRIC = "lmetric"  # lmetric: the least new prefill x batch
    EXPLOIT = "exploit"  # preble: most of the prompt is cached, the longest match's least loaded holder
    OVERFLOW = "overflow"  # preble: the holder's prefill queue is longer than recomputing elsewhere
    EXPLORE = "explore"  # preble: the least load + eviction + prefill cost
    PD_BALANCE = "pd_balance"  # preble: prefill-heavy work to a decode-heavy backend
    REBALANCE = "rebalance"  # preble: the prefix group was moved off a heavy backend
    REPLICA = "replica"  # preble: the hot prefix group's least loaded replica
    # Not a policy's: a Responses follow-up (previous_response_id) goes to the backend that stored the response.
    PREVIOUS_RESPONSE = "previous_response"


@dataclass(frozen=True, slots=True)
class Decision:
    backend_id: int
    reason: Reason
    matched_tokens: int
    costs: dict[int, float] = field(default_factory=dict)  # per backend id, when the policy scores them
    # REBALANCE / REPLICA: the prefix group the move or replica applies to, as its length in blocks along the
    # request's keys; peer routers, replaying the dispatch, adopt the move (peer_sync.py). 0: none.
    group_blocks: int = 0


@runtime_checkable
class Policy(Protocol):
    name: str

    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        """Pick one of snapshot.backends (never empty)."""
        ...

    def on_dispatched(self, request: RouteRequest, decision: Decision, snapshot: ClusterSnapshot) -> None:
        """The request was sent as decided (choose() itself changes nothing, so /debug/route is free)."""
        ...

    def on_first_token(self, request: RouteRequest, backend_id: int, now: float) -> None:
        """The request's first token (or first response byte) arrived."""
        ...

    def on_finished(self, request: RouteRequest, backend_id: int, now: float,
                    output_tokens: int | None = None, ok: bool = True) -> None:
        """The request ended (ok=False: it failed, and may be retried elsewhere as a new dispatch)."""
        ...

    def on_backend_removed(self, backend_id: int) -> None:
        """The backend left the fleet; its id may be reused by a new backend."""
        ...

    def on_blocks_evicted(self, backend_id: int, keys: list[int]) -> None:
        """The backend no longer holds these blocks (router block keys, as in RouteRequest.block_hashes): the
        engine evicted them (KV events), cleared its cache, or the router's estimate aged them out. Called by the
        Router whenever its CacheIndex drops a backend's blocks, live and in the simulator alike."""
        ...


class StatelessPolicy:
    """Base for policies that keep no history: the callbacks do nothing."""

    name = "stateless"

    def on_dispatched(self, request: RouteRequest, decision: Decision, snapshot: ClusterSnapshot) -> None:
        pass

    def on_first_token(self, request: RouteRequest, backend_id: int, now: float) -> None:
        pass

    def on_finished(self, request: RouteRequest, backend_id: int, now: float,
                    output_tokens: int | None = None, ok: bool = True) -> None:
        pass

    def on_backend_removed(self, backend_id: int) -> None:
        pass

    def on_blocks_evicted(self, backend_id: int, keys: list[int]) -> None:
        pass
