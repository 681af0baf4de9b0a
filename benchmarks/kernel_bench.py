"""Benchmark the Triton prefix-sharing decode attention against per-sequence attention.

For every shape it times

* ``prefix-shared``      -- :func:`kernels.prefix_shared_decode_attention` (prefix read once per group);
* ``triton-noshare``     -- the same kernels with no shared prefix: every sequence's block table
                            holds prefix + suffix pages (what a per-sequence paged kernel does);
* ``sdpa-gathered``      -- PyTorch SDPA over dense per-sequence K/V (prefix + suffix gathered
                            beforehand, outside the timing; GQA via ``enable_gqa``);
* ``flash-attn-paged``   -- ``flash_attn_with_kvcache`` with paged KV (vllm_flash_attn or flash_attn),
                            if importable;
* ``flashinfer-decode``  -- FlashInfer ``BatchDecodeWithPagedKVCacheWrapper``, if importable;
* ``flashinfer-cascade`` -- FlashInfer ``MultiLevelCascadeAttentionWrapper`` (2 levels: shared prefix
                            + suffixes), the closest existing shared-prefix kernel, if importable;

and prints time, KV bytes read, achieved bandwidth (KV bytes / time), fraction of ``--peak-gbps``
and the speedup of ``prefix-shared`` over each method.  Times are medians of CUDA-event timings,
each run preceded by an L2 flush; calls are replayed from a CUDA graph where capture works.

Usage (GPU)::

    python benchmarks/kernel_bench.py                 # headline + a few other shapes
    python benchmarks/kernel_bench.py --shapes headline --json out.json
    python benchmarks/kernel_bench.py --batch 32 --prefix-len 4096 --suffix-len 128 --num-q-heads 32 \\
        --num-kv-heads 8 --head-size 128 --dtype bf16

CPU check (tiny shapes, Triton interpreter; the numbers are meaningless)::

    python benchmarks/kernel_bench.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Callable


@dataclasses.dataclass
class Shape:
    name: str
    batch: int
    prefix_len: int
    suffix_len: int
    num_q_heads: int = 32
    num_kv_heads: int = 4
    head_size: int = 128
    block_size: int = 16
    dtype: str = "bf16"
    q_len: int = 1
    groups: int = 1  # sequences split evenly into this many groups, each with its own prefix


GPU_SHAPES = {
    # 64 sequences sharing an 8k-token prefix, 256-token suffixes, bf16, D=128, GQA 8:1.
    "headline": Shape("headline", 64, 8192, 256),
    "small-batch": Shape("small-batch", 8, 8192, 256),
    "big-batch-4k": Shape("big-batch-4k", 128, 4096, 512),
    "long-prefix-32k": Shape("long-prefix-32k", 16, 32768, 1024),
    "short-prefix": Shape("short-prefix", 64, 1024, 256),
    "gqa4-d64-fp16": Shape("gqa4-d64-fp16", 64, 8192, 256, 32, 8, 64, 16, "fp16"),
    "block64": Shape("block64", 64, 8192, 256, block_size=64),
    "no-prefix": Shape("no-prefix", 64, 0, 8448),
    "chunked-q4": Shape("chunked-q4", 64, 8192, 256, q_len=4),
    "4-prefixes": Shape("4-prefixes", 64, 8192, 256, groups=4),
}
SMOKE_SHAPES = {
    "smoke-headline-like": Shape("smoke-headline-like", 4, 64, 17, 8, 1, 64, 16, "bf16"),
    "smoke-fp16-d128": Shape("smoke-fp16-d128", 3, 32, 9, 4, 2, 128, 16, "fp16"),
    "smoke-chunked": Shape("smoke-chunked", 2, 32, 12, 4, 2, 64, 16, "fp16", q_len=3),
    "smoke-2-prefixes": Shape("smoke-2-prefixes", 4, 32, 9, 4, 2, 64, 16, "fp16", groups=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma list of {sorted(GPU_SHAPES)} or 'all' (default: headline,"
                   "small-batch,big-batch-4k,long-prefix-32k,no-prefix)")
    p.add_argument("--batch", type=int, help="custom shape: number of sequences (one group)")
    p.add_argument("--prefix-len", type=int, default=8192)
    p.add_argument("--suffix-len", type=int, default=256)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=128, choices=[64, 128])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--q-len", type=int, default=1, help="query tokens per sequence (>1: chunked prefill, causal)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak HBM bandwidth in GB/s (default: from the device name, H100 SXM 3350, H200 4800)")
    p.add_argument("--no-graph", action="store_true", help="time eager calls instead of CUDA-graph replays")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed run")
    p.add_argument("--skip", default="", help="comma list of methods to skip")
    p.add_argument("--num-prefix-splits", type=int, default=None)
    p.add_argument("--num-suffix-splits", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run tiny shapes on CPU through the Triton interpreter (checks the script, not speed)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def build(shape: Shape, device, seed: int = 0):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[shape.dtype]
    bs = shape.block_size
    assert shape.prefix_len % bs == 0, "benchmark prefixes are whole blocks (vLLM only shares full blocks)"
    assert shape.suffix_len >= shape.q_len
    g = torch.Generator(device="cpu").manual_seed(seed)
    p_blocks = shape.prefix_len // bs
    s_blocks = -(-shape.suffix_len // bs)
    G = shape.groups
    assert shape.batch % G == 0
    num_blocks = G * p_blocks + shape.batch * s_blocks + 1
    kshape = (num_blocks, bs, shape.num_kv_heads, shape.head_size)
    key_cache = torch.randn(kshape, dtype=dtype, device=device)
    value_cache = torch.randn(kshape, dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)  # shuffled pages, like a real pool
    prefix_tables = perm[:G * p_blocks].reshape(G, p_blocks).to(device)
    prefix_table = prefix_tables[0] if G == 1 else prefix_tables
    suffix_tables = perm[G * p_blocks:G * p_blocks + shape.batch * s_blocks].reshape(shape.batch, s_blocks).to(device)
    group_offsets = [g * shape.batch // G for g in range(G + 1)]
    suffix_lens = torch.full((shape.batch,), shape.suffix_len, dtype=torch.int32, device=device)
    qshape = (shape.batch, shape.num_q_heads, shape.head_size) if shape.q_len == 1 else (
        shape.batch, shape.q_len, shape.num_q_heads, shape.head_size)
    q = torch.randn(qshape, dtype=dtype, device=device)
    full_tables = torch.cat([prefix_tables.repeat_interleave(shape.batch // G, dim=0), suffix_tables], dim=1).contiguous()
    return dict(q=q, key_cache=key_cache, value_cache=value_cache, prefix_table=prefix_table,
                prefix_lens=torch.full((G,), shape.prefix_len, dtype=torch.int32, device=device) if G > 1
                else shape.prefix_len,
                group_offsets=torch.tensor(group_offsets, dtype=torch.int32, device=device) if G > 1 else None,
                max_group_size=shape.batch // G if G > 1 else None,
                suffix_tables=suffix_tables, suffix_lens=suffix_lens, full_tables=full_tables,
                scale=shape.head_size ** -0.5)


def kv_bytes(shape: Shape, shared: bool) -> int:
    per_token = 2 * shape.num_kv_heads * shape.head_size * (2 if shape.dtype in ("bf16", "fp16") else 4)
    if shared:
        return per_token * (shape.groups * shape.prefix_len + shape.batch * shape.suffix_len)
    return per_token * shape.batch * (shape.prefix_len + shape.suffix_len)


# ---------------------------------------------------------------------------
# methods: each returns a zero-arg callable (setup outside the timing) or raises
# ---------------------------------------------------------------------------


def m_prefix_shared(shape, d, args):
    from kernels import prefix_shared_decode_attention

    kw = dict(num_prefix_splits=args.num_prefix_splits, num_suffix_splits=args.num_suffix_splits,
              group_offsets=d["group_offsets"], max_group_size=d["max_group_size"])
    return lambda: prefix_shared_decode_attention(
        d["q"], d["key_cache"], d["value_cache"], d["prefix_table"], d["prefix_lens"],
        d["suffix_tables"], d["suffix_lens"], d["scale"], **kw)


def m_prefix_grouped(shape, d, args):
    """What an attention backend would run: the groups found in the full block tables (plan made once, outside
    the timing: one plan serves every layer of a step; its host time is printed separately)."""
    from kernels import grouped_decode_attention, plan_prefix_groups

    lens = d["suffix_lens"] + shape.prefix_len
    t = time.perf_counter()
    # vLLM 0.11's cascade thresholds (256 tokens, 8 sequences), loosened for the tiny CPU smoke shapes
    plan = plan_prefix_groups(d["full_tables"], lens, shape.block_size, q_len=shape.q_len,
                              min_prefix_blocks=min(16, shape.prefix_len // shape.block_size),
                              min_group_size=min(8, shape.batch // shape.groups))
    d["plan_ms"] = (time.perf_counter() - t) * 1e3
    if plan.num_shared == 0:
        raise RuntimeError("the planner found no shared prefix")
    plan = plan.to(d["q"].device)
    return lambda: grouped_decode_attention(d["q"], d["key_cache"], d["value_cache"], d["full_tables"], lens,
                                            d["scale"], plan=plan)


def m_triton_noshare(shape, d, args):
    import torch

    from kernels import prefix_shared_decode_attention

    empty = torch.zeros(0, dtype=torch.int32, device=d["q"].device)
    lens = d["suffix_lens"] + shape.prefix_len
    return lambda: prefix_shared_decode_attention(
        d["q"], d["key_cache"], d["value_cache"], empty, 0, d["full_tables"], lens, d["scale"])


def m_sdpa(shape, d, args):
    import torch
    import torch.nn.functional as F

    from kernels.reference import gather_paged_kv

    B, L = shape.batch, shape.prefix_len + shape.suffix_len
    k = torch.stack([gather_paged_kv(d["key_cache"], d["full_tables"][b], L) for b in range(B)])  # [B, L, Hkv, D]
    v = torch.stack([gather_paged_kv(d["value_cache"], d["full_tables"][b], L) for b in range(B)])
    k = k.transpose(1, 2).contiguous()  # [B, Hkv, L, D]
    v = v.transpose(1, 2).contiguous()
    q4 = d["q"].unsqueeze(1) if shape.q_len == 1 else d["q"]
    q = q4.transpose(1, 2).contiguous()  # [B, Hq, Lq, D]
    mask = None
    if shape.q_len > 1:
        qpos = L - shape.q_len + torch.arange(shape.q_len, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # [Lq, L]

    def fn():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d["scale"], enable_gqa=True)

    fn()  # raise here (not inside the timing) if unsupported
    return fn


def _import_flash_attn():
    try:
        from vllm.vllm_flash_attn import flash_attn_with_kvcache  # type: ignore

        return flash_attn_with_kvcache, "vllm_flash_attn"
    except Exception:
        pass
    from flash_attn import flash_attn_with_kvcache  # type: ignore

    return flash_attn_with_kvcache, "flash_attn"


def m_flash_attn(shape, d, args):
    import torch

    if d["q"].device.type != "cuda":
        raise RuntimeError("needs CUDA")
    fa, _ = _import_flash_attn()
    q4 = d["q"].unsqueeze(1) if shape.q_len == 1 else d["q"]
    seqlens = (d["suffix_lens"] + shape.prefix_len).to(torch.int32)

    def fn():
        return fa(q4, d["key_cache"], d["value_cache"], cache_seqlens=seqlens, block_table=d["full_tables"],
                  softmax_scale=d["scale"], causal=shape.q_len > 1)

    fn()
    return fn


def _paged_csr(tables, lens, bs):
    import torch

    pages = [(int(n) + bs - 1) // bs for n in lens.tolist()]
    indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0).tolist()), dtype=torch.int32, device=tables.device)
    indices = torch.cat([tables[i, :n] for i, n in enumerate(pages)]).to(torch.int32)
    last = torch.tensor([(int(n) - 1) % bs + 1 for n in lens.tolist()], dtype=torch.int32, device=tables.device)
    return indptr, indices, last


def _flashinfer_plan(wrapper, *args, dtype, scale):
    try:
        wrapper.plan(*args, q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)
    except TypeError:
        wrapper.plan(*args, data_type=dtype, sm_scale=scale)


def m_flashinfer_decode(shape, d, args):
    import torch

    if d["q"].device.type != "cuda":
        raise RuntimeError("needs CUDA")
    if shape.q_len != 1:
        raise RuntimeError("decode wrapper: q_len must be 1")
    import flashinfer  # type: ignore

    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=d["q"].device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    indptr, indices, last = _paged_csr(d["full_tables"], d["suffix_lens"] + shape.prefix_len, shape.block_size)
    _flashinfer_plan(w, indptr, indices, last, shape.num_q_heads, shape.num_kv_heads, shape.head_size,
                     shape.block_size, dtype=d["q"].dtype, scale=d["scale"])
    kv = (d["key_cache"], d["value_cache"])
    fn = lambda: w.run(d["q"], kv)  # noqa: E731
    fn()
    return fn


def m_flashinfer_cascade(shape, d, args):
    import torch

    if d["q"].device.type != "cuda":
        raise RuntimeError("needs CUDA")
    if shape.prefix_len == 0:
        raise RuntimeError("no shared prefix")
    if shape.groups > 1:
        raise RuntimeError("compared with one group only")
    if shape.q_len != 1:
        # its causal mask is bottom-right aligned per level, which is wrong for the shared level
        raise RuntimeError("only compared for decode (q_len == 1)")
    import flashinfer  # type: ignore

    dev = d["q"].device
    B = shape.batch
    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
    qo = [torch.tensor([0, B], dtype=torch.int32, device=dev), torch.arange(0, B + 1, dtype=torch.int32, device=dev)]
    p_indptr, p_idx, p_last = _paged_csr(d["prefix_table"].unsqueeze(0),
                                         torch.tensor([shape.prefix_len]), shape.block_size)
    s_indptr, s_idx, s_last = _paged_csr(d["suffix_tables"], d["suffix_lens"], shape.block_size)
    try:
        w.plan(qo, [p_indptr, s_indptr], [p_idx, s_idx], [p_last.to(dev), s_last], shape.num_q_heads,
               shape.num_kv_heads, shape.head_size, shape.block_size,
               q_data_type=d["q"].dtype, kv_data_type=d["q"].dtype, sm_scale=d["scale"])
    except TypeError:
        w.plan(qo, [p_indptr, s_indptr], [p_idx, s_idx], [p_last.to(dev), s_last], shape.num_q_heads,
               shape.num_kv_heads, shape.head_size, shape.block_size, sm_scale=d["scale"])
    q = d["q"]
    kv = (d["key_cache"], d["value_cache"])
    fn = lambda: w.run(q, kv)  # noqa: E731
    fn()
    return fn


METHODS: dict[str, Callable] = {
    "prefix-shared": m_prefix_shared,
    "prefix-grouped": m_prefix_grouped,
    "triton-noshare": m_triton_noshare,
    "sdpa-gathered": m_sdpa,
    "flash-attn-paged": m_flash_attn,
    "flashinfer-decode": m_flashinfer_decode,
    "flashinfer-cascade": m_flashinfer_cascade,
}
SHARED_METHODS = {"prefix-shared", "prefix-grouped", "flashinfer-cascade"}


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def time_gpu(fn, iters, warmup, graph=True, flush=True):
    """Median milliseconds of ``fn`` (CUDA events; L2 flushed before each run)."""
    import torch

    fn()
    torch.cuda.synchronize()
    run, timer = fn, "eager"
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            run, timer = g.replay, "graph"
        except Exception:
            torch.cuda.synchronize()
            run, timer = fn, "eager"
    l2 = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for _ in range(warmup):
        run()
    for i in range(iters):
        if flush:
            l2.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), timer


def time_cpu(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), "cpu"


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def run_shape(shape: Shape, args, device) -> dict:
    import torch

    d = build(shape, device)
    results, errors = {}, {}
    outputs = {}
    skip = set(filter(None, args.skip.split(",")))
    for name, make in METHODS.items():
        if name in skip:
            continue
        try:
            fn = make(shape, d, args)
        except Exception as e:  # not importable / unsupported on this shape
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        out = fn()
        outputs[name] = out
        if device.type == "cuda":
            ms, timer = time_gpu(fn, args.iters, args.warmup, graph=not args.no_graph, flush=not args.no_flush)
        else:
            ms, timer = time_cpu(fn, args.iters, args.warmup)
        results[name] = dict(ms=ms, timer=timer, kv_bytes=kv_bytes(shape, name in SHARED_METHODS))

    if "plan_ms" in d and "prefix-grouped" in results:
        results["prefix-grouped"]["plan_ms"] = d["plan_ms"]
    # accuracy of the prefix-shared kernel against the baselines (same q layout)
    ours = outputs.get("prefix-shared")
    if ours is not None:
        ref = None
        if device.type == "cpu":
            from kernels.reference import reference_prefix_shared_attention

            ref = reference_prefix_shared_attention(
                d["q"], d["key_cache"], d["value_cache"], d["prefix_table"], d["prefix_lens"],
                d["suffix_tables"], d["suffix_lens"], d["scale"], group_offsets=d["group_offsets"])
            results["prefix-shared"]["max_abs_err_vs_reference"] = (ours.float() - ref.float()).abs().max().item()
        for name, out in outputs.items():
            if name == "prefix-shared" or name not in results:
                continue
            o = out[0] if isinstance(out, tuple) else out
            if name == "sdpa-gathered":
                o = o.transpose(1, 2)  # [B, Lq, Hq, D]
            try:
                o = o.reshape(ours.shape)
                results[name]["max_abs_diff_vs_prefix_shared"] = (o.float() - ours.float()).abs().max().item()
            except Exception:
                pass
        del ref
    del d, outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    base = results.get("prefix-shared")
    for r in results.values():
        r["gbps"] = r["kv_bytes"] / (r["ms"] * 1e-3) / 1e9
        r["frac_peak"] = r["gbps"] / args.peak_gbps
        if base:
            r["prefix_shared_speedup"] = r["ms"] / base["ms"]
    if base:
        # what a per-sequence kernel would have to stream to match us
        base["equiv_gbps"] = kv_bytes(shape, False) / (base["ms"] * 1e-3) / 1e9
        rows = shape.batch * shape.q_len * shape.num_q_heads
        flops = 4 * rows * (shape.prefix_len + shape.suffix_len) * shape.head_size
        base["tflops"] = flops / (base["ms"] * 1e-3) / 1e12
    return dict(shape=dataclasses.asdict(shape), results=results, unavailable=errors)


def print_report(rep: dict, peak: float):
    s = rep["shape"]
    print(f"\n== {s['name']}: B={s['batch']} groups={s['groups']} prefix={s['prefix_len']} suffix={s['suffix_len']} "
          f"q_len={s['q_len']} "
          f"Hq={s['num_q_heads']} Hkv={s['num_kv_heads']} D={s['head_size']} block={s['block_size']} {s['dtype']}")
    hdr = f"{'method':<20}{'time(us)':>11}{'KV read(MB)':>13}{'GB/s':>10}{'%peak':>8}{'ours x faster':>15}  timer  check"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rep["results"].items():
        chk = ""
        if "max_abs_err_vs_reference" in r:
            chk = f"err vs ref {r['max_abs_err_vs_reference']:.2e}"
        elif "max_abs_diff_vs_prefix_shared" in r:
            chk = f"diff vs ours {r['max_abs_diff_vs_prefix_shared']:.2e}"
        sp = f"{r['prefix_shared_speedup']:.2f}x" if "prefix_shared_speedup" in r else "-"
        print(f"{name:<20}{r['ms'] * 1e3:>11.1f}{r['kv_bytes'] / 1e6:>13.1f}{r['gbps']:>10.1f}"
              f"{100 * r['frac_peak']:>7.1f}%{sp:>15}  {r['timer']:<6} {chk}")
    b = rep["results"].get("prefix-shared")
    if b and "equiv_gbps" in b:
        print(f"prefix-shared: per-sequence-equivalent bandwidth {b['equiv_gbps']:.0f} GB/s "
              f"({100 * b['equiv_gbps'] / peak:.0f}% of {peak:.0f} GB/s peak), {b['tflops']:.1f} attention TFLOP/s")
    g = rep["results"].get("prefix-grouped")
    if g and "plan_ms" in g:
        print(f"prefix-grouped: grouping the block tables on the host took {g['plan_ms']:.2f} ms (once per step)")
    for name, why in rep["unavailable"].items():
        print(f"{name:<20} unavailable: {why}")


DATASHEET_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def datasheet_gbps(device_name: str) -> float:
    """The vendor's peak HBM bandwidth for a device name (H100 SXM's when the name is unknown)."""
    return next((v for k, v in DATASHEET_GBPS.items() if k in device_name), 3350.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # must happen before triton is imported (kernels imports it)
        os.environ["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import torch

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.peak_gbps = args.peak_gbps or DATASHEET_GBPS["H100"]
        args.iters = min(args.iters, 2)
        args.warmup = min(args.warmup, 1)
        shapes = list(SMOKE_SHAPES.values())
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        if args.batch is not None:
            shapes = [Shape("custom", args.batch, args.prefix_len, args.suffix_len, args.num_q_heads,
                            args.num_kv_heads, args.head_size, args.block_size, args.dtype, args.q_len)]
        else:
            names = args.shapes or "headline,small-batch,big-batch-4k,long-prefix-32k,no-prefix"
            names = list(GPU_SHAPES) if names == "all" else names.split(",")
            shapes = [GPU_SHAPES[n] for n in names]
        if args.peak_gbps is None:
            args.peak_gbps = datasheet_gbps(torch.cuda.get_device_name())
        print(f"device: {torch.cuda.get_device_name()}  peak {args.peak_gbps:.0f} GB/s  torch {torch.__version__}")
    import triton

    print(f"triton {triton.__version__}{'  (interpreter)' if args.cpu_smoke else ''}")
    reports = []
    for shape in shapes:
        rep = run_shape(shape, args, device)
        print_report(rep, args.peak_gbps)
        reports.append(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak_gbps=args.peak_gbps, reports=reports), f, indent=2)
    if args.cpu_smoke:
        bad = [r["shape"]["name"] for r in reports
               if not (r["results"].get("prefix-shared", {}).get("max_abs_err_vs_reference", math.inf) < 2e-2)]
        if bad:
            print(f"FAILED: prefix-shared does not match the reference on {bad}", file=sys.stderr)
            return 1
        print("\ncpu smoke OK (timings above are interpreter timings, not performance)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
