"""Prefix affinity with load gates, as SGLang's router (`cache_aware`) does it, on engine blocks.

1. If the load is imbalanced (max - min > balance_abs and max > balance_rel x min, in requests in flight),
   send to the least loaded backend.
2. Else, if the best prefix match covers more than cache_threshold of the prompt, send to the longest match
   (least loaded among ties).
3. Else send to the backend holding the fewest blocks (most room), least loaded among ties.
"""

from __future__ import annotations

from dataclasses import dataclass

from preble_router.policies.base import ClusterSnapshot, Decision, Reason, RouteRequest, StatelessPolicy
from preble_router.policies.simple import load_key


@dataclass
class CacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5


class CacheAwarePolicy(StatelessPolicy):
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        self.config = config or CacheAwareConfig()

    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        cfg = self.config
        backends = snapshot.backends
        loads = [b.in_flight for b in backends]
        if max(loads) - min(loads) > cfg.balance_abs_threshold and max(loads) > cfg.balance_rel_threshold * min(loads):
            chosen = min(backends, key=load_key)
            return Decision(chosen.backend_id, Reason.IMBALANCED, chosen.matched_tokens)
        best = max(backends, key=lambda b: (b.matched_tokens, -b.in_flight, -b.pending_prefill_tokens, -b.backend_id))
        if request.prompt_tokens and best.matched_tokens / request.prompt_tokens > cfg.cache_threshold:
            return Decision(best.backend_id, Reason.CACHE_HIT, best.matched_tokens)
        chosen = min(backends, key=lambda b: (b.cached_blocks or 0, *load_key(b)))
        return Decision(chosen.backend_id, Reason.MIN_TREE, chosen.matched_tokens)
