"""LMetric (arXiv 2603.15202): new prefill tokens x (requests in flight + 1), lowest wins."""

from __future__ import annotations

from benchmarks.arrivals import poisson
from benchmarks.sim import SimConfig, simulate
from benchmarks.workloads import generate, with_arrivals
from preble_router.policies import (BackendState, CacheAwarePolicy, ClusterSnapshot, LeastLoadPolicy, LMetricPolicy,
                                    make_policy)
from tests.unit.test_policies import pick, req


def state(i, matched=0, in_flight=0, pending=0):
    return BackendState(i, f"http://b{i}", matched, in_flight, pending, 0, None, 0)


def snap(*backends):
    return ClusterSnapshot(0.0, backends)


def test_picks_the_lowest_new_prefill_times_batch():
    s = snap(state(0),                          # 1000 x 1 = 1000
             state(1, matched=700, in_flight=2),  # 300 x 3 = 900
             state(2, matched=900, in_flight=9),  # 100 x 10 = 1000
             state(3, in_flight=1))             # 1000 x 2 = 2000
    d = LMetricPolicy().choose(req(1000), s)
    assert (d.backend_id, d.reason, d.matched_tokens) == (1, "lmetric", 700)
    assert d.costs == {0: 1000.0, 1: 900.0, 2: 1000.0, 3: 2000.0}
    # neither least load nor the longest match picks it
    assert LeastLoadPolicy().choose(req(1000), s).backend_id == 0
    assert CacheAwarePolicy().choose(req(1000), s).backend_id == 2


def test_prefers_the_cache_holder_when_loads_tie():
    p = LMetricPolicy()
    for load in (0, 3):  # idle too: the + 1 keeps the prefill factor in the score
        d = p.choose(req(1000), snap(state(0, in_flight=load), state(1, matched=512, in_flight=load),
                                     state(2, matched=256, in_flight=load)))
        assert d.backend_id == 1


def test_leaves_an_overloaded_holder_when_the_product_says_so():
    p = LMetricPolicy()

    def chosen(holder_load):
        # holder: 100 new tokens x (load + 1); the idle cold backend: 1000 x 1
        return p.choose(req(1000), snap(state(0, matched=900, in_flight=holder_load), state(1))).backend_id

    assert chosen(8) == 0  # 900 < 1000
    assert chosen(9) == 0  # 1000 = 1000: the tie goes to fewer new prefill tokens
    assert chosen(10) == 1  # 1100 > 1000


def test_a_fully_cached_prompt_still_counts_its_load():
    # matched == prompt (a fake; the router stops one token short): one token is still prefilled, so the
    # holder's score grows with its batch instead of staying 0
    p = LMetricPolicy()
    assert p.choose(req(1000), snap(state(0, matched=1000, in_flight=50), state(1))).backend_id == 0  # 51 < 1000
    assert p.choose(req(1000), snap(state(0, matched=1000, in_flight=1000), state(1))).backend_id == 1


def test_ties_on_score_and_prefill_go_to_the_least_loaded_then_lowest_id():
    p = LMetricPolicy()
    assert p.choose(req(), snap(state(1), state(0))).backend_id == 0
    assert p.choose(req(), snap(state(0, pending=500), state(1))).backend_id == 1
    assert p.choose(req(0), snap(state(0, in_flight=2), state(1, in_flight=1))).backend_id == 1  # empty prompt


def test_stateless_under_evictions_and_callbacks():
    p, twin = make_policy("lmetric"), make_policy("lmetric")
    assert isinstance(p, LMetricPolicy) and p.name == "lmetric"
    s = snap(state(0, matched=640, in_flight=2), state(1, in_flight=1))
    for i in range(4):
        assert p.on_blocks_evicted(i % 2, [1, 2, 3]) is None
        d = pick(p, s, req(1000))
        p.on_first_token(req(1000), d.backend_id, 0.1)
        p.on_finished(req(1000), d.backend_id, 0.2, output_tokens=3)
        assert d == twin.choose(req(1000), s)
    p.on_backend_removed(0)
    assert p.choose(req(1000), s) == twin.choose(req(1000), s)


def test_short_simulator_run_completes():
    reqs = with_arrivals(generate("tool_use", 80, seed=3, scale=0.3), poisson(80, 40.0, 3))
    res = simulate(reqs, "lmetric", SimConfig(gpus=2, capacity_blocks=1500))
    s = res.summary
    assert res.policy == "lmetric" and s["ok"] == 80 and s["errors"] == 0
    assert s["decisions"] == {"lmetric": 80}
    assert s["hit_rate"] > 0 and s["latency_avg"] > 0
