"""The whole simulator comparison in one command: workloads x GPU counts x rate levels x seeds x policies.

    python -m benchmarks.suite [--workloads tool_use,video_qa] [--gpus 2,4,8,16] [--rate-levels sat,0.6]
                               [--seeds 0,1,2] [--policies round_robin,...] [--requests N]
                               [--rates tool_use:8=222,...|matrix.json|suite.json] [--jobs 1]
                               [--preble-* ...] [--out runs/suite]
    (also `preble-bench suite ...`)

For each workload and GPU count it finds the rate near saturation as benchmarks/sim_matrix.py defines it
(least_load keeps up and its average latency stays under 3x its low-load latency), once, with seed 0, unless
--rates gives it; each rate level is a fraction of that rate ("sat" = 1). Then every policy runs at every level
with every seed (the seed draws the workload and the Poisson arrivals; every policy gets the same requests).

Per cell (workload, GPUs, rate level) it prints, per policy, the median and the min-max over seeds of the
average and p99 latency and of the hit rate, and preble's ratios preble / other (below 1: preble faster;
the median over seeds of the per-seed ratio, each seed's policies sharing requests) to cache_aware, to
round_robin and to the best other policy (the one with the lowest median). The closing summary gives the
min-max over cells of preble's speedup over each policy (other / preble, as sim_matrix does) beside the paper's
1.5x-14.5x (avg) and 2x-10x (p99) over round robin, and checks issue #20's simulator targets (PASS / FAIL per
cell): at 8 and 16 GPUs near saturation, preble's avg <= 0.85x cache_aware's on video QA and long-document
QA, <= 1.0x on tool use, embodied agents and program generation, and its p99 <= 1.0x cache_aware's in all
of them.

Writes suite.json (every run's summary, the statistics, the rates: `--rates suite.json` reruns without the
searches), suite.md and one plot per metric (suite_avg.png, suite_p99.png, suite_hit_rate.png) to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks import sim_matrix as sm
from benchmarks import workloads as wl

DEFAULT_GPUS = (2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LEVELS = "sat,0.6"
SAT = "sat"
# issue #20: preble avg / cache_aware avg at most this, at TARGET_GPUS near saturation; p99 at most P99_TARGET
AVG_TARGETS = {"video_qa": 0.85, "long_doc_qa": 0.85, "tool_use": 1.0, "embodied_agent": 1.0,
               "program_generation": 1.0}
P99_TARGET = 1.0
TARGET_GPUS = (8, 16)
TARGET_BASELINE = "cache_aware"
METRICS = {"avg": "latency_avg", "p99": "latency_p99", "hit_rate": "hit_rate"}  # name -> run summary key
RATIO_METRICS = ("avg", "p99")


# ---------------------------------------------------------------------------------------------- statistics
def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """min / median / max of the values that are not None (None if none is)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def _median(values: Sequence[float | None]) -> float | None:
    s = spread(values)
    return None if s is None else s["median"]


def paired_ratios(runs: dict[str, dict[int, dict[str, Any]]], target: str = "preble",
                  invert: bool = False) -> dict[str, dict[str, float | None]]:
    """Per other policy and metric: the median over seeds of target / other (invert: other / target), each seed
    paired with itself (same requests; sim_matrix.ratios per seed)."""
    if target not in runs:
        return {}
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    per_seed = [sm.ratios({p: by_seed[s] for p, by_seed in runs.items() if s in by_seed}, target) for s in seeds]
    return {p: {m: _median([q[p][m] if invert else 1 / q[p][m] for q in per_seed if q.get(p, {}).get(m)])
                for m in RATIO_METRICS} for p in runs if p != target}


def cell_stats(runs: dict[str, dict[int, dict[str, Any]]], target: str = "preble",
               baselines: Collection[str] = ()) -> dict[str, Any]:
    """Per-policy spreads over seeds, target's ratios (target / other) and speedups (other / target), and for
    each ratio metric the best other policy (lowest median) with target's ratio to it. `baselines` are shown
    with their ratios but never count as the best other (a diagnostic placement, not a router to beat)."""
    stats = {p: {m: spread([r.get(key) for r in by_seed.values()]) for m, key in METRICS.items()}
             for p, by_seed in runs.items()}
    ratios = paired_ratios(runs, target)
    best: dict[str, dict[str, Any] | None] = {}
    for m in RATIO_METRICS:
        cands = [(stats[p][m]["median"], p) for p in runs if p != target and p not in baselines and stats[p][m]]
        best[m] = None
        if cands and target in runs:
            p = min(cands)[1]
            best[m] = {"policy": p, "ratio": ratios[p][m]}
    return {"stats": stats, "ratios": ratios, "speedups": paired_ratios(runs, target, invert=True),
            "best_other": best}


def check_target(workload: str, gpus: int, level: str, ratios: dict[str, dict[str, float | None]]
                 ) -> dict[str, Any] | None:
    """Issue #20's simulator target for a cell, or None where none applies. `ratios`: preble / other."""
    if level != SAT or gpus not in TARGET_GPUS or workload not in AVG_TARGETS:
        return None
    r = ratios.get(TARGET_BASELINE)
    if r is None:
        return None
    avg, p99 = r.get("avg"), r.get("p99")
    limit = AVG_TARGETS[workload]
    ok = avg is not None and p99 is not None and avg <= limit and p99 <= P99_TARGET
    return {"avg": avg, "avg_limit": limit, "p99": p99, "p99_limit": P99_TARGET, "pass": ok}


# ---------------------------------------------------------------------------------------------- tables
def _med(s: dict[str, float] | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def _level_label(level: str) -> str:
    return "sat" if level == SAT else f"{level}x sat"


def _cell_head(c: dict[str, Any]) -> list[str]:
    return [sm.LABELS.get(c["workload"], c["workload"]), str(c["gpus"]), _level_label(c["level"]), f"{c['rate']:.3g}"]


def policy_table(cells: Sequence[dict[str, Any]]) -> str:
    """One row per cell and policy: median (min-max over seeds)."""
    head = ["workload", "GPUs", "level", "rate/s", "policy", "avg s", "p99 s", "hit rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        for p, st in c["stats"].items():
            row = _cell_head(c) + [p, _med(st["avg"]), _med(st["p99"]), _med(st["hit_rate"], 2)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_table(cells: Sequence[dict[str, Any]]) -> str:
    """One row per cell: preble / cache_aware, / round_robin, / the best other policy; the #20 target."""
    head = ["workload", "GPUs", "level", "rate/s", "preble / cache_aware avg / p99",
            "preble / round_robin avg / p99", "preble / best other avg", "preble / best other p99", "#20 target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = _cell_head(c)
        for p in ("cache_aware", "round_robin"):
            q = c["ratios"].get(p, {})
            row.append(f"{sm._x(q.get('avg'))} / {sm._x(q.get('p99'))}")
        for m in RATIO_METRICS:
            b = c["best_other"].get(m)
            row.append("-" if not b else f"{sm._x(b['ratio'])} ({b['policy']})")
        t = c.get("target")
        row.append("-" if t is None else ("PASS" if t["pass"] else "FAIL"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(cells: Sequence[dict[str, Any]], policies: Sequence[str], levels: Sequence[str]) -> dict[str, Any]:
    """Speedup ranges (sim_matrix.summary over the cells' speedups) for all cells and per level; targets."""
    def ranges(cs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return sm.summary([{"ratios": c["speedups"]} for c in cs], policies)

    targets = [{"workload": c["workload"], "gpus": c["gpus"], "level": c["level"], **c["target"]}
               for c in cells if c.get("target")]
    return {"all": ranges(cells), "by_level": {lv: ranges([c for c in cells if c["level"] == lv]) for lv in levels},
            "targets": targets, "targets_passed": sum(t["pass"] for t in targets)}


def summary_lines(summ: dict[str, Any]) -> list[str]:
    lines = ["Speedups of preble, other / preble (above 1: preble faster), min-max over cells of the median over "
             "seeds:"]
    groups = [("all cells", summ["all"])] + [(_level_label(lv), s) for lv, s in summ["by_level"].items()]
    if len(groups) == 2:
        groups = groups[:1]
    for name, s in groups:
        lines += [f"- {name}: {line}" for line in sm.summary_lines(s)]
    lines.append("")
    if not summ["targets"]:
        lines.append(f"#20 targets: no cell in this run (they need {' or '.join(map(str, TARGET_GPUS))} GPUs, "
                     f"level {SAT}, preble and {TARGET_BASELINE}).")
        return lines
    lines.append(f"#20 targets (preble / {TARGET_BASELINE}, median over seeds; "
                 f"{' and '.join(map(str, TARGET_GPUS))} GPUs near saturation): "
                 f"{summ['targets_passed']}/{len(summ['targets'])} PASS")
    for t in summ["targets"]:
        lines.append(f"- {'PASS' if t['pass'] else 'FAIL'} {sm.LABELS.get(t['workload'], t['workload'])}, "
                     f"{t['gpus']} GPUs: avg {sm._x(t['avg'])} (<= {t['avg_limit']:g}x), "
                     f"p99 {sm._x(t['p99'])} (<= {t['p99_limit']:g}x)")
    return lines


# ---------------------------------------------------------------------------------------------- plots
def plot_metric(cells: Sequence[dict[str, Any]], policies: Sequence[str], metric: str, path: Path) -> Path:
    """Grouped bars: the median of `metric` per policy per cell, min-max error bars."""
    import numpy as np

    from benchmarks import report

    plt = report._plt()
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(cells) * len(policies) + 2), 4.8))
    x = np.arange(len(cells))
    for i, p in enumerate(policies):
        st = [c["stats"].get(p, {}).get(metric) for c in cells]
        med = [s["median"] if s else np.nan for s in st]
        err = [[s["median"] - s["min"] if s else 0 for s in st], [s["max"] - s["median"] if s else 0 for s in st]]
        ax.bar(x + (i - (len(policies) - 1) / 2) * width, med, width, yerr=err, capsize=2, label=p)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c['workload']}\n{c['gpus']} GPUs, {_level_label(c['level'])}" for c in cells],
                       fontsize=7, rotation=90 if len(cells) > 8 else 0)
    if metric == "hit_rate":
        ax.set_ylabel("hit rate (median, min-max over seeds)")
    else:
        ax.set_ylabel(f"{metric} latency, s (median, min-max over seeds; log)")
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"simulator suite: {metric}")
    return report._save(plt, fig, path)


# ---------------------------------------------------------------------------------------------- runs
def _search(spec: sm.CellSpec) -> sm.SearchResult:
    from benchmarks.sim import SimConfig

    return sm.search_rate(spec, SimConfig(gpus=spec.gpus))


def _run(spec: sm.CellSpec, policy: Any, rate: float) -> dict[str, Any]:
    from benchmarks.sim import SimConfig

    s = sm.run_policy(spec, policy, rate, spec.requests, SimConfig(gpus=spec.gpus))
    return {k: s.get(k) for k in sm.RESULT_KEYS}


def parse_levels(spec: str) -> list[tuple[str, float]]:
    """'sat,0.6' -> [('sat', 1.0), ('0.6', 0.6)]: fractions of the saturation rate."""
    out = []
    for part in cli._csv(spec):
        if part == SAT:
            out.append((SAT, 1.0))
            continue
        try:
            f = float(part)
        except ValueError:
            raise ValueError(f"--rate-levels: expected '{SAT}' or a fraction, got {part!r}") from None
        out.append((SAT, 1.0) if f == 1.0 else (f"{f:g}", f))
    return out


def _ints(spec: str | Sequence[int]) -> list[int]:
    return [int(v) for v in (cli._csv(spec) if isinstance(spec, str) else spec)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from preble_router.policies import POLICIES, PrebleConfig, make_policy
    from preble_router.settings import from_args

    names = [wl.canonical_name(w) for w in cli._csv(args.workloads)]
    gpus = _ints(args.gpus)
    seeds = _ints(args.seeds)
    levels = parse_levels(args.rate_levels)
    policies = cli._csv(args.policies) if args.policies else list(POLICIES)
    for p in policies:
        make_policy(p)  # fail fast on a typo
    policy_objs = {p: cli.sim_policy(args, p) for p in policies}
    given = sm.parse_rates(args.rates)
    out = Path(args.out)
    t0 = time.perf_counter()

    def spec(name: str, g: int, seed: int) -> sm.CellSpec:
        n = args.requests or sm.DEFAULT_REQUESTS.get(name, 1000)
        return sm.CellSpec(name, g, n, min(args.search_requests, n), seed=seed, scale=args.scale,
                           workload_args=sm.workload_args(name, g))

    pairs = [(n, g) for n in names for g in gpus]
    rates: dict[tuple[str, int], dict[str, Any]] = {}
    runs: dict[tuple[str, int, str, int, str], dict[str, Any]] = {}
    to_search = [k for k in pairs if sm.rate_for(given, *k) is None]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        total = len(to_search) + len(pairs) * len(levels) * len(seeds) * len(policies)
        bar = tqdm(total=total, desc="suite", unit="run", file=sys.stderr)

    def note(msg: str) -> None:
        (bar.write if bar is not None else print)(msg, file=sys.stderr)

    pool: cf.Executor = (cf.ThreadPoolExecutor(1) if args.jobs <= 1 else cf.ProcessPoolExecutor(args.jobs))
    pending: dict[cf.Future, tuple] = {}

    def submit_runs(name: str, g: int, sat_rate: float) -> None:
        for level, frac in levels:
            for seed in seeds:
                for p in policies:
                    f = pool.submit(_run, spec(name, g, seed), policy_objs[p], sat_rate * frac)
                    pending[f] = ("run", (name, g, level, seed, p))

    with pool:
        for k in to_search:
            pending[pool.submit(_search, spec(*k, 0))] = ("search", k)
        for k in pairs:
            if k not in to_search:
                r = float(sm.rate_for(given, *k))  # type: ignore[arg-type]
                rates[k] = {"workload": k[0], "gpus": k[1], "rate": r, "searched": False}
                submit_runs(*k, r)
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                kind, key = pending.pop(f)
                res = f.result()
                if kind == "search":
                    rates[key] = {"workload": key[0], "gpus": key[1], "rate": res.rate, "searched": True,
                                  "saturated": res.saturated, "low_load_avg": res.low_load, "search": res.points}
                    note(f"{key[0]} on {key[1]} GPUs: near saturation at {res.rate:g}/s"
                         + ("" if res.saturated else " (not saturated)"))
                    submit_runs(*key, res.rate)
                else:
                    runs[key] = res
                if bar is not None:
                    bar.set_postfix_str(f"{key[0]} x{key[1]}" + (f" {key[2]} s{key[3]} {key[4]}"
                                                                 if kind == "run" else " search"), refresh=False)
                    bar.update(1)
    if bar is not None:
        bar.close()

    cells = []
    for name, g in pairs:
        for level, frac in levels:
            by_policy = {p: {s: runs[(name, g, level, s, p)] for s in seeds} for p in policies}
            cell = {"workload": name, "gpus": g, "level": level, "fraction": frac,
                    "rate": rates[(name, g)]["rate"] * frac, "sat_rate": rates[(name, g)]["rate"],
                    "requests": spec(name, g, 0).requests, "seeds": seeds,
                    "runs": {p: {str(s): r for s, r in v.items()} for p, v in by_policy.items()},
                    **cell_stats(by_policy)}
            cell["target"] = check_target(name, g, level, cell["ratios"])
            cells.append(cell)
    summ = summary(cells, policies, [lv for lv, _ in levels])
    md = "\n".join([policy_table(cells), "", ratio_table(cells), "", *summary_lines(summ)])
    result = {
        "definition": "rate levels are fractions of the rate near saturation (benchmarks/sim_matrix.py: "
                      f"{sm.REFERENCE_POLICY} keeps up and its avg latency stays under {sm.K_SATURATION:g}x its "
                      "low-load avg; searched once per workload x GPUs with seed 0)",
        "ratios": "preble / other, median over seeds of the per-seed ratio (below 1: preble faster); "
                  "speedups: other / preble",
        "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0,
        "workloads": names, "gpus": gpus, "levels": dict(levels), "seeds": seeds, "policies": policies,
        "scale": args.scale, "preble_config": asdict(from_args(PrebleConfig, args)),
        "rates": [rates[k] for k in pairs], "cells": cells, "summary": summ,
        "paper": {"avg": sm.PAPER_AVG, "p99": sm.PAPER_P99},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "suite.md").write_text(md + "\n")
    if not args.no_plots:
        for m in METRICS:
            plot_metric(cells, policies, m, out / f"suite_{m}.png")
    print(md)
    print(f"suite: {len(runs)} runs in {len(cells)} cells, {result['wall_s']:.0f} s; wrote {out}/suite.json, "
          f"suite.md{'' if args.no_plots else ' and plots'}", file=sys.stderr)
    return result


# ---------------------------------------------------------------------------------------------- CLI
def add_args(p: argparse.ArgumentParser) -> None:
    from preble_router.policies import POLICIES

    p.add_argument("--workloads", "-w", default=",".join(sm.DEFAULT_REQUESTS), help="Comma-separated workloads.")
    p.add_argument("--gpus", "-g", default=",".join(map(str, DEFAULT_GPUS)), help="Comma-separated GPU counts.")
    p.add_argument("--rate-levels", default=DEFAULT_LEVELS,
                   help=f"Comma-separated fractions of the rate near saturation ('{SAT}' = 1).")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="Comma-separated seeds (workload and arrivals).")
    p.add_argument("--policies", "-p", default=",".join(POLICIES), help="Comma-separated policies.")
    p.add_argument("--requests", "-n", type=int, default=None,
                   help="Requests per run (default per workload: "
                        + ", ".join(f"{k} {v}" for k, v in sm.DEFAULT_REQUESTS.items()) + ").")
    p.add_argument("--search-requests", type=int, default=500, help="Requests per run of the rate search.")
    p.add_argument("--rates", default=None, metavar="W[:G]=RATE,...|JSON",
                   help="Skip the search: rates near saturation per cell ('tool_use:4=111'), per GPU "
                        "('video_qa=4.2'), or an earlier matrix.json or suite.json. Cells not listed are searched.")
    p.add_argument("--jobs", "-j", type=int, default=1, help="Simulations run in parallel processes.")
    p.add_argument("--scale", type=float, default=1.0, help="Workload size scale (tests).")
    p.add_argument("--out", "-o", default="runs/suite", help="Directory for suite.json, suite.md and plots.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--no-plots", action="store_true", help="Write the tables and JSON only.")
    cli.add_preble_args(p)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return sm.run_main(build_parser(), run, "suite", argv)


if __name__ == "__main__":
    sys.exit(main())
