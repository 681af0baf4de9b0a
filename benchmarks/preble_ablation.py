"""Which of the preble policy's rules earn their place: the simulator runs the default policy, variants with one
rule changed, and other policies on the same requests, per workload x GPU count x seed.

    python -m benchmarks.preble_ablation [--variants default,queue,queue_no_overflow,...] [--others cache_aware,lmetric]
                                         [--gpus 4,8] [--seeds 0,1,2] [--workloads tool_use,...] [--out F.json]

Rates are the near-saturation rates of the simulator matrix (BENCHMARKS.md, "Simulator matrix"); a variant is a
set of PrebleConfig fields (VARIANTS below, data only). Prints avg / p99 latency per run and, per cell, each
variant's median over seeds with min and max.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from benchmarks import sim_matrix as sm
from benchmarks.suite import spread
from benchmarks.sim import SimConfig
from preble_router.policies import make_policy
from preble_router.policies.preble import PrebleConfig

SATURATION_RATES = {("tool_use", 4): 111, ("tool_use", 8): 222, ("embodied_agent", 4): 444,
                    ("embodied_agent", 8): 815, ("program_generation", 4): 37, ("program_generation", 8): 74,
                    ("video_qa", 4): 21.9, ("video_qa", 8): 33.7, ("long_doc_qa", 4): 4.36, ("long_doc_qa", 8): 9.51}
_QUEUE = {"cost_model": "queue"}
# The queue model's rules (overflow, load signal, pd balance) act only under it, so its variants pin it.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # the cost model preble-router starts with (sharing)
    "queue": _QUEUE,  # the paper's exploit / explore (the default before session 9)
    "queue_no_overflow": {**_QUEUE, "exploit_overflow": math.inf},
    "queue_window": {**_QUEUE, "load_signal": "window"},
    "queue_no_rebalance": {**_QUEUE, "bal_threshold": math.inf},
    "queue_no_pd": {**_QUEUE, "pd_hit_ratio": 2.0},
    "queue_no_evpend": {**_QUEUE, "eviction_pending": False},
    "queue_refresh0": {**_QUEUE, "eviction_refresh": 0.0},
    "queue_r0_no_overflow": {**_QUEUE, "eviction_refresh": 0.0, "exploit_overflow": math.inf},
    "queue_r0_window": {**_QUEUE, "eviction_refresh": 0.0, "load_signal": "window"},
    "refresh0": {"eviction_refresh": 0.0},
    "no_rebalance": {"bal_threshold": math.inf},
}

def run(workloads: Sequence[str], gpus: Sequence[int], seeds: Sequence[int], variants: Sequence[str],
        others: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for w in workloads:
        for g in gpus:
            for seed in seeds:
                n = sm.DEFAULT_REQUESTS[w]
                spec = sm.CellSpec(w, g, n, 500, seed=seed, workload_args=sm.workload_args(w, g))
                cfg = replace(SimConfig(), gpus=g)
                policies: dict[str, Any] = {o: o for o in others}
                for v in variants:
                    config = replace(PrebleConfig(), **VARIANTS[v])
                    policies[v] = lambda config=config: make_policy("preble", config=config)
                row = {}
                for name, policy in policies.items():
                    s = sm.run_policy(spec, policy, SATURATION_RATES[(w, g)], n, cfg)
                    row[name] = (s["latency_avg"], s["latency_p99"])
                out[f"{w}:{g}:{seed}"] = row
                print(w, g, seed, " ".join(f"{k}={a:.3f}/{p:.2f}" for k, (a, p) in row.items()), flush=True)
    return out


def medians(runs: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Per workload:gpus, each policy's avg latency median [min-max] over seeds."""
    cells: dict[str, dict[str, list[float]]] = {}
    for key, row in runs.items():
        cell = key.rsplit(":", 1)[0]
        for name, (avg, _) in row.items():
            cells.setdefault(cell, {}).setdefault(name, []).append(avg)
    return [f"{cell}: " + "  ".join(_spread_text(n, v) for n, v in by.items()) for cell, by in cells.items()]


def _spread_text(name: str, values: list[float]) -> str:
    s = spread(values)
    assert s is not None  # every run reports its average
    return f"{name} {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--others", default="cache_aware,lmetric")
    p.add_argument("--gpus", default="4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workloads", default=",".join(sm.DEFAULT_REQUESTS))
    p.add_argument("--out")
    a = p.parse_args(argv)
    runs = run(a.workloads.split(","), [int(g) for g in a.gpus.split(",")], [int(s) for s in a.seeds.split(",")],
               a.variants.split(","), [o for o in a.others.split(",") if o])
    print("\n".join(medians(runs)))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
