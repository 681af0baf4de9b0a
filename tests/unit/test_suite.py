"""benchmarks.suite: the statistics and the #20 targets on synthetic numbers, a tiny run end to end, the CLI."""

from __future__ import annotations

import json

import pytest

from benchmarks import sim_matrix as sm
from benchmarks import suite


def _runs(avg: dict[str, list[float]], p99: dict[str, list[float]]) -> dict[str, dict[int, dict[str, float]]]:
    return {p: {s: {"latency_avg": a, "latency_p99": p99[p][s], "hit_rate": 0.5 + s / 10}
                for s, a in enumerate(vals)} for p, vals in avg.items()}


def test_spread_is_min_median_max_over_the_known_values():
    assert suite.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert suite.spread([4.0, None, 1.0]) == {"min": 1.0, "median": 2.5, "max": 4.0, "n": 2}
    assert suite.spread([None]) is None


def test_cell_stats_pairs_seeds_and_finds_the_best_other():
    runs = _runs({"preble": [1.0, 2.0, 4.0], "cache_aware": [2.0, 2.0, 2.0], "round_robin": [4.0, 8.0, 8.0]},
                 {"preble": [1.0, 1.0, 1.0], "cache_aware": [1.0, 2.0, 4.0], "round_robin": [0.5, 0.5, 0.5]})
    st = suite.cell_stats(runs)
    assert st["stats"]["preble"]["avg"] == {"min": 1.0, "median": 2.0, "max": 4.0, "n": 3}
    assert st["stats"]["round_robin"]["hit_rate"]["median"] == pytest.approx(0.6)
    # per seed preble / cache_aware avg: 0.5, 1, 2 -> median 1; p99: 1, 0.5, 0.25 -> 0.5
    assert st["ratios"]["cache_aware"] == {"avg": 1.0, "p99": 0.5}
    # preble / round_robin avg: 0.25, 0.25, 0.5; speedups are the per-seed inverses' median
    assert st["ratios"]["round_robin"]["avg"] == 0.25
    assert st["speedups"]["round_robin"] == {"avg": 4.0, "p99": 0.5}
    # best other: lowest median avg is cache_aware (2 vs 8); lowest median p99 is round_robin (0.5 vs 2)
    assert st["best_other"]["avg"] == {"policy": "cache_aware", "ratio": 1.0}
    assert st["best_other"]["p99"] == {"policy": "round_robin", "ratio": 2.0}


def test_targets_pass_and_fail_on_synthetic_ratios():
    def ratios(avg: float, p99: float) -> dict[str, dict[str, float]]:
        return {"cache_aware": {"avg": avg, "p99": p99}}

    assert suite.check_target("video_qa", 8, "sat", ratios(0.85, 1.0))["pass"]
    assert not suite.check_target("video_qa", 8, "sat", ratios(0.86, 0.5))["pass"]
    assert not suite.check_target("long_doc_qa", 16, "sat", ratios(0.5, 1.01))["pass"]
    assert suite.check_target("tool_use", 16, "sat", ratios(1.0, 0.9))["pass"]
    assert not suite.check_target("embodied_agent", 8, "sat", ratios(1.02, 0.9))["pass"]
    assert suite.check_target("program_generation", 8, "sat", ratios(0.99, 0.99))["avg_limit"] == 1.0
    assert not suite.check_target("tool_use", 8, "sat", ratios(None, 0.9))["pass"]  # type: ignore[arg-type]
    # no target: fewer GPUs, below saturation, no cache_aware
    assert suite.check_target("video_qa", 4, "sat", ratios(2.0, 2.0)) is None
    assert suite.check_target("video_qa", 8, "0.6", ratios(2.0, 2.0)) is None
    assert suite.check_target("video_qa", 8, "sat", {}) is None
    cells = [{"workload": "video_qa", "gpus": 8, "level": "sat", "speedups": {}, "target": t}
             for t in (suite.check_target("video_qa", 8, "sat", ratios(0.8, 0.9)),
                       suite.check_target("video_qa", 8, "sat", ratios(0.9, 0.9)))]
    lines = suite.summary_lines(suite.summary(cells, ["preble", "cache_aware"], ["sat"]))
    assert any("1/2 PASS" in line for line in lines)
    assert sum(line.startswith("- PASS video QA, 8 GPUs") for line in lines) == 1
    assert sum(line.startswith("- FAIL video QA, 8 GPUs: avg 0.9x (<= 0.85x)") for line in lines) == 1


def test_rate_levels():
    assert suite.parse_levels("sat,0.6") == [("sat", 1.0), ("0.6", 0.6)]
    assert suite.parse_levels("1, 0.25") == [("sat", 1.0), ("0.25", 0.25)]
    with pytest.raises(ValueError):
        suite.parse_levels("high")


def test_tiny_suite_end_to_end(tmp_path, capsys):
    out = tmp_path / "s"
    rc = suite.main(["--workloads", "video_qa", "--gpus", "2,8", "--seeds", "0,1", "--rate-levels", "sat,0.5",
                     "--policies", "round_robin,cache_aware,preble", "--requests", "30", "--scale", "0.05",
                     "--rates", "video_qa:2=4,video_qa:8=16", "--out", str(out), "--no-progress",
                     "--preble-exploit-ratio", "0.4"])
    assert rc == 0
    data = json.loads((out / "suite.json").read_text())
    assert data["rates"] == [{"workload": "video_qa", "gpus": 2, "rate": 4.0, "searched": False},
                             {"workload": "video_qa", "gpus": 8, "rate": 16.0, "searched": False}]
    assert data["preble_config"]["exploit_ratio"] == 0.4
    assert [(c["gpus"], c["level"], c["rate"]) for c in data["cells"]] == [(2, "sat", 4.0), (2, "0.5", 2.0),
                                                                           (8, "sat", 16.0), (8, "0.5", 8.0)]
    for c in data["cells"]:
        assert set(c["runs"]) == {"round_robin", "cache_aware", "preble"}
        assert all(set(v) == {"0", "1"} for v in c["runs"].values())
        avgs = [r["latency_avg"] for r in c["runs"]["preble"].values()]
        assert c["stats"]["preble"]["avg"] == {"min": min(avgs), "median": sum(avgs) / 2, "max": max(avgs), "n": 2}
        assert set(c["ratios"]) == {"round_robin", "cache_aware"}
        assert (c["target"] is not None) == (c["gpus"] == 8 and c["level"] == "sat")
    assert len(data["summary"]["targets"]) == 1
    md = (out / "suite.md").read_text()
    assert md.startswith("| workload | GPUs | level | rate/s | policy |")
    assert md.count("| video QA |") == 4 * 3 + 4  # a row per cell and policy, then one per cell
    assert "paper: 1.5x-14.5x avg, 2x-10x p99" in md and "#20 targets" in md
    assert md.strip() in capsys.readouterr().out
    assert {p.name for p in out.glob("*.png")} == {"suite_avg.png", "suite_p99.png", "suite_hit_rate.png"}
    # the rates of a suite.json feed a rerun (sim_matrix.parse_rates)
    assert sm.parse_rates(str(out / "suite.json")) == {("video_qa", 2): 4.0, ("video_qa", 8): 16.0}


def test_jobs_give_the_same_runs_and_the_cli_has_the_subcommand(tmp_path):
    from benchmarks import cli

    args = ["--workloads", "tool_use", "--gpus", "2", "--seeds", "0,1", "--rate-levels", "sat",
            "--policies", "least_load,preble", "--requests", "30", "--scale", "0.05", "--rates", "tool_use=3",
            "--no-progress", "--no-plots"]
    assert cli.main(["suite", *args, "--out", str(tmp_path / "a")]) == 0
    assert suite.main([*args, "--out", str(tmp_path / "b"), "--jobs", "2"]) == 0

    def runs(d: str) -> dict:
        c = json.loads((tmp_path / d / "suite.json").read_text())["cells"][0]
        return {p: {s: {k: v for k, v in r.items() if k != "wall_s"} for s, r in by.items()}
                for p, by in c["runs"].items()}

    assert runs("a") == runs("b")
    assert not list((tmp_path / "a").glob("*.png"))


def test_a_cell_without_a_rate_is_searched_once_with_seed_0(tmp_path, monkeypatch):
    seen = []

    def fake_search(spec):
        seen.append((spec.workload, spec.gpus, spec.seed))
        return sm.SearchResult(6.0, True, 0.01, [{"rate": 0.1, "avg": 0.01, "multiple": 1.0}])

    monkeypatch.setattr(suite, "_search", fake_search)
    assert suite.main(["--workloads", "video_qa", "--gpus", "2", "--seeds", "1,2", "--rate-levels", "sat,0.5",
                       "--policies", "round_robin,preble", "--requests", "20", "--scale", "0.05",
                       "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    assert seen == [("video_qa", 2, 0)]
    data = json.loads((tmp_path / "suite.json").read_text())
    assert data["rates"][0]["searched"] and data["rates"][0]["rate"] == 6.0
    assert [c["rate"] for c in data["cells"]] == [6.0, 3.0]
