"""benchmarks.policy_bench: a tiny run of every registered policy, its printout and its JSON."""

from __future__ import annotations

import json

from benchmarks import policy_bench as pb
from preble_router.policies import POLICIES


def test_tiny_run_structure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = pb.main(["--rates", "100,1000", "--max-decisions", "150", "--segments", "3", "--prefixes", "8",
                  "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["config"]["policies"]) == set(POLICIES) and data["config"]["policies"][0] == "preble"
    assert data["config"]["rates"] == [100.0, 1000.0]
    cells = data["cells"]
    assert len(cells) == 2 * len(POLICIES)
    for cell in cells:
        assert cell["decisions"] == 150 and cell["sim_seconds"] == 150 / cell["rate"]
        segs = cell["segments"]
        assert len(segs) == 3
        assert segs[0]["first_decision"] == 0 and segs[-1]["last_decision"] == 149
        assert all(s["median_us"] > 0 and s["p99_us"] >= s["median_us"] for s in segs)
        assert cell["growth"] == cell["last_median_us"] / cell["first_median_us"]
    assert set(data["summary"]) == set(POLICIES)
    for s in data["summary"].values():
        assert set(s["last_median_us"]) == {"100", "1000"}
        assert isinstance(s["flat"], bool) and s["growth"] > 0 and s["rate_ratio"] > 0
    printed = capsys.readouterr().out
    assert "median us per segment" in printed and "flat<=20%" in printed
    assert all(name in printed for name in POLICIES)


def test_duration_defaults_to_the_window_and_typos_fail(capsys):
    preble = pb.make_policy("preble")
    assert pb.history_window(preble) == preble.config.window
    assert pb.history_window(pb.make_policy("round_robin")) is None
    assert pb.main(["--policies", "no_such_policy", "--no-progress"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_preble_bench_subcommand(capsys):
    from benchmarks.cli import main

    assert main(["policy-bench", "--policies", "round_robin", "--rates", "100", "--max-decisions", "12",
                 "--segments", "2", "--no-progress"]) == 0
    assert "round_robin" in capsys.readouterr().out
