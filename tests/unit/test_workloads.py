"""Workload generators (shapes against the spec's table, prefix structure, determinism, JSONL) and arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import arrivals
from benchmarks.workloads import (
    SPEC_SHAPES,
    Request,
    describe,
    generate,
    load_jsonl,
    save_jsonl,
    shared_fractions,
    with_arrivals,
)

N = 1500


def _lengths(reqs):
    p = np.array([r.prompt_tokens for r in reqs], dtype=float)
    o = np.array([r.output_tokens for r in reqs], dtype=float)
    return p, o


@pytest.mark.parametrize("name", ["tool_use", "embodied_agent", "program_generation", "long_doc_qa"])
def test_length_distributions_match_spec(name):
    spec = SPEC_SHAPES[name]
    p, o = _lengths(generate(name, N, seed=1))
    assert p.mean() == pytest.approx(spec["prompt_mean"], rel=0.12)
    assert p.std() == pytest.approx(spec["prompt_sd"], rel=0.35)
    assert o.mean() == pytest.approx(spec["output_mean"], rel=0.15)


def test_video_tokens_capped_and_table_shape_without_cap():
    capped = generate("video_qa", N, seed=1)
    p, o = _lengths(capped)
    assert p.max() <= 8192 + 40 + 400  # system + capped video + longest question
    assert o.mean() == pytest.approx(4, rel=0.15)
    # With a cap that does not bind, 256 tokens/s of ~40 s videos gives the table's shape.
    p2, _ = _lengths(generate("video_qa", N, seed=1, video_cap_tokens=32768))
    assert p2.mean() == pytest.approx(SPEC_SHAPES["video_qa"]["prompt_mean"], rel=0.2)
    assert p2.std() == pytest.approx(SPEC_SHAPES["video_qa"]["prompt_sd"], rel=0.35)


@pytest.mark.parametrize("name", ["tool_use", "embodied_agent", "program_generation", "video_qa", "long_doc_qa"])
def test_shared_fraction_matches_spec(name):
    # Lengths scaled down for speed: the shared fraction is a ratio, so it survives scaling.
    kw = {"n_tools": 100} if name == "tool_use" else {}  # fewer first-of-a-tool requests in a short run
    scale = 0.1 if name in ("long_doc_qa", "video_qa") else 0.25
    reqs = generate(name, 1000 if name != "long_doc_qa" else 500, seed=2, scale=scale, **kw)
    sf = shared_fractions(reqs, block_size=4)
    assert sf.mean() == pytest.approx(SPEC_SHAPES[name]["shared_mean"], abs=0.06)


def test_deterministic_with_seed_and_different_across_seeds():
    a = generate("tool_use", 50, seed=7)
    b = generate("tool_use", 50, seed=7)
    c = generate("tool_use", 50, seed=8)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.output_tokens for r in a] == [r.output_tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_equal_prefixes_are_equal_token_sequences():
    reqs = generate("tool_use", 300, seed=3, vocab=1000)
    by_group: dict[str, list[Request]] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r)
    x, y = next(g for g in by_group.values() if len(g) >= 2)[:2]
    shared = x.segments[0][1] + x.segments[1][1]  # system prompt + the tool's docs
    assert x.tokens[:shared] == y.tokens[:shared]
    assert x.tokens[shared:] != y.tokens[shared:]
    other = next(g[0] for g in by_group.values() if g[0].group != x.group)
    sys_len = x.segments[0][1]
    assert other.tokens[:sys_len] == x.tokens[:sys_len]  # every tool shares the system prompt
    assert all(16 <= t < 1000 for r in reqs[:20] for t in r.tokens)


def test_agent_history_grows_and_depends_on_previous_step():
    reqs = generate("embodied_agent", 400, seed=4)
    pos = {r.id: i for i, r in enumerate(reqs)}
    by_id = {r.id: r for r in reqs}
    chained = [r for r in reqs if r.depends_on]
    assert len(chained) > 300
    for r in chained[:50]:
        prev = by_id[r.depends_on]
        assert pos[prev.id] < pos[r.id]
        assert prev.group == r.group
        # The next prompt is the previous prompt + its action (the previous output) + an observation.
        assert r.tokens[: prev.prompt_tokens] == prev.tokens
        assert r.segments[len(prev.segments)][1] == prev.output_tokens
    assert max(r.output_tokens for r in reqs) <= 26


def test_scale_shrinks_everything():
    full = generate("long_doc_qa", 40, seed=5)
    small = generate("long_doc_qa", 40, seed=5, scale=0.1)
    pf, of = _lengths(full)
    ps, os_ = _lengths(small)
    assert ps.mean() == pytest.approx(pf.mean() * 0.1, rel=0.05)
    assert os_.mean() < of.mean()
    assert ps.max() < 4096


def test_mix_interleaves_and_keeps_component_order():
    reqs = generate("mix", 200, seed=6)
    kinds = [r.id.split("-")[0] for r in reqs]
    assert set(kinds) == {"tool_use", "video_qa"}
    assert 80 <= kinds.count("tool_use") <= 120
    tool_ids = [r.id for r in reqs if r.id.startswith("tool_use")]
    assert tool_ids == sorted(tool_ids)
    assert kinds[:20] != sorted(kinds[:20])  # interleaved, not concatenated


def test_jsonl_round_trip(tmp_path):
    reqs = with_arrivals(generate("embodied_agent", 30, seed=9, scale=0.1), arrivals.poisson(30, 5.0, 0))
    reqs[0].text = "hello"
    save_jsonl(reqs, tmp_path / "a.jsonl")
    save_jsonl(reqs, tmp_path / "b.jsonl", inline_tokens=True)
    for f in ("a.jsonl", "b.jsonl"):
        back = load_jsonl(tmp_path / f)
        assert [r.tokens for r in back] == [r.tokens for r in reqs]
        assert [(r.id, r.output_tokens, r.arrival, r.group, r.depends_on) for r in back] == \
               [(r.id, r.output_tokens, r.arrival, r.group, r.depends_on) for r in reqs]
        assert back[0].text == "hello"


def test_describe_reports_shape():
    d = describe(generate("program_generation", 200, seed=1, scale=0.1))
    assert d["requests"] == 200 and d["groups"] == 20
    assert 0.8 < d["shared_mean"] <= 1.0


# ---------------------------------------------------------------------------------------------- arrivals
def test_poisson_rate_and_determinism():
    t = arrivals.poisson(5000, 20.0, seed=1)
    assert np.all(np.diff(t) >= 0)
    assert len(t) / t[-1] == pytest.approx(20.0, rel=0.05)
    assert arrivals.cv_of(t) == pytest.approx(1.0, abs=0.05)
    assert np.array_equal(t, arrivals.poisson(5000, 20.0, seed=1))
    assert not np.array_equal(t, arrivals.poisson(5000, 20.0, seed=2))


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv(cv):
    t = arrivals.gamma(20000, 10.0, cv=cv, seed=3)
    assert len(t) / t[-1] == pytest.approx(10.0, rel=0.08)
    assert arrivals.cv_of(t) == pytest.approx(cv, rel=0.1)


def test_azure_shape_is_bursty_with_the_mean_rate():
    t = arrivals.azure(20000, 50.0, seed=4)
    assert len(t) == 20000 and np.all(np.diff(t) >= 0)
    assert len(t) / t[-1] == pytest.approx(50.0, rel=0.15)
    per_second = np.bincount(t.astype(int))
    assert per_second.std() / per_second.mean() > 0.4  # far burstier than Poisson's ~0.14 at 50/s
    assert np.array_equal(t, arrivals.azure(20000, 50.0, seed=4))


def test_trace_csv_replay(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,100,10\n"
                 "2023-11-16 18:15:47.6805900,100,10\n"
                 "2023-11-16 18:15:49.6805900,100,10\n")
    t = arrivals.azure_csv(f, 3, time_scale=0.7)
    assert t == pytest.approx([0.0, 0.7, 2.1])
    t5 = arrivals.make_arrivals("azure", 5, rate=2.0, trace=f)  # repeated, rescaled to 2 req/s
    assert len(t5) == 5 and t5[-1] == pytest.approx(2.0)
