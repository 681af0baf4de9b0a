"""Sweep the prefix-shared kernel's tiling on a GPU; check every config against a float64 reference.

Two sweeps on one shape (default: the headline, 64 x 8k prefix + 256 suffix, bf16, D=128, GQA 8:1):

1. the prefix kernel: BLOCK_M x BLOCK_N x warps x stages x prefix splits, suffix kernel held at its defaults;
2. the suffix kernel: BLOCK_N x warps x stages x suffix splits, prefix kernel at the best config of (1).

Each row prints the time (median of CUDA-graph replays, L2 flushed), the relative error
``||out - ref|| / ||ref||`` against float64 attention, and whether the output was fully written.
Prints the best config of each sweep last, and writes every row with ``--json``.

    python benchmarks/kernel_tune.py [--shape headline] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.kernel_bench import GPU_SHAPES, build, time_gpu  # noqa: E402

PREFIX_GRID = dict(block_m=[64, 128], block_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3],
                   num_prefix_splits=[None, 8, 16])
SUFFIX_GRID = dict(suffix_block_n=[32, 64, 128], suffix_num_warps=[2, 4], suffix_num_stages=[2, 3],
                   num_suffix_splits=[None, 2])
QUICK = dict(block_m=[128], block_n=[64], num_warps=[8], num_stages=[2, 3], num_prefix_splits=[None, 8])


def reference(shape, d):
    import torch

    from kernels.reference import reference_prefix_shared_attention

    return reference_prefix_shared_attention(d["q"], d["key_cache"], d["value_cache"], d["prefix_table"],
                                             d["prefix_lens"], d["suffix_tables"], d["suffix_lens"], d["scale"],
                                             group_offsets=d["group_offsets"]).to(torch.float64)


def rel_err(out, ref) -> float:
    import torch

    o = out.to(torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - ref).norm() / ref.norm()).item()


def sweep(shape, d, ref, grid: dict, fixed: dict, iters: int) -> list[dict]:
    from kernels import prefix_shared_decode_attention

    rows = []
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        kw = {**fixed, **dict(zip(keys, values))}

        def fn(kw=kw):
            return prefix_shared_decode_attention(d["q"], d["key_cache"], d["value_cache"], d["prefix_table"],
                                                  d["prefix_lens"], d["suffix_tables"], d["suffix_lens"],
                                                  d["scale"], group_offsets=d["group_offsets"],
                                                  max_group_size=d["max_group_size"], **kw)
        try:
            err = rel_err(fn(), ref)
            ms, _ = time_gpu(fn, iters, 5)
        except Exception as e:  # a config that does not compile (shared memory) is skipped, and said so
            print(f"  {kw}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}", flush=True)
            continue
        row = dict(config=kw, us=ms * 1e3, rel_err=err, ok=err < 1e-2)
        rows.append(row)
        print(f"  {row['us']:8.1f} us  err {err:.1e}  {'ok ' if row['ok'] else 'BAD'}  {kw}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="headline", choices=sorted(GPU_SHAPES))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="a handful of prefix configs, no suffix sweep")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    shape = GPU_SHAPES[args.shape]
    d = build(shape, torch.device("cuda"), seed=1)
    ref = reference(shape, d)
    print(f"{torch.cuda.get_device_name()}  shape {shape}", flush=True)
    print("prefix sweep:", flush=True)
    pre = sweep(shape, d, ref, QUICK if args.quick else PREFIX_GRID, {}, args.iters)
    best_pre = min((r for r in pre if r["ok"]), key=lambda r: r["us"])
    suf = []
    if not args.quick:
        print("suffix sweep:", flush=True)
        suf = sweep(shape, d, ref, SUFFIX_GRID, best_pre["config"], args.iters)
    bad = [r for r in pre + suf if not r["ok"]]
    default = sweep(shape, d, ref, {"num_prefix_splits": [None]}, {}, args.iters)[0]
    print(f"\ndefault config: {default['us']:.1f} us (err {default['rel_err']:.1e})")
    print(f"best prefix config: {best_pre['us']:.1f} us  {best_pre['config']}")
    if suf:
        best_suf = min((r for r in suf if r["ok"]), key=lambda r: r["us"])
        print(f"best with suffix tuned: {best_suf['us']:.1f} us  {best_suf['config']}")
    print(f"{len(pre) + len(suf)} configs, {len(bad)} with rel err >= 1e-2")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, device=torch.cuda.get_device_name(), default=default, prefix=pre,
                           suffix=suf), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
