"""Simulator vs live: replay a live `compare_routers` run in the simulator and put the two side by side.

    python -m benchmarks.sim_vs_live runs/compare_final [runs/compare_rr ...] [--requests 100 --rate 1.0 ...]
    preble-bench sim-vs-live runs/compare_final runs/compare_rr

Input: one or more directories written by ``python -m benchmarks.compare_routers --out DIR`` (per-router
``<name>.jsonl`` records, ``summary.json``, ``params.json`` when the run wrote it). Several directories are
merged (e.g. one run with preble and cache_aware, another with round_robin); they must be the same workload.

1. Parameters: ``params.json`` of the first directory, else the flags, else inferred from the records
   (request count; rate from the arrival times, which are ``poisson(n, rate, seed)``; KV blocks from the
   router log; model size from the replica log) and checked: the rebuilt workload must have the live run's
   request ids and arrival times, or the command stops.
2. Profile: fitted from the live records of our routers (they carry the backend of each request), on requests
   that had their replica's prefill to themselves (no other prefill on that replica between their send and
   their first token):
   ``ttft = overhead + a * steps + b * n + e * (n * c + n (n + 1) / 2)`` for n uncached tokens on c cached
   ones (vLLM's ``cached_tokens``) in ``steps = ceil(n / max_batched_tokens)`` chunks, a least-absolute-
   relative-error fit (a few requests slowed by something else do not drag it). ``a`` (the per-step cost)
   and ``c`` (per decode-context token) come from the inter-token gaps of requests that decoded alone on
   their replica: ``gap = a + d + c * context`` (``d`` is folded into ``a``: one request cannot separate them).
   These fits use requests that ran while the other replica was quiet; ``contention`` (how much slower a
   prefill is while the other replica computes) comes from the rest and is printed, but only simulated with
   ``--apply-contention``: measured mostly on short prompts, it over-slows the long prefills (BENCHMARKS.md).
3. Workload: the same generator, seed and arrivals (``benchmarks.demo.demo_workload``), and the prompts
   re-tokenized the way the live router saw them: compare_routers sends text decoded from the ids, which the
   router and vLLM tokenize again (BOS included), so the simulator routes the live token ids. Detected from
   the records' prompt lengths (vLLM's ``prompt_tokens``) unless ``--prompt-format`` says.
4. Simulation: 2 engines, block size 32, the live KV capacity (``num_gpu_blocks - 1``: vLLM keeps one null
   block), vLLM's CPU scheduler limits (2048 batched tokens, 128 sequences), the fitted profile, each of our
   policies present in the live run (preble with the live router's ``--time-profile``).

Prints the fitted profile and a table (hit rate, avg / p99 latency, sim vs live), whether the policies rank
the same way by average latency and by hit rate, and writes ``sim_vs_live.json`` into the first directory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim import SimConfig, TimeProfile, simulate

OUR_POLICIES = ("round_robin", "least_load", "cache_aware", "preble")
HEADROOM = 200  # compare_routers' prepare_run(headroom=200)
MAX_MODEL_LEN = {"small": 8192, "tiny": 4096}  # benchmarks.demo.prepare_run


# ---------------------------------------------------------------------------------------------- live runs
def load_live(dirs: Sequence[str | Path]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """{router: records}, {router: live summary} merged over dirs (the first directory that has a router wins)."""
    records: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for d in map(Path, dirs):
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        names = list(summary) or sorted(p.stem for p in d.glob("*.jsonl"))
        for name in names:
            path = d / f"{name}.jsonl"
            if name in records or not path.exists():
                continue
            records[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if name in summary:
                summaries[name] = summary[name]
            else:
                from benchmarks.loadgen import live_summary

                summaries[name] = live_summary(records[name])
    if not records:
        raise SystemExit(f"no <router>.jsonl records in {', '.join(map(str, dirs))}")
    return records, summaries


@dataclass
class RunParams:
    requests: int
    rate: float
    seed: int = 0
    model_size: str = "small"
    num_gpu_blocks: int = 384
    block_size: int = 32
    max_batched_tokens: int = 2048
    max_num_seqs: int = 128  # vLLM's CPU default for the API server
    headroom: int = HEADROOM
    prompt_format: str = "auto"  # text | ids | auto (detect from the records' prompt lengths)
    time_profile: str | None = None  # the live router's --time-profile (default: <model_size>-cpu)
    source: dict[str, str] = field(default_factory=dict)  # where each value came from


def _from_logs(d: Path) -> dict[str, Any]:
    """num_gpu_blocks / block size from our router's log, model size from a replica's log."""
    found: dict[str, Any] = {}
    for log in sorted(d.glob("router-*.log")):
        m = re.search(r"is up \(block size (\d+), (\d+) blocks\)", log.read_text(errors="replace"))
        if m:
            found["block_size"], found["num_gpu_blocks"] = int(m.group(1)), int(m.group(2))
            break
    for log in sorted(d.glob("replica*.log")):
        m = re.search(r"model='[^']*/models/(\w+)'", log.read_text(errors="replace")[:200_000])
        if m:
            found["model_size"] = m.group(1)
            break
    return found


def infer_rate(records: Sequence[dict[str, Any]], seed: int) -> float | None:
    """The Poisson rate whose arrivals (same seed) are the records' arrivals, or None if none fits."""
    from benchmarks.arrivals import poisson

    arr = np.sort([float(r["arrival"]) for r in records if r.get("arrival") is not None])
    if len(arr) != len(records) or not len(arr) or arr[0] <= 0:
        return None
    ratio = poisson(len(arr), 1.0, seed) / arr  # arrivals scale as 1 / rate
    rate = float(np.median(ratio))
    return rate if np.allclose(ratio, rate, rtol=1e-6) else None


def resolve_params(dirs: Sequence[str | Path], records: dict[str, list[dict[str, Any]]],
                   overrides: dict[str, Any]) -> RunParams:
    first = Path(dirs[0])
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for d in reversed([Path(x) for x in dirs]):  # the first directory's files win
        for k, v in _from_logs(d).items():
            values[k], source[k] = v, f"logs of {d}"
    params_path = first / "params.json"
    if params_path.exists():
        saved = json.loads(params_path.read_text())
        aliases = {"n": "requests", "num_requests": "requests"}
        for k, v in saved.items():
            k = aliases.get(k, k).replace("-", "_")
            if k in RunParams.__dataclass_fields__ and k != "source":
                values[k], source[k] = v, str(params_path)
    for k, v in overrides.items():
        if v is not None:
            values[k], source[k] = v, "command line"
    any_records = next(iter(records.values()))
    if "requests" not in values:
        values["requests"], source["requests"] = len(any_records), "records"
    values.setdefault("seed", 0)
    if "rate" not in values:
        rate = infer_rate(any_records, int(values["seed"]))
        if rate is None:
            raise SystemExit("cannot infer the request rate from the arrivals (another seed or arrival process?): "
                             "give --rate and --seed")
        values["rate"], source["rate"] = round(rate, 6), "arrival times"
    p = RunParams(**{k: v for k, v in values.items() if k in RunParams.__dataclass_fields__})
    p.source = source
    return p


# ---------------------------------------------------------------------------------------------- workload
def model_dir(model_size: str) -> Path:
    from benchmarks.demo import ROOT
    from testkit.tiny_model import build_tiny_model

    path = ROOT / ".cache" / "models" / model_size
    if (path / "tokenizer.json").exists():
        return path
    return build_tiny_model(path, size=model_size)  # offline, deterministic (a few seconds)


def rebuild_workload(params: RunParams, live_records: Sequence[dict[str, Any]] | None = None, *,
                     tokenizer: Any = None) -> tuple[list, str]:
    """The live run's requests (ids, arrivals, outputs), with the token ids the live router saw.

    Returns (requests, prompt format used). With live_records, checks ids and arrivals and, for
    prompt_format "auto", picks text or ids by which one gives the records' prompt lengths."""
    from benchmarks.demo import demo_workload

    max_len = MAX_MODEL_LEN.get(params.model_size, 8192)
    requests = demo_workload(params.requests, params.rate, max_prompt=max_len - params.headroom, seed=params.seed)
    if live_records is not None:
        live = {r["id"]: r for r in live_records}
        if set(live) != {r.id for r in requests}:
            raise SystemExit("the rebuilt workload's request ids differ from the live run's: check --requests/--seed")
        worst = max(abs(live[r.id]["arrival"] - r.arrival) for r in requests)
        if worst > 1e-6 * max(1.0, max(r.arrival for r in requests)):
            raise SystemExit(f"arrival times differ from the live run's by up to {worst:.3g} s: check --rate/--seed")
    fmt = params.prompt_format
    if fmt == "ids":
        return requests, fmt
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir(params.model_size)))
    bos = tokenizer.bos_token_id
    retok = []
    for r in requests:  # exactly compare_routers' text, then tokenized as the router and vLLM do
        ids = r.tokens
        text = tokenizer.decode(ids[1:] if ids and ids[0] == bos else ids)
        retok.append(list(tokenizer(text, add_special_tokens=True)["input_ids"]))
    if fmt == "auto":
        if live_records is None:
            fmt = "text"
        else:
            live = {r["id"]: r.get("prompt_tokens") for r in live_records}
            by_text = sum(live[r.id] == len(t) for r, t in zip(requests, retok))
            by_ids = sum(live[r.id] == r.prompt_tokens for r in requests)
            fmt = "text" if by_text >= by_ids else "ids"
    if fmt == "text":
        for r, t in zip(requests, retok):
            r.token_ids = t
    return requests, fmt


# ---------------------------------------------------------------------------------------------- fitting
def _intervals_overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def _first_token_time(r: dict[str, Any]) -> float:
    if r.get("ttft") is not None:
        return r["start"] + r["ttft"]
    end = r.get("end")
    if end is None and r.get("failed_after") is not None:
        end = r["start"] + r["failed_after"]
    return end if end is not None else math.inf


def _end_time(r: dict[str, Any]) -> float:
    if r.get("end") is not None:
        return r["end"]
    if r.get("failed_after") is not None:
        return r["start"] + r["failed_after"]
    return math.inf


def busy_share(recs: Sequence[dict[str, Any]], backend: str, t0: float, t1: float) -> float:
    """Share of [t0, t1] during which another backend had a request in flight (its engine was computing)."""
    spans = sorted((max(t0, q["start"]), min(t1, _end_time(q))) for q in recs
                   if q.get("backend") and q["backend"] != backend and q.get("start") is not None)
    covered, cur = 0.0, None
    for a, b in spans:
        if b <= a:
            continue
        if cur is not None and a <= cur[1]:
            cur[1] = max(cur[1], b)
        else:
            if cur is not None:
                covered += cur[1] - cur[0]
            cur = [a, b]
    if cur is not None:
        covered += cur[1] - cur[0]
    return covered / (t1 - t0) if t1 > t0 else 0.0


def prefill_samples(runs: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, float]]:
    """Requests whose prefill had their replica to themselves: no other request on the same backend between
    being sent and its first token overlapped this one's [send, first token]. Needs the records' backend."""
    out = []
    for name, recs in runs.items():
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            if r.get("backend") and r.get("start") is not None:
                by_backend.setdefault(r["backend"], []).append(r)
        for group in by_backend.values():
            for r in group:
                if r.get("error") or r.get("ttft") is None or r.get("cached_tokens") is None:
                    continue
                s, f = r["start"], r["start"] + r["ttft"]
                if any(q is not r and _intervals_overlap(s, f, q["start"], _first_token_time(q)) for q in group):
                    continue
                c = int(r["cached_tokens"])
                n = max(1, int(r["prompt_tokens"]) - c)
                out.append({"run": name, "n": n, "c": c, "ttft": float(r["ttft"]),
                            "busy": busy_share(recs, r["backend"], s, f)})
    return out


def decode_samples(runs: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, float]]:
    """Mean inter-token gap of requests that decoded alone on their replica (>= 3 streamed tokens)."""
    out = []
    for recs in runs.values():
        for r in recs:
            tt = r.get("token_times") or []
            if r.get("error") or not r.get("backend") or len(tt) < 3 or r.get("end") is None:
                continue
            s0, e0 = r["start"] + tt[0], r["end"]
            if any(q is not r and q.get("backend") == r["backend"] and _intervals_overlap(s0, e0, q["start"], _end_time(q))
                   for q in recs):
                continue
            out.append({"context": float(r["prompt_tokens"] + len(tt) / 2), "gap": (tt[-1] - tt[0]) / (len(tt) - 1),
                        "busy": busy_share(recs, r["backend"], s0, e0)})
    return out


def robust_nnls(X: np.ndarray, y: np.ndarray, *, relative: bool = True, iters: int = 60) -> np.ndarray:
    """Least absolute (relative) error with non-negative coefficients: IRLS, dropping columns that go negative."""
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    active = list(range(X.shape[1]))
    scale = np.where(np.abs(y) > 1e-12, np.abs(y), 1.0) if relative else np.ones_like(y)
    while True:
        coef = np.zeros(X.shape[1])
        if not active:
            return coef
        Xa = X[:, active]
        w = 1.0 / scale**2  # start from least squares (relative), then reweight towards least |error|
        beta = np.zeros(len(active))
        for _ in range(iters):
            sw = np.sqrt(w)
            beta, *_ = np.linalg.lstsq(Xa * sw[:, None], y * sw, rcond=None)
            res = np.abs(y - Xa @ beta)
            w = 1.0 / (scale * np.maximum(res, 1e-4 * scale))
        neg = [active[i] for i, v in enumerate(beta) if v < 0]
        if not neg:
            coef[active] = beta
            return coef
        worst = active[int(np.argmin(beta))]
        active.remove(worst)


@dataclass
class FitResult:
    profile: TimeProfile
    prefill_samples: int
    decode_samples: int
    prefill_median_rel_err: float | None
    decode_gap_median_s: float | None
    contention_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        p = self.profile
        lines = [
            f"fitted profile ({self.prefill_samples} isolated prefills, {self.decode_samples} isolated decodes):",
            f"  overhead = {p.overhead * 1e3:.1f} ms per request (send -> engine, not engine time)",
            f"  a = {p.a * 1e3:.2f} ms per step, b = {p.b * 1e3:.4f} ms per prefill token, "
            f"e = {p.e * 1e6:.3g} us per (query, key) pair",
            f"  c = {p.c * 1e6:.3g} us per decode context token, d = {p.d * 1e3:.2f} ms per decoding request",
            f"  contention = {p.contention:.2f}: steps and overhead x{1 + p.contention:.2f} while the other replica "
            f"computes ({self.contention_samples} prefills overlapped it)",
        ]
        if self.prefill_median_rel_err is not None:
            lines.append(f"  TTFT of the isolated prefills: median |error| {self.prefill_median_rel_err:.0%}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def prefill_design(samples: Sequence[dict[str, float]], max_batched_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns: steps, n, pairs (and ttft): ttft - overhead = a * steps + b * n + e * pairs."""
    steps = np.array([math.ceil(s["n"] / max_batched_tokens) for s in samples], float)
    n = np.array([s["n"] for s in samples], float)
    c = np.array([s["c"] for s in samples], float)
    pairs = n * c + n * (n + 1) / 2
    return np.c_[steps, n, pairs], np.array([s["ttft"] for s in samples], float)


def fit_profile(runs: dict[str, Sequence[dict[str, Any]]], *, max_batched_tokens: int = 2048,
                capacity_blocks: int = 384, name: str = "fitted", quiet_share: float = 0.05) -> FitResult:
    """Fit a, c (decodes), overhead, b, e (prefills) on requests that ran while the other replica was quiet
    (busy share <= quiet_share; all of them if too few), then contention from those that overlapped it:
    the median over them of (ttft / quiet prediction - 1) / busy share."""
    notes: list[str] = []
    dec = decode_samples(runs)
    a, c_coef = 0.0, 0.0
    gap_median = None
    if dec:
        gap_all = np.array([s["gap"] for s in dec])
        gap_median = float(np.median(gap_all))
        keep = [s for s in dec if s["gap"] >= 0.2 * gap_median]  # tokens that reached a starved client in one burst
        if len(keep) < len(dec):
            notes.append(f"{len(dec) - len(keep)} decodes streamed in bursts (gap < 20% of the median) left out")
        quiet = [s for s in keep if s["busy"] <= quiet_share]
        use = quiet if len(quiet) >= 5 else keep
        ctx = np.array([s["context"] for s in use])
        gap = np.array([s["gap"] for s in use])
        if len(gap) >= 5 and np.ptp(ctx) > 0:
            a, c_coef = robust_nnls(np.c_[np.ones_like(ctx), ctx], gap, relative=False)
        elif len(gap):
            a = float(np.median(gap))
    else:
        notes.append("no request decoded alone: per-step cost a fitted from prefills only")
    pre = prefill_samples(runs)
    if len(pre) < 4:
        raise SystemExit(f"only {len(pre)} isolated prefills in the live records (need the routers' backend "
                         "headers, i.e. runs of our router): cannot fit a profile")
    quiet = [s for s in pre if s["busy"] <= quiet_share]
    if len(quiet) < 8:
        notes.append(f"only {len(quiet)} prefills ran with the other replica quiet: fitted on all {len(pre)}")
        quiet = pre
    X, y = prefill_design(quiet, max_batched_tokens)
    if dec:  # a known: fit overhead + b n + e pairs on ttft - a * steps
        overhead, b, e = robust_nnls(np.c_[np.ones(len(y)), X[:, 1:]], y - a * X[:, 0])
    else:
        overhead, a, b, e = robust_nnls(np.c_[np.ones(len(y)), X], y)
    if np.ptp(X[:, 1]) == 0:
        notes.append("all isolated prefills have the same length: b and e are not identified")
    coef = np.array([a, b, e])
    rel = float(np.median(np.abs(overhead + X @ coef - y) / y))
    busy = [s for s in pre if s["busy"] > quiet_share] if quiet is not pre else []
    contention = 0.0
    if len(busy) >= 5:
        Xb, yb = prefill_design(busy, max_batched_tokens)
        share = np.array([s["busy"] for s in busy])
        contention = float(np.clip(np.median((yb / (overhead + Xb @ coef) - 1) / share), 0.0, 5.0))
    else:
        notes.append(f"{len(busy)} prefills overlapped the other replica's work: contention not fitted (0)")
    prof = TimeProfile(name=name, a=float(a), b=float(b), e=float(e), c=float(c_coef), d=0.0,
                       capacity_blocks=capacity_blocks, overhead=float(overhead), contention=contention)
    return FitResult(prof, len(pre), len(dec), rel, gap_median, len(busy), notes)


# ---------------------------------------------------------------------------------------------- compare
def _order(values: dict[str, float | None], *, reverse: bool) -> list[str]:
    known = {k: v for k, v in values.items() if v is not None}
    return sorted(known, key=lambda k: known[k], reverse=reverse)


def compare(sim: dict[str, dict[str, Any]], live: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows (policy, sim/live hit rate, difference in points, avg and p99 latency) and whether the policies
    rank the same way by average latency (lower first) and by hit rate (higher first)."""
    policies = [p for p in sim if p in live]
    rows = []
    for p in policies:
        s, lv = sim[p], live[p]
        sh, lh = s.get("hit_rate"), lv.get("hit_rate")
        rows.append({
            "policy": p, "sim_hit_rate": sh, "live_hit_rate": lh,
            "hit_diff_points": (sh - lh) * 100 if sh is not None and lh is not None else None,
            "sim_avg": s.get("latency_avg"), "live_avg": lv.get("latency_avg"),
            "sim_p99": s.get("latency_p99"), "live_p99": lv.get("latency_p99"),
            "sim_ttft_avg": s.get("ttft_avg"), "live_ttft_avg": lv.get("ttft_avg"),
        })
    out: dict[str, Any] = {"rows": rows}
    for key, metric, reverse in (("latency", "avg", False), ("hit_rate", "hit_rate", True)):
        col = "avg" if metric == "avg" else "hit_rate"
        sim_order = _order({r["policy"]: r[f"sim_{col}"] for r in rows}, reverse=reverse)
        live_order = _order({r["policy"]: r[f"live_{col}"] for r in rows}, reverse=reverse)
        pos = {p: i for i, p in enumerate(live_order)}
        pairs = [(x, y) for i, x in enumerate(sim_order) for y in sim_order[i + 1:] if x in pos and y in pos]
        agree = sum(pos[x] < pos[y] for x, y in pairs)
        out[f"order_{key}"] = {"sim": sim_order, "live": live_order, "agree": sim_order == live_order,
                               "pairs_agree": agree, "pairs": len(pairs)}
    diffs = [abs(r["hit_diff_points"]) for r in rows if r["hit_diff_points"] is not None]
    out["max_abs_hit_diff_points"] = max(diffs) if diffs else None
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def render(result: dict[str, Any]) -> str:
    headers = ["policy", "sim hit", "live hit", "diff pts", "sim avg s", "live avg s", "sim p99 s", "live p99 s",
               "sim TTFT s", "live TTFT s"]
    body = [[r["policy"], _f(r["sim_hit_rate"], "{:.3f}"), _f(r["live_hit_rate"], "{:.3f}"),
             _f(r["hit_diff_points"], "{:+.1f}"), _f(r["sim_avg"], "{:.3f}"), _f(r["live_avg"], "{:.3f}"),
             _f(r["sim_p99"], "{:.3f}"), _f(r["live_p99"], "{:.3f}"), _f(r["sim_ttft_avg"], "{:.3f}"),
             _f(r["live_ttft_avg"], "{:.3f}")] for r in result["rows"]]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    for key, what, sep in (("latency", "avg latency", " < "), ("hit_rate", "hit rate", " > ")):
        o = result[f"order_{key}"]
        verdict = "agree" if o["agree"] else f"differ ({o['pairs_agree']}/{o['pairs']} pairs agree)"
        lines.append(f"order by {what}: sim {sep.join(o['sim'])}; live {sep.join(o['live'])}: {verdict}")
    if result.get("max_abs_hit_diff_points") is not None:
        lines.append(f"hit rates within {result['max_abs_hit_diff_points']:.1f} points")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command
def make_sim_policy(name: str, time_profile: str):
    from preble_router.policies import TimeModel, make_policy

    if name == "preble":  # as the live router: --time-profile <size>-cpu, refined online
        return lambda: make_policy("preble", time_model=TimeModel.from_profile(time_profile))
    return name


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_vs_live", add_help=add_help, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("live_dirs", nargs="+", metavar="DIR", help="compare_routers --out directories (merged)")
    ap.add_argument("--requests", type=int, default=None, help="default: params.json, else the records' count")
    ap.add_argument("--rate", type=float, default=None, help="default: params.json, else from the arrival times")
    ap.add_argument("--seed", type=int, default=None, help="default: params.json, else 0")
    ap.add_argument("--model-size", default=None, choices=["tiny", "small"], help="default: params.json/logs/small")
    ap.add_argument("--num-gpu-blocks", type=int, default=None, help="default: params.json/router log/384")
    ap.add_argument("--prompt-format", default=None, choices=["auto", "text", "ids"],
                    help="what the live run sent (default: params.json, else detected from the prompt lengths)")
    ap.add_argument("--policies", default=None,
                    help=f"comma-separated (default: those of {', '.join(OUR_POLICIES)} in the live run)")
    ap.add_argument("--profile", default=None,
                    help="use this sim profile instead of fitting one (sim.parse_profile syntax)")
    ap.add_argument("--apply-contention", action="store_true",
                    help="simulate with the fitted contention (default: 0; fitted on short prompts it mostly "
                         "measures the servers' own CPU work and over-slows long prefills: see BENCHMARKS.md)")
    ap.add_argument("--override", default=None, metavar="K=V,...",
                    help="change fitted fields before simulating, e.g. contention=0 or overhead=0,c=0")
    ap.add_argument("--out", default=None, help="JSON path (default: DIR/sim_vs_live.json of the first DIR)")
    return ap


def run(args: argparse.Namespace) -> int:
    from benchmarks.sim import parse_profile

    live_records, live_summaries = load_live(args.live_dirs)
    overrides = {"requests": args.requests, "rate": args.rate, "seed": args.seed, "model_size": args.model_size,
                 "num_gpu_blocks": args.num_gpu_blocks, "prompt_format": args.prompt_format}
    params = resolve_params(args.live_dirs, live_records, overrides)
    print(f"live: {', '.join(f'{k} ({len(v)} records)' for k, v in live_records.items())}")
    print("params: " + ", ".join(f"{k}={v}" + (f" [{params.source[k]}]" if k in params.source else "")
                                 for k, v in asdict(params).items() if k != "source"))
    ours = {k: v for k, v in live_records.items() if k in OUR_POLICIES}
    fit = fit_profile(ours or live_records, max_batched_tokens=params.max_batched_tokens,
                      capacity_blocks=params.num_gpu_blocks)
    print(fit.describe())
    profile = parse_profile(args.profile) if args.profile else fit.profile
    if not args.profile and not args.apply_contention:
        profile = replace(profile, contention=0.0)
        print("simulating without contention (--apply-contention to use the fitted value)")
    if args.override:
        kw = {k.strip(): float(v) for k, _, v in (part.partition("=") for part in args.override.split(",") if part)}
        unknown = set(kw) - {"a", "b", "c", "d", "e", "overhead", "contention"}
        if unknown:
            raise SystemExit(f"--override: unknown field(s) {', '.join(sorted(unknown))}")
        profile = replace(profile, **kw)
        print(f"profile after --override: {args.override}")
    requests, fmt = rebuild_workload(params, next(iter(live_records.values())))
    print(f"workload: {len(requests)} requests, {sum(r.prompt_tokens for r in requests)} prompt tokens "
          f"(prompts as {fmt})")
    policies = ([p.strip() for p in args.policies.split(",") if p.strip()] if args.policies
                else [p for p in OUR_POLICIES if p in live_records])
    if not policies:
        raise SystemExit(f"none of {', '.join(OUR_POLICIES)} in the live run: give --policies")
    cfg = SimConfig(gpus=2, block_size=params.block_size, capacity_blocks=params.num_gpu_blocks - 1,
                    max_batched_tokens=params.max_batched_tokens, max_num_seqs=params.max_num_seqs,
                    profile=profile, model="tiny")
    time_profile = params.time_profile or f"{params.model_size}-cpu"
    sim: dict[str, dict[str, Any]] = {}
    for p in policies:
        res = simulate(requests, make_sim_policy(p, time_profile), cfg)
        sim[p] = res.summary
    result = compare(sim, live_summaries)
    title = (f"sim vs live: {params.requests} requests at {params.rate:g}/s, 2 replicas, "
             f"{params.num_gpu_blocks} blocks of {params.block_size}")
    print(f"\n{title}\n{render(result)}")
    out = Path(args.out) if args.out else Path(args.live_dirs[0]) / "sim_vs_live.json"
    doc = {"title": title, "live_dirs": [str(d) for d in args.live_dirs], "params": asdict(params),
           "prompt_format": fmt, "fit": {**asdict(fit.profile), "prefill_samples": fit.prefill_samples,
                                         "decode_samples": fit.decode_samples,
                                         "prefill_median_rel_err": fit.prefill_median_rel_err,
                                         "notes": fit.notes},
           "profile_used": asdict(profile), "sim_config": asdict(cfg), **result,
           "sim": {p: {k: v for k, v in s.items()} for p, s in sim.items()},
           "live": {p: live_summaries[p] for p in sim if p in live_summaries}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
