"""`preble-bench`: Preble's workloads, the cluster simulator, the live load generator, comparisons.

    preble-bench workload --workload tool_use --requests 2000 --describe [--out reqs.jsonl]
    preble-bench sim      --workload tool_use --gpus 4 --policies round_robin,least_load,cache_aware \\
                          --requests 10000 --rate 36 [--out runs/sim-tool]
    preble-bench live     --url http://127.0.0.1:8080 --workload tool_use --rate 2 --requests 200 \\
                          --scale 0.1 --vocab 1024 [--out runs/live.jsonl]
    preble-bench compare  --mode sim --workload video_qa --gpus 8 --policies round_robin,cache_aware \\
                          --rates 20,40,60 --requests 5000 --out runs/cmp-video
    preble-bench compare  --mode live --targets rr=http://127.0.0.1:8081,ca=http://127.0.0.1:8082 \\
                          --workload tool_use --rates 1,2 --requests 200 --scale 0.1 --vocab 1024
    preble-bench sim-vs-live runs/compare [runs/compare_rr]   # a compare_routers run, replayed in the simulator
    preble-bench matrix   [--workloads tool_use,video_qa] [--gpus 4,8]    # every workload near saturation
    preble-bench suite    [--gpus 2,4,8,16] [--rate-levels sat,0.6] [--seeds 0,1,2] [--jobs 1]   # all of it, seeds
    preble-bench policy-bench [--rates 100,1000,10000]    # us per routing decision as policy windows fill
    preble-bench live-suite [--mixes tool,docqa,chat,mixed,hot,longdoc] [--seeds 0,1,2]   # real vLLM, 5 routers

Rates are requests per second for the whole cluster (the paper gives its rates per 2 GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import arrivals as arrivals_mod
from benchmarks import workloads as wl

LIVE_VOCAB = 1024  # safe for any real model (and the tiny test model's 1024-token vocabulary)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, [], False, argparse.SUPPRESS):
            return h
        return h + " (default: %(default)s)"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _kv_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _workload_arg(spec: str) -> tuple[str, Any]:
    k, sep, v = spec.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {spec!r}")
    return k.strip().replace("-", "_"), _kv_value(v.strip())


# ---------------------------------------------------------------------------------------------- arguments
def add_workload_args(p: argparse.ArgumentParser, *, default_vocab: int | None = wl.DEFAULT_VOCAB,
                      default_requests: int = 1000) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", "-w", default=None,
                   help=f"Workload to generate: {', '.join(wl.WORKLOAD_NAMES)} (aliases: tool, agent, program, "
                        "video, doc). Required unless --workload-file is given.")
    g.add_argument("--workload-file", default=None, metavar="JSONL",
                   help="Load requests saved by `preble-bench workload --out` instead of generating them. Their "
                        "arrival times are kept unless a rate is given.")
    g.add_argument("--requests", "-n", type=int, default=None,
                   help=f"Number of requests (default: {default_requests}; with --workload-file, all of it).")
    p.set_defaults(default_requests=default_requests)
    g.add_argument("--seed", type=int, default=0, help="Seed of the workload and of the arrival process.")
    g.add_argument("--scale", type=float, default=1.0,
                   help="Multiply every prompt segment and output length (e.g. 0.1 to fit a small CPU model).")
    g.add_argument("--output-scale", type=float, default=None, help="Scale of output lengths (default: --scale).")
    g.add_argument("--vocab", type=int, default=default_vocab,
                   help="Synthetic token ids are drawn from [16, VOCAB): must not exceed the model's vocabulary"
                        + ("." if default_vocab else f" (default: {wl.DEFAULT_VOCAB} in the simulator, "
                           f"{LIVE_VOCAB} live, which suits any model)."))
    g.add_argument("--workload-arg", type=_workload_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="Generator parameter, repeatable, e.g. n_tools=1000, video_cap_tokens=32768, docs=24, "
                        "concurrent=128, samples_per_problem=5 (see benchmarks/workloads.py).")
    g.add_argument("--components", default="tool_use:0.5,video_qa:0.5",
                   help="For --workload mix: weighted components.")
    a = p.add_argument_group("arrivals")
    a.add_argument("--arrivals", default="poisson", choices=["poisson", "gamma", "azure"],
                   help="Arrival process: poisson; gamma (bursty, see --cv); azure (synthetic Azure-LLM-trace "
                        "shape, or a real trace with --trace).")
    a.add_argument("--cv", type=float, default=2.0, help="Coefficient of variation of gaps for --arrivals gamma.")
    a.add_argument("--trace", default=None, metavar="CSV",
                   help="Replay arrival times from a trace CSV (a TIMESTAMP column, e.g. the Azure LLM inference "
                        "trace), rescaled to the rate.")
    a.add_argument("--time-scale", type=float, default=0.7, help="Time compression of --trace (paper: 0.7).")


def add_sim_args(p: argparse.ArgumentParser) -> None:
    from benchmarks.sim import PROFILES, SimConfig
    from preble_router.settings import add_flags

    g = p.add_argument_group("simulated cluster")
    add_flags(g, SimConfig)
    g.add_argument("--policies", "-p", type=_csv, default="round_robin,least_load,cache_aware",
                   help="Comma-separated policy names from preble_router.policies.POLICIES.")
    g.add_argument("--profile", default="llama3-8b-h100",
                   help=f"Time profile: {', '.join(PROFILES)}, optionally with overrides "
                        "'NAME:a=0.006,b=2.7e-5,c=5e-8,d=2.7e-5,e=1.2e-9,capacity_blocks=25000' (see sim.py).")
    add_preble_args(p)


def add_preble_args(p: argparse.ArgumentParser) -> None:
    """The --preble-* settings of PrebleConfig (read back by sim_policy())."""
    from preble_router.policies import PrebleConfig
    from preble_router.settings import add_flags

    add_flags(p.add_argument_group("preble policy (--policies preble; docs/design.md)"), PrebleConfig)


def add_common_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", "-o", default=None, help=what)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--no-plots", action="store_true", help="Write tables and JSON only.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preble-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter

    w = sub.add_parser("workload", help="Generate a workload, describe it, save it as JSONL.", formatter_class=fmt,
                       description="Generate (or load) a workload; print its shape next to the spec's table.")
    add_workload_args(w)
    w.add_argument("--rate", type=float, default=None, help="Assign arrival times at this rate (req/s).")
    w.add_argument("--describe", action="store_true", help="Print prompt/output/shared-fraction statistics.")
    w.add_argument("--inline-tokens", action="store_true", help="Write token ids instead of segment keys.")
    w.add_argument("--out", "-o", default=None, help="Write the requests to this JSONL file.")

    s = sub.add_parser("sim", help="Simulate G vLLM-like engines behind the router, one run per policy.",
                       formatter_class=fmt, description="Discrete-event simulation of the router in front of "
                       "G simulated vLLM engines (benchmarks/sim.py), one run per policy on the same requests.")
    add_workload_args(s, default_requests=10000)
    add_sim_args(s)
    s.add_argument("--rate", "-r", type=float, default=None,
                   help="Cluster request rate (req/s). Default: the workload's default per GPU x GPUs "
                        f"({', '.join(f'{k} {v:g}' for k, v in wl.DEFAULT_RATE_PER_GPU.items())}).")
    add_common_out(s, "Directory for summary.json, table.txt, per-request JSONL and plots.")

    lv = sub.add_parser("live", help="Open-loop load against an OpenAI-compatible endpoint.", formatter_class=fmt,
                        description="Replay a workload against a running vLLM server or preble-router "
                        "(/v1/completions, token-id prompts, streaming).")
    lv.add_argument("--url", required=True, help="Base URL of the endpoint, e.g. http://127.0.0.1:8080.")
    add_workload_args(lv, default_vocab=LIVE_VOCAB, default_requests=200)
    lv.add_argument("--rate", "-r", type=float, required=True, help="Request rate (req/s).")
    lv.add_argument("--model", default=None, help="Model name to send (default: the first of /v1/models).")
    lv.add_argument("--timeout", type=float, default=600.0, help="Seconds per request before it counts as failed.")
    lv.add_argument("--prompt-format", default="ids", choices=["ids", "text"],
                    help="Send token ids (default), or a text stand-in (one word per id) for text-only servers.")
    lv.add_argument("--out", "-o", default=None,
                    help="Per-request results JSONL (the summary goes next to it as .summary.json).")
    lv.add_argument("--no-progress", action="store_true", help="No progress bar.")

    c = sub.add_parser("compare", help="Several policies (or endpoints) x rates on one workload: table + plots.",
                       formatter_class=fmt, description="Run several policies on the same requests, at one or "
                       "more rates, in the simulator (--mode sim) or against running endpoints (--mode live), "
                       "and write a table and PNG plots (latency/TTFT CDFs, latency vs rate).")
    c.add_argument("--mode", choices=["sim", "live"], default="sim", help="Simulator or live endpoints.")
    add_workload_args(c, default_vocab=None, default_requests=2000)
    add_sim_args(c)
    c.add_argument("--rates", type=_floats, default=None,
                   help="Comma-separated cluster rates (req/s). Default (sim): the workload's default.")
    c.add_argument("--targets", type=_csv, default=[], metavar="NAME=URL,...",
                   help="--mode live: the endpoints to compare, e.g. routers started with different --policy.")
    c.add_argument("--live-model", default=None, help="--mode live: model name (default: from /v1/models).")
    c.add_argument("--timeout", type=float, default=600.0, help="--mode live: seconds per request.")
    c.add_argument("--reset-prefix-cache", type=_csv, default=[], metavar="URL,...",
                   help="--mode live: vLLM servers to POST /reset_prefix_cache before each run (needs "
                        "VLLM_SERVER_DEV_MODE=1 on them), so every run starts cold.")
    c.add_argument("--pause", type=float, default=0.0, help="--mode live: seconds to wait between runs.")
    add_common_out(c, "Output directory (default: runs/compare-<mode>-<workload>-<time>).")

    from benchmarks import sim_vs_live

    sub.add_parser("sim-vs-live", parents=[sim_vs_live.build_parser(add_help=False)], formatter_class=fmt,
                   help="Replay a live compare_routers run in the simulator (profile fitted from it); table.",
                   description="Fit a step-time profile to a `python -m benchmarks.compare_routers --out DIR` run, "
                   "simulate the same workload (same ids, arrivals, re-tokenized prompts) on 2 engines with the "
                   "same KV capacity for each of our policies in the run, and print sim vs live hit rate and "
                   "latency, and whether the policies rank the same way (benchmarks/sim_vs_live.py).")

    from benchmarks import sim_matrix

    sub.add_parser("matrix", parents=[sim_matrix.build_parser(add_help=False)], formatter_class=fmt,
                   help="Simulated workloads x GPU counts near saturation, four policies: one table.",
                   description="For each workload and GPU count, find the rate at which least_load's avg latency "
                   "reaches 3x its low-load latency, run round_robin, least_load, cache_aware and preble there, and "
                   "write matrix.json and matrix.md (benchmarks/sim_matrix.py).")

    from benchmarks import suite

    sub.add_parser("suite", parents=[suite.build_parser(add_help=False)], formatter_class=fmt,
                   help="The simulator comparison: workloads x GPUs x rate levels x seeds x policies.",
                   description="For each workload and GPU count, find the rate near saturation (as `matrix` does; "
                   "once, seed 0) unless --rates gives it, run every policy at each rate level and seed, and write "
                   "suite.json, suite.md and plots: min / median / max over seeds, preble's ratios, issue #20's "
                   "targets PASS / FAIL (benchmarks/suite.py).")

    from benchmarks import live_suite

    sub.add_parser("live-suite", parents=[live_suite.build_parser(add_help=False)], formatter_class=fmt,
                   help="The live comparison: workload mixes x seeds x routers on two vLLM CPU replicas.",
                   description="benchmarks/live_suite.py: every router on the same requests per mix and seed, "
                   "caches emptied between them; min / median / max over seeds, preble's ratios to the best other "
                   "router, issue #20's live targets PASS / FAIL, and each mix replayed in the simulator.")

    from benchmarks import policy_bench

    sub.add_parser("policy-bench", parents=[policy_bench.build_parser(add_help=False)], formatter_class=fmt,
                   help="Microseconds per routing decision (decide + dispatch) per policy x rate, no HTTP.",
                   description="benchmarks/policy_bench.py: every policy through the real Router on a simulated "
                   "clock; us per decision in segments as the history windows fill, and whether it stays flat.")
    return p


# ---------------------------------------------------------------------------------------------- helpers
def load_requests(args: argparse.Namespace) -> list[wl.Request]:
    if args.workload_file:
        requests = wl.load_jsonl(args.workload_file)
        return requests[: args.requests] if args.requests else requests
    if not args.workload:
        raise SystemExit("give --workload or --workload-file")
    vocab = args.vocab or (LIVE_VOCAB if getattr(args, "mode", "sim") == "live" else wl.DEFAULT_VOCAB)
    return wl.generate(args.workload, args.requests or args.default_requests, seed=args.seed, scale=args.scale,
                       output_scale=args.output_scale, vocab=vocab, components=args.components,
                       **dict(args.workload_arg))


def set_arrivals(args: argparse.Namespace, requests: list[wl.Request], rate: float | None) -> None:
    if rate is None:
        return
    times = arrivals_mod.make_arrivals(args.arrivals, len(requests), rate, args.seed, cv=args.cv,
                                       trace=args.trace, time_scale=args.time_scale)
    wl.with_arrivals(requests, times)


def workload_name(args: argparse.Namespace, requests: Sequence[wl.Request]) -> str:
    if args.workload:
        return wl.canonical_name(args.workload)
    return requests[0].workload if requests else "file"


def default_rate(name: str, gpus: int) -> float:
    return wl.DEFAULT_RATE_PER_GPU.get(name, 5.0) * gpus


def sim_config(args: argparse.Namespace):
    from benchmarks.sim import SimConfig, parse_profile

    from preble_router.settings import from_args

    return from_args(SimConfig, args, profile=parse_profile(args.profile))


def sim_policy(args: argparse.Namespace, name: str) -> Any:
    """A policy name for simulate(), or for preble a factory of the policy with the --preble-* settings."""
    if name != "preble":
        return name
    from preble_router.policies import PrebleConfig, PreblePolicy
    from preble_router.settings import from_args

    return functools.partial(PreblePolicy, from_args(PrebleConfig, args))  # picklable, for worker processes


def _slug(x: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(x))


def run_sim_matrix(args: argparse.Namespace, requests: list[wl.Request], rates: list[float | None],
                   out: Path | None) -> list[dict[str, Any]]:
    from benchmarks import report
    from benchmarks.sim import simulate
    from preble_router.policies import make_policy

    for name in args.policies:
        make_policy(name)  # fail fast on a typo
    cfg = sim_config(args)
    name = workload_name(args, requests)
    summaries: list[dict[str, Any]] = []
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for rate in rates:
        set_arrivals(args, requests, rate)
        eff_rate = rate if rate is not None else round(len(requests) / max(1e-9, max(r.arrival for r in requests)), 2)
        for policy in args.policies:
            res = simulate(requests, sim_policy(args, policy), cfg, progress=not args.no_progress)
            s = dict(res.summary, label=policy, rate=eff_rate, workload=name)
            summaries.append(s)
            runs[(policy, eff_rate)] = res.records
            print(f"{policy:>14} @ {eff_rate:g} req/s: {len(requests)} requests on {cfg.gpus} GPUs simulated "
                  f"in {s['wall_s']:.1f} s (sim time {s['sim_time_s']:.0f} s)", file=sys.stderr)
            if out is not None:
                report.write_jsonl(res.records, out / f"records_{_slug(policy)}_rate{eff_rate:g}.jsonl")
    title = f"sim: {name}, {cfg.gpus} GPUs, {len(requests)} requests"
    report.print_table(summaries, title)
    if out is not None:
        files = report.write_report(out, summaries, runs, title=title, plots=not args.no_plots)
        report.write_json({"config": _config_dict(cfg), "args": _args_dict(args)}, out / "config.json")
        print(f"wrote {len(files) + 1 + len(runs)} files to {out}", file=sys.stderr)
    return summaries


def _config_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return dict(vars(args))


# ---------------------------------------------------------------------------------------------- commands
def cmd_workload(args: argparse.Namespace) -> int:
    requests = load_requests(args)
    set_arrivals(args, requests, args.rate)
    name = workload_name(args, requests)
    if args.describe or not args.out:
        d = wl.describe(requests)
        spec = wl.SPEC_SHAPES.get(name, {})
        print(f"{name}: {len(requests)} requests")
        for k, v in d.items():
            ref = spec.get(k)
            print(f"  {k:>16}: {v:10.3f}" + (f"   (spec: {ref:g})" if ref is not None else ""))
    if args.out:
        wl.save_jsonl(requests, args.out, inline_tokens=args.inline_tokens)
        print(f"wrote {len(requests)} requests to {args.out}", file=sys.stderr)
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    requests = load_requests(args)
    rate = args.rate
    if rate is None and not (args.workload_file and any(r.arrival for r in requests)):
        rate = default_rate(workload_name(args, requests), args.gpus)
    out = Path(args.out) if args.out else None
    run_sim_matrix(args, requests, [rate], out)
    return 0


def cmd_live(args: argparse.Namespace) -> int:
    from benchmarks import report
    from benchmarks.loadgen import live_summary, run_load

    requests = load_requests(args)
    set_arrivals(args, requests, args.rate)
    records = asyncio.run(run_load(requests, args.url, model=args.model, timeout=args.timeout,
                                   progress=not args.no_progress, prompt_format=args.prompt_format))
    summary = dict(live_summary(records), label=args.url, rate=args.rate, workload=workload_name(args, requests))
    report.print_table([summary], f"live: {summary['workload']} -> {args.url}")
    if summary.get("error_kinds"):
        print(f"errors: {summary['error_kinds']}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        report.write_jsonl(records, out)
        report.write_json(summary, out.with_suffix(".summary.json"))
        print(f"wrote {out} and {out.with_suffix('.summary.json')}", file=sys.stderr)
    return 0 if summary["errors"] < len(records) or not records else 1


def cmd_compare(args: argparse.Namespace) -> int:
    requests = load_requests(args)
    name = workload_name(args, requests)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{args.mode}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.mode == "sim":
        rates: list[float | None] = list(args.rates) if args.rates else [default_rate(name, args.gpus)]
        run_sim_matrix(args, requests, rates, out)
        return 0
    return _compare_live(args, requests, name, out)


def _compare_live(args: argparse.Namespace, requests: list[wl.Request], name: str, out: Path) -> int:
    from benchmarks import report
    from benchmarks.loadgen import live_summary, reset_prefix_caches, run_load

    if not args.targets:
        raise SystemExit("--mode live needs --targets NAME=URL,...")
    if not args.rates:
        raise SystemExit("--mode live needs --rates")
    targets = []
    for t in args.targets:
        label, sep, url = t.partition("=")
        targets.append((label, url) if sep else (url, url))
    summaries: list[dict[str, Any]] = []
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for rate in args.rates:
        set_arrivals(args, requests, rate)
        for label, url in targets:
            if args.reset_prefix_cache:
                status = asyncio.run(reset_prefix_caches(args.reset_prefix_cache))
                print(f"reset_prefix_cache: {status}", file=sys.stderr)
            records = asyncio.run(run_load(requests, url, model=args.live_model, timeout=args.timeout,
                                           progress=not args.no_progress))
            s = dict(live_summary(records), label=label, rate=rate, workload=name, url=url)
            summaries.append(s)
            runs[(label, rate)] = records
            report.write_jsonl(records, out / f"records_{_slug(label)}_rate{rate:g}.jsonl")
            if args.pause:
                time.sleep(args.pause)
    title = f"live: {name}, {len(requests)} requests"
    report.print_table(summaries, title)
    files = report.write_report(out, summaries, runs, title=title, plots=not args.no_plots)
    print(f"wrote {len(files) + len(runs)} files to {out}", file=sys.stderr)
    return 0


def cmd_sim_vs_live(args: argparse.Namespace) -> int:
    from benchmarks import sim_vs_live

    return sim_vs_live.run(args)


def cmd_matrix(args: argparse.Namespace) -> int:
    from benchmarks import sim_matrix

    sim_matrix.run(args)
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from benchmarks import suite

    suite.run(args)
    return 0


def cmd_live_suite(args: argparse.Namespace) -> int:
    from benchmarks import live_suite

    return live_suite.run(args)


def cmd_policy_bench(args: argparse.Namespace) -> int:
    from benchmarks import policy_bench

    policy_bench.run(args)
    return 0


COMMANDS = {"workload": cmd_workload, "sim": cmd_sim, "live": cmd_live, "compare": cmd_compare,
            "sim-vs-live": cmd_sim_vs_live, "matrix": cmd_matrix, "suite": cmd_suite,
            "policy-bench": cmd_policy_bench, "live-suite": cmd_live_suite}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:  # bad workload / policy / profile names
        print(f"preble-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
