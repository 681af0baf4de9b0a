"""LMetric: new prefill tokens x batch size, lowest wins (Zhang et al., "LMetric: Simple is Better -
Multiplication May Be All You Need for LLM Request Scheduling", arXiv 2603.15202, 2026).

The paper scores each instance by the product of two indicators, one KV-cache-aware ("new prefill tokens if
routed to an instance") and one load-aware ("current batch size of the instance"), and routes to the lowest
score. A product needs no weights: scaling either indicator scales every instance's score alike, so the
order (the only thing the router uses) stays the same. Its authors say it needs no tuning, so this policy
has no knobs.

Per backend b, for request r:
- P(b) = r.prompt_tokens - b.matched_tokens: the prompt tokens b would have to prefill, after the prefix
  the cache index says b holds (confirmed by KV events or predicted). It is at least 1, because vLLM always
  recomputes the prompt's last token (the router's matched_tokens already stops short of it).
- BS(b) = b.in_flight + 1: the batch r would join there.
- score(b) = P(b) x BS(b); the backend with the lowest score wins.

Load signal: in_flight, the router's count of requests it sent to b that have not finished. That is b's
running plus waiting requests as far as this router knows (requests from other clients are not counted).
We use it rather than the engine's scraped num_requests_running:
- it changes when a request is dispatched, so a burst spreads out at once; a polled gauge would send the
  whole burst to the replica that looked idle at the last scrape;
- it counts queued requests, which join the batch as soon as there is room;
- the simulator and the live router compute it the same way.
The + 1 is ours (the LMetric scorers proposed for llm-d's router and Dynamo's KV router add it too): both
factors then describe b after r is placed, as P already does, and neither factor is ever 0. A zero factor
hides the other one: with the bare batch size every idle backend scores 0, so a cold idle backend beats a
warm one running a single request, and idle backends score alike whatever they hold. (The abstract says the
cases where the product fails are rare and can be detected and mitigated in advance.) The floor of 1 on P
keeps the other factor nonzero.

P counts only r's own uncached tokens, not the prefill already queued at b: the paper's indicator is per
request, and BS is the load factor. Ties: the parts of the paper we could read give no rule, so ours takes
fewer new prefill tokens first (less computation in total, and the prefix stays together), then least load
(in flight, queued prefill, id).

Stateless: all of it comes from the snapshot, so evictions change its decisions only through matched_tokens.
"""

from __future__ import annotations

from preble_router.policies.base import BackendState, ClusterSnapshot, Decision, Reason, RouteRequest, StatelessPolicy
from preble_router.policies.simple import load_key


def new_prefill_tokens(request: RouteRequest, b: BackendState) -> int:
    """The prompt tokens b would prefill for this request (at least the last one, as vLLM recomputes it)."""
    return max(request.prompt_tokens - b.matched_tokens, 1)


def lmetric_score(request: RouteRequest, b: BackendState) -> int:
    """New prefill tokens x the batch the request would join there (b's requests in flight + 1)."""
    return new_prefill_tokens(request, b) * (b.in_flight + 1)


class LMetricPolicy(StatelessPolicy):
    name = "lmetric"

    def choose(self, request: RouteRequest, snapshot: ClusterSnapshot) -> Decision:
        scores = {b.backend_id: lmetric_score(request, b) for b in snapshot.backends}
        chosen = min(snapshot.backends,
                     key=lambda b: (scores[b.backend_id], new_prefill_tokens(request, b), *load_key(b)))
        return Decision(chosen.backend_id, Reason.LMETRIC, chosen.matched_tokens,
                        {i: float(s) for i, s in scores.items()})
