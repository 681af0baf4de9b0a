"""The simulator matrix near saturation: every workload x GPU count, five policies, one table.

    python -m benchmarks.sim_matrix [--workloads tool_use,video_qa] [--gpus 4,8] [--requests N]
                                    [--rates tool_use:4=160,...|matrix.json] [--out runs/sim_matrix_sat]
    (also `preble-bench matrix ...`)

For each workload and GPU count it (1) finds a rate near saturation, (2) runs round_robin, least_load,
cache_aware, preble and lmetric on the same requests at that rate, (3) writes ``matrix.json`` and ``matrix.md``:
avg / p99 latency per policy and preble's ratio to each other policy (other / preble: above 1 is preble
faster), with a closing line that puts the min-max of preble's ratio to round robin next to the paper's
1.5x-14.5x (avg) and 2x-10x (p99).

Near saturation, concretely: **the highest rate at which least_load still keeps up and its average latency
stays under K = 3 times its latency at low load** (low load: the same requests at 1/50 of the workload's
default rate, so requests rarely overlap). "Keeps up": in the last two thirds of the arrival window, as many
requests complete as arrive (at least 90%; see keep_up()).
- Policy-neutral: least_load balances load and ignores caches, so its knee is where the cluster runs out of
  compute when prefixes are not kept together, as for the paper's baseline (SGLang with round-robin data
  parallelism); it is neither of the prefix-aware policies being compared, and it does not depend on
  arrival luck as round robin does.
- Latency and throughput, not engine busy fraction: a continuous-batching engine is "busy" whenever one
  request decodes, so least_load's engines read 0.95-0.99 busy at a third of the rate where its latency
  turns up (tool use, program generation, agents). 3x low-load latency is past the knee of the latency-vs-
  rate curve (tool use on 4 GPUs: 1.3x at 36/s, 1.9x at 72/s, 6.7x at 144/s). Decode-heavy program
  generation instead absorbs overload into ever larger batches (256 sequences per engine) and its latency
  rises only ~2.5x by the time the engines fall behind, so the keep-up test ends its search.
- Searched with short runs of least_load alone (--search-requests, default 500, or more so that a run lasts
  at least 40 low-load latencies: program generation's ~1.2 s requests would otherwise still be filling
  the engines when keep_up starts counting): double (or halve) the workload's default rate until the rates
  bracket saturation, then bisect on a log scale until the bracket is within 10%; the rate used is the
  bracket's low end (the highest rate seen below saturation).

The embodied-agent workload is closed loop (an episode's next step waits for the previous one), so the
number of concurrent episodes bounds the load: the matrix runs the generator's 64 episodes per GPU instead
of 64 in all, which never load 4-8 simulated H100s. A cell whose search never saturates (256x the default
rate) is run at the highest rate tried and flagged.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import arrivals as arrivals_mod
from benchmarks import workloads as wl

POLICIES = ("round_robin", "least_load", "cache_aware", "preble", "lmetric")
REFERENCE_POLICY = "least_load"
K_SATURATION = 3.0
KEEP_UP = 0.9
SEARCH_SPAN = 40  # a search run lasts at least this many low-load latencies (up to SEARCH_MAX requests)
SEARCH_MAX = 5000
LOW_LOAD_FRACTION = 1 / 50
PAPER_AVG = (1.5, 14.5)
PAPER_P99 = (2.0, 10.0)

# Final-run requests per workload (the matrix runs in <= ~12 min on one core; long documents are slow).
DEFAULT_REQUESTS: dict[str, int] = {
    "tool_use": 2000,
    "embodied_agent": 2000,
    "program_generation": 1500,
    "video_qa": 1500,
    "long_doc_qa": 1000,
}
EPISODES_PER_GPU = 64  # embodied_agent: concurrent episodes per GPU (closed loop)

LABELS = {"tool_use": "tool use", "embodied_agent": "embodied agent", "program_generation": "program generation",
          "video_qa": "video QA", "long_doc_qa": "long-doc QA"}


# ---------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    rate: float
    saturated: bool  # K was bracketed (False: not reached by the largest rate tried)
    low_load: float  # the reference policy's avg latency at low load
    points: list[dict[str, float]] = field(default_factory=list)  # every rate tried: rate, avg, multiple


def find_saturation(measure: Callable[[float], dict[str, float] | float], start: float, *, low_load_rate: float,
                    k: float = K_SATURATION, min_keep_up: float = KEEP_UP, tol: float = 0.10,
                    max_steps: int = 8) -> SearchResult:
    """The highest rate (within `tol`, relative) at which the reference policy is below saturation: its average
    latency under k x its average at `low_load_rate`, and (when measure gives it) keeping up with the rate
    (``keep_up``, see keep_up(), at least `min_keep_up`).

    `measure(rate)` returns {"avg": seconds, "keep_up": ratio} or just the average. Double (or halve) from `start`
    until the rates bracket saturation (at most `max_steps` times), then bisect geometrically."""

    def get(rate: float) -> dict[str, float]:
        m = measure(rate)
        return {"avg": float(m)} if not isinstance(m, dict) else m

    base = get(low_load_rate)["avg"]
    pts: list[dict[str, float]] = [{"rate": low_load_rate, "avg": base, "multiple": 1.0}]

    def over(rate: float) -> bool:
        m = get(rate)
        mult = m["avg"] / base if base > 0 else math.inf
        pts.append({"rate": rate, **m, "multiple": mult})
        return mult >= k or m.get("keep_up", 1.0) < min_keep_up

    lo: float | None = None
    hi: float | None = None
    r = start
    if not over(r):
        lo = r
        for _ in range(max_steps):
            r *= 2
            if over(r):
                hi = r
                break
            lo = r
        if hi is None:
            return SearchResult(lo, False, base, pts)
    else:
        hi = r
        for _ in range(max_steps):
            r /= 2
            if r <= low_load_rate:
                return SearchResult(low_load_rate, True, base, pts)
            if not over(r):
                lo = r
                break
            hi = r
        if lo is None:
            return SearchResult(r, True, base, pts)
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        if over(mid):
            hi = mid
        else:
            lo = mid
    return SearchResult(_round_rate(lo), True, base, pts)


def keep_up(records: Sequence[dict[str, Any]]) -> float:
    """Completions over arrivals in the last two thirds of the arrival window: ~1 while the engines keep up
    with the offered rate (in-flight work is about the same at both ends), their capacity / the rate once they
    do not. Arrival times are the offered ones, so a closed-loop workload (steps held back until the previous
    one returns) reads below 1 too when its dependencies, not the offered rate, set the pace."""
    arr = [r["arrival"] for r in records if r.get("arrival") is not None]
    if len(arr) < 3:
        return 1.0
    t0, t2 = min(arr), max(arr)
    t1 = t0 + (t2 - t0) / 3
    arrived = sum(1 for a in arr if t1 < a <= t2)
    done = sum(1 for r in records if r.get("end") is not None and t1 < r["end"] <= t2)
    return done / arrived if arrived else 1.0


def _round_rate(r: float) -> float:
    """Three significant digits."""
    if r <= 0:
        return r
    d = 2 - int(math.floor(math.log10(r)))
    return round(r, d)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class CellSpec:
    workload: str
    gpus: int
    requests: int
    search_requests: int
    seed: int = 0
    scale: float = 1.0
    workload_args: dict[str, Any] = field(default_factory=dict)


def workload_args(name: str, gpus: int) -> dict[str, Any]:
    return {"concurrent": EPISODES_PER_GPU * gpus} if name == "embodied_agent" else {}


def make_requests(spec: CellSpec, n: int, rate: float) -> list[wl.Request]:
    reqs = wl.generate(spec.workload, n, seed=spec.seed, scale=spec.scale, **spec.workload_args)
    wl.with_arrivals(reqs, arrivals_mod.make_arrivals("poisson", n, rate, spec.seed))
    return reqs


def run_policy(spec: CellSpec, policy: str, rate: float, n: int, cfg: Any) -> dict[str, Any]:
    """The run's summary, plus ``keep_up`` (see keep_up())."""
    from benchmarks.sim import simulate

    res = simulate(make_requests(spec, n, rate), policy, cfg)
    return dict(res.summary, keep_up=keep_up(res.records))


RESULT_KEYS = ("latency_avg", "latency_p50", "latency_p99", "ttft_avg", "ttft_p99", "hit_rate", "imbalance",
               "errors", "requests", "throughput_rps", "sim_time_s", "wall_s", "preemptions", "keep_up")


def search_rate(spec: CellSpec, cfg: Any, on_stage: Callable[[str], None] | None = None) -> SearchResult:
    """The cell's rate near saturation: find_saturation() with short runs of the reference policy."""
    stage = on_stage or (lambda s: None)
    start = wl.DEFAULT_RATE_PER_GPU.get(spec.workload, 5.0) * spec.gpus
    low: list[float] = []

    def measure(r: float) -> dict[str, float]:
        # the first call is the low-load one; later runs span >= SEARCH_SPAN low-load latencies, so that
        # filling the engines at the start does not read as falling behind (keep_up)
        n = spec.search_requests if not low else max(spec.search_requests,
                                                     min(SEARCH_MAX, math.ceil(SEARCH_SPAN * r * low[0])))
        stage(f"search {r:.3g}/s x{n}")
        s = run_policy(spec, REFERENCE_POLICY, r, n, cfg)
        avg = float(s["latency_avg"]) if s.get("latency_avg") is not None else math.inf
        low.append(avg)
        return {"avg": avg, "keep_up": float(s["keep_up"]), "throughput": float(s.get("throughput_rps") or 0)}

    return find_saturation(measure, start, low_load_rate=start * LOW_LOAD_FRACTION)


def run_cell(spec: CellSpec, cfg: Any, rate: float | None, policies: Sequence[str] = POLICIES,
             on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Search the cell's rate (unless given), then run every policy at it."""
    stage = on_stage or (lambda s: None)
    t0 = time.perf_counter()
    search: SearchResult | None = None
    if rate is None:
        search = search_rate(spec, cfg, stage)
        rate = search.rate
    search_s = time.perf_counter() - t0
    results: dict[str, dict[str, Any]] = {}
    for p in policies:
        stage(f"{p} @ {rate:g}/s")
        s = run_policy(spec, p, rate, spec.requests, cfg)
        results[p] = {k: s.get(k) for k in RESULT_KEYS}
    cell: dict[str, Any] = {
        "workload": spec.workload, "gpus": spec.gpus, "rate": rate, "requests": spec.requests,
        "workload_args": spec.workload_args, "search_requests": spec.search_requests if search else None,
        "rate_searched": search is not None,
        "saturated": search.saturated if search else None,
        "low_load_avg": search.low_load if search else None,
        "search": search.points if search else [],
        "search_s": search_s, "results": results, "ratios": ratios(results),
        "wall_s": time.perf_counter() - t0,
    }
    ll = results.get(REFERENCE_POLICY, {}).get("latency_avg")
    if search and ll and search.low_load:
        cell["reference_multiple"] = ll / search.low_load  # least_load's multiple in the full run
    return cell


def ratios(results: dict[str, dict[str, Any]], target: str = "preble") -> dict[str, dict[str, float | None]]:
    """other / target for avg and p99 latency: above 1 means `target` is faster."""
    t = results.get(target)
    out: dict[str, dict[str, float | None]] = {}
    if not t:
        return out
    for p, r in results.items():
        if p == target:
            continue
        out[p] = {m: (r[f"latency_{m}"] / t[f"latency_{m}"]
                      if r.get(f"latency_{m}") and t.get(f"latency_{m}") else None) for m in ("avg", "p99")}
    return out


# ---------------------------------------------------------------------------------------------- table
def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}x" if v < 10 else f"{v:.1f}x"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(cells: Sequence[dict[str, Any]], policies: Sequence[str] = POLICIES) -> str:
    others = [p for p in policies if p != "preble"] if "preble" in policies else []
    head = (["workload", "GPUs", "rate/s", "LL x low-load"] + [f"{p} avg / p99" for p in policies]
            + [f"preble vs {p} avg / p99" for p in others])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        mult = c.get("reference_multiple")
        flag = "" if c.get("saturated") in (None, True) else " (not saturated)"
        row = [LABELS.get(c["workload"], c["workload"]), str(c["gpus"]), f"{c['rate']:g}{flag}",
               "-" if mult is None else f"{mult:.1f}"]
        for p in policies:
            r = c["results"].get(p, {})
            row.append(f"{_s(r.get('latency_avg'))} / {_s(r.get('latency_p99'))}")
        for p in others:
            q = c["ratios"].get(p, {})
            row.append(f"{_x(q.get('avg'))} / {_x(q.get('p99'))}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(cells: Sequence[dict[str, Any]], policies: Sequence[str] = POLICIES) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in policies:
        if p == "preble":
            continue
        for m in ("avg", "p99"):
            vals = [c["ratios"][p][m] for c in cells if c["ratios"].get(p, {}).get(m) is not None]
            out[f"{p}_{m}"] = [min(vals), max(vals)] if vals else None
    return out


def summary_lines(summ: dict[str, Any]) -> list[str]:
    def rng(key: str) -> str:
        v = summ.get(key)
        return "-" if not v else f"{_x(v[0])}-{_x(v[1])}"

    lines = []
    if "round_robin_avg" in summ:
        lines.append(f"preble vs round_robin: avg {rng('round_robin_avg')}, p99 {rng('round_robin_p99')} "
                     f"(paper: {PAPER_AVG[0]:g}x-{PAPER_AVG[1]:g}x avg, {PAPER_P99[0]:g}x-{PAPER_P99[1]:g}x p99).")
    for p in ("least_load", "cache_aware", "lmetric"):
        if f"{p}_avg" in summ:
            lines.append(f"preble vs {p}: avg {rng(p + '_avg')}, p99 {rng(p + '_p99')}.")
    return lines


# ---------------------------------------------------------------------------------------------- CLI
def parse_rates(spec: str | None) -> dict[tuple[str, int | None], float]:
    """'tool_use:4=160,video_qa=6.5' (without GPUs: per GPU) or a matrix.json (or suite.json, whose "rates" are
    the cells' saturation rates) from an earlier run."""
    if not spec:
        return {}
    p = Path(spec)
    if spec.endswith(".json") or p.is_file():
        data = json.loads(p.read_text())
        return {(c["workload"], int(c["gpus"])): float(c["rate"]) for c in data.get("rates", data.get("cells"))}
    out: dict[tuple[str, int | None], float] = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"--rates: expected WORKLOAD[:GPUS]=RATE, got {part!r}")
        name, _, g = key.partition(":")
        out[(wl.canonical_name(name.strip()), int(g) if g else None)] = float(val)
    return out


def rate_for(rates: dict[tuple[str, int | None], float], name: str, gpus: int) -> float | None:
    if (name, gpus) in rates:
        return rates[(name, gpus)]
    if (name, None) in rates:
        return rates[(name, None)] * gpus
    return None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", "-w", default=",".join(DEFAULT_REQUESTS),
                   help="Comma-separated workloads.")
    p.add_argument("--gpus", "-g", default="4,8", help="Comma-separated GPU counts.")
    p.add_argument("--requests", "-n", type=int, default=None,
                   help="Requests per final run (default per workload: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REQUESTS.items()) + ").")
    p.add_argument("--search-requests", type=int, default=500, help="Requests per run of the rate search.")
    p.add_argument("--rates", default=None, metavar="W[:G]=RATE,...|JSON",
                   help="Skip the search: cluster rates per cell ('tool_use:4=160'), per-GPU rates ('video_qa=6.5'), "
                        "or an earlier matrix.json. Cells not listed are searched.")
    p.add_argument("--policies", default=",".join(POLICIES), help="Comma-separated policies.")
    p.add_argument("--seed", type=int, default=0, help="Workload and arrival seed.")
    p.add_argument("--scale", type=float, default=1.0, help="Workload size scale (tests).")
    p.add_argument("--out", "-o", default="runs/sim_matrix_sat", help="Directory for matrix.json and matrix.md.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.sim import SimConfig

    names = [wl.canonical_name(w.strip()) for w in args.workloads.split(",") if w.strip()]
    gpus = [int(g) for g in str(args.gpus).split(",") if g.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rates = parse_rates(args.rates)
    out = Path(args.out)
    cells: list[dict[str, Any]] = []
    todo = [(n, g) for n in names for g in gpus]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="matrix", unit="cell", file=sys.stderr)
    t0 = time.perf_counter()
    for name, g in todo:
        n = args.requests or DEFAULT_REQUESTS.get(name, 1000)
        spec = CellSpec(name, g, n, min(args.search_requests, n), seed=args.seed, scale=args.scale,
                        workload_args=workload_args(name, g))

        def stage(s: str, name: str = name, g: int = g) -> None:
            if bar is not None:
                bar.set_postfix_str(f"{name} x{g}: {s}", refresh=True)

        cell = run_cell(spec, SimConfig(gpus=g), rate_for(rates, name, g), policies, on_stage=stage)
        cells.append(cell)
        msg = (f"{name} on {g} GPUs: rate {cell['rate']:g}/s"
               + (f" (least_load {cell.get('reference_multiple', float('nan')):.1f}x its low-load "
                  f"{cell['low_load_avg']:.3f} s; search {cell['search_s']:.0f} s)" if cell["rate_searched"] else "")
               + f", cell {cell['wall_s']:.0f} s")
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summ = summary(cells, policies)
    md = "\n".join([markdown_table(cells, policies), "", *summary_lines(summ)])
    result = {
        "definition": f"rate at which {REFERENCE_POLICY}'s avg latency reaches {K_SATURATION:g}x its avg at "
                      f"{LOW_LOAD_FRACTION:g} x the default rate (log-scale bisection, 10%)",
        "k": K_SATURATION, "reference_policy": REFERENCE_POLICY, "policies": policies,
        "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0,
        "cells": cells, "summary": summ, "paper": {"avg": PAPER_AVG, "p99": PAPER_P99},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "matrix.md").write_text(md + "\n")
    print(md)
    print(f"matrix: {len(cells)} cells in {result['wall_s']:.0f} s; wrote {out}/matrix.json and matrix.md",
          file=sys.stderr)
    return result


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_matrix", add_help=add_help,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], name: str,
             argv: Sequence[str] | None) -> int:
    """Parse `argv`, run; a ValueError (bad workload / policy / rate) exits 2 with its message."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, "sim_matrix", argv)


if __name__ == "__main__":
    sys.exit(main())
