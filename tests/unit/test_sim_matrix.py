"""benchmarks.sim_matrix: the saturation search, a tiny cell end to end, the table and the CLI."""

from __future__ import annotations

import json
import math

from benchmarks import sim_matrix as sm


def test_search_brackets_and_bisects_a_knee():
    calls = []

    def latency(rate: float) -> float:  # M/M/1-like: 1 s at low load, 3x at rate 20/3
        calls.append(rate)
        return math.inf if rate >= 10 else 1.0 / (1.0 - rate / 10.0)

    res = sm.find_saturation(latency, 1.0, low_load_rate=0.02)
    assert res.saturated
    assert 6.0 <= res.rate <= 20 / 3 + 1e-9  # the highest rate below 3x, within 10%
    assert res.low_load == latency(0.02)
    assert len(calls) < 12
    # from above: halves first
    res2 = sm.find_saturation(latency, 40.0, low_load_rate=0.02)
    assert 6.0 <= res2.rate <= 20 / 3 + 1e-9


def test_search_flags_a_load_it_cannot_saturate():
    res = sm.find_saturation(lambda r: 1.0, 1.0, low_load_rate=0.02, max_steps=3)
    assert not res.saturated and res.rate == 8.0


def test_tiny_cell_and_table(tmp_path):
    from benchmarks.sim import SimConfig

    spec = sm.CellSpec("tool_use", 2, requests=40, search_requests=30, scale=0.05)
    cell = sm.run_cell(spec, SimConfig(gpus=2), None)
    assert cell["rate_searched"] and cell["rate"] > 0 and cell["search"]
    assert set(cell["results"]) == set(sm.POLICIES)
    assert set(cell["ratios"]) == set(sm.POLICIES) - {"preble"}
    md = sm.markdown_table([cell])
    assert md.count("\n") == 2 and "tool use | 2 |" in md
    lines = sm.summary_lines(sm.summary([cell]))
    assert "paper: 1.5x-14.5x avg, 2x-10x p99" in lines[0]


def test_cli_with_given_rates(tmp_path):
    out = tmp_path / "m"
    rc = sm.main(["--workloads", "video_qa", "--gpus", "2", "--requests", "30", "--scale", "0.05",
                  "--rates", "video_qa:2=5", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "matrix.json").read_text())
    assert data["cells"][0]["rate"] == 5 and not data["cells"][0]["rate_searched"]
    assert (out / "matrix.md").read_text().startswith("| workload |")
    assert sm.parse_rates(str(out / "matrix.json")) == {("video_qa", 2): 5.0}
    assert sm.rate_for(sm.parse_rates("video_qa=6.5"), "video_qa", 4) == 26.0


def test_keep_up_stops_the_search_before_the_latency_multiple():
    # latency barely grows, but above 30/s the engines fall behind
    res = sm.find_saturation(lambda r: {"avg": 1.0 + r / 100, "keep_up": 1.0 if r <= 30 else 30 / r}, 8.0,
                             low_load_rate=0.1)
    assert res.saturated and 30 / 1.1 <= res.rate <= 30 * 1.1


def test_keep_up_counts_completions_against_arrivals():
    ok = [{"arrival": float(i), "end": i + 0.5} for i in range(90)]
    assert sm.keep_up(ok) > 0.95
    slow = [{"arrival": float(i), "end": 2.0 * i + 0.5} for i in range(90)]  # served at half the rate
    assert sm.keep_up(slow) < 0.6
