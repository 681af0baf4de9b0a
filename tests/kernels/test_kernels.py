"""Triton prefix-sharing attention vs. the plain-PyTorch reference.

Runs on a GPU when one is present, otherwise on CPU through the Triton
interpreter.  TRITON_INTERPRET=1 has to be set before *anything* imports
triton (Triton's own ``@jit`` helpers such as ``tl.max`` are built at import
time).  This module sets it when it is the first to import triton; when
something else got there first (the suite's conftest imports transformers,
which imports torch._dynamo, which imports triton), the tests are re-run in a
fresh child process with TRITON_INTERPRET=1 by ``test_in_fresh_interpreter_process``
and skipped here.  Shapes are small so the interpreter run stays well under a minute.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
_REEXEC = False
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        _REEXEC = True  # too late to switch the interpreter on in this process
    else:
        os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels import (  # noqa: E402
    grouped_decode_attention,
    merge_attention_states,
    plan_prefix_groups,
    prefix_shared_decode_attention,
)
from kernels.reference import (  # noqa: E402
    naive_attention,
    reference_merge_attention_states,
    reference_prefix_shared_attention,
)


@pytest.fixture(autouse=True)
def _interpreter_available(request):
    if _REEXEC and request.node.originalname != "test_in_fresh_interpreter_process":
        pytest.skip("no GPU and triton was imported before TRITON_INTERPRET=1; run by test_in_fresh_interpreter_process")


def test_in_fresh_interpreter_process():
    """Run this module in a child process that has TRITON_INTERPRET=1 from the start."""
    if not _REEXEC:
        pytest.skip("the tests run in this process")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=env, cwd=root, timeout=900, check=False,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"the child process ran no kernel test: {summary}"
    print(summary)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(
    *,
    batch,
    hq,
    hkv,
    d,
    block_size,
    prefix_lens,
    suffix_lens,
    q_len=1,
    dtype=torch.float16,
    group_sizes=None,
    seed=0,
):
    """Random paged KV cache with shuffled pages.

    Unused table entries point at a NaN-filled page and the unused slots of
    partially filled pages hold NaN, so reading anything past a length
    poisons the output.
    """
    g = torch.Generator().manual_seed(seed)
    prefix_lens = list(prefix_lens)
    group_sizes = group_sizes or [batch]
    assert sum(group_sizes) == batch and len(group_sizes) == len(prefix_lens)
    nblk = lambda n: (n + block_size - 1) // block_size  # noqa: E731
    p_blocks = max([nblk(p) for p in prefix_lens] + [1])
    s_blocks = max(nblk(s) for s in suffix_lens)
    n_used = sum(nblk(p) for p in prefix_lens) + sum(nblk(s) for s in suffix_lens)
    num_blocks = n_used + 3
    poison = num_blocks - 1
    kc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    kc[poison] = float("nan")
    vc[poison] = float("nan")
    perm = torch.randperm(num_blocks - 1, generator=g).tolist()

    def alloc(n_tokens, width):
        row = [poison] * width
        for i in range(nblk(n_tokens)):
            row[i] = perm.pop()
        tail = n_tokens % block_size
        if tail:
            kc[row[nblk(n_tokens) - 1], tail:] = float("nan")
            vc[row[nblk(n_tokens) - 1], tail:] = float("nan")
        return row

    prefix_table = torch.tensor([alloc(p, p_blocks) for p in prefix_lens], dtype=torch.int32)
    suffix_tables = torch.tensor([alloc(s, s_blocks) for s in suffix_lens], dtype=torch.int32)
    shape = (batch, hq, d) if q_len == 1 else (batch, q_len, hq, d)
    q = torch.randn(shape, generator=g).to(dtype)
    offsets = [0]
    for n in group_sizes:
        offsets.append(offsets[-1] + n)
    return dict(
        q=q.to(DEVICE),
        key_cache=kc.to(DEVICE),
        value_cache=vc.to(DEVICE),
        prefix_block_table=prefix_table.to(DEVICE),
        prefix_len=prefix_lens,
        suffix_block_tables=suffix_tables.to(DEVICE),
        suffix_lens=torch.tensor(suffix_lens, dtype=torch.int32, device=DEVICE),
        group_offsets=offsets,
    )


def run_both(case, scale=None, **kw):
    args = dict(case)
    single = len(args["prefix_len"]) == 1
    if single:
        args["prefix_block_table"] = args["prefix_block_table"][0]
        args["prefix_len"] = args["prefix_len"][0]
        offsets = args.pop("group_offsets")
    else:
        offsets = args["group_offsets"]
    out, lse = prefix_shared_decode_attention(**args, scale=scale, return_lse=True, **kw)
    ref_args = {k: v for k, v in args.items() if k != "group_offsets"}
    ref, ref_lse = reference_prefix_shared_attention(**ref_args, scale=scale, group_offsets=offsets, return_lse=True)
    return out, lse, ref, ref_lse


def check(out, lse, ref, ref_lse, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=1e-3, rtol=1e-4)


# (batch, hq, hkv, d, block_size, prefix_len, suffix_lens, q_len, dtype)
F16, BF16 = torch.float16, torch.bfloat16
CASES = {
    "no_prefix_decode": (3, 4, 4, 64, 16, 0, [1, 5, 17], 1, F16),
    "no_prefix_bf16_gqa8": (2, 8, 1, 128, 16, 0, [1, 40], 1, BF16),
    "partial_prefix_block": (4, 8, 2, 64, 16, 7, [1, 2, 9, 16], 1, F16),
    "prefix_exact_block": (2, 4, 1, 64, 32, 32, [1, 3], 1, BF16),
    "multi_block_prefix_gqa4": (5, 8, 2, 64, 16, 53, [1, 16, 17, 30, 2], 1, F16),
    "multi_block_prefix_gqa8_d128": (8, 16, 2, 128, 16, 70, [1, 2, 3, 4, 5, 6, 7, 33], 1, BF16),
    "mha_group1": (1, 2, 2, 128, 16, 45, [1], 1, F16),
    "group7_mqa": (7, 4, 1, 64, 16, 16, [1, 2, 3, 4, 5, 6, 7], 1, F16),
    "group1_gqa8_bf16": (1, 8, 1, 64, 64, 130, [12], 1, BF16),
    "block64_tile_in_page": (3, 4, 1, 64, 64, 150, [1, 64, 65], 1, F16),
    "block128": (2, 8, 2, 128, 128, 200, [1, 129], 1, BF16),
    "block32_d128_fp16": (6, 4, 4, 128, 32, 96, [1, 7, 31, 32, 33, 2], 1, F16),
    "chunked_prefill_no_prefix": (2, 4, 1, 64, 16, 0, [4, 21], 4, F16),
    "chunked_prefill_prefix": (3, 8, 2, 64, 16, 37, [5, 9, 40], 5, BF16),
    "chunked_prefill_d128_gqa8": (2, 8, 1, 128, 32, 64, [3, 70], 3, F16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    batch, hq, hkv, d, bs, plen, slens, q_len, dtype = CASES[name]
    case = make_case(
        batch=batch, hq=hq, hkv=hkv, d=d, block_size=bs, prefix_lens=[plen], suffix_lens=slens, q_len=q_len, dtype=dtype
    )
    out, lse, ref, ref_lse = run_both(case)
    check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("prefix_splits,suffix_splits,block_m", [(1, 1, None), (3, 2, None), (5, 4, 16), (64, 64, 32)])
def test_split_kv_and_tiling(prefix_splits, suffix_splits, block_m):
    """Split-KV factors / M tiles change only the partition, never the result."""
    case = make_case(batch=5, hq=8, hkv=2, d=64, block_size=16, prefix_lens=[150], suffix_lens=[1, 40, 77, 3, 16])
    out, lse, ref, ref_lse = run_both(
        case, num_prefix_splits=prefix_splits, num_suffix_splits=suffix_splits, block_m=block_m, block_n=16
    )
    check(out, lse, ref, ref_lse, torch.float16)


def test_chunked_prefill_split_and_mtiles():
    """Causal suffix with several M tiles and KV splits (tile-level causal clipping)."""
    case = make_case(
        batch=2, hq=4, hkv=2, d=64, block_size=16, prefix_lens=[20], suffix_lens=[40, 19], q_len=19, dtype=F16
    )
    out, lse, ref, ref_lse = run_both(case, num_suffix_splits=3, block_m=16, block_n=16)
    check(out, lse, ref, ref_lse, F16)


def test_softmax_scale():
    case = make_case(batch=3, hq=4, hkv=1, d=64, block_size=16, prefix_lens=[33], suffix_lens=[1, 8, 20])
    out, lse, ref, ref_lse = run_both(case, scale=0.37)
    check(out, lse, ref, ref_lse, F16)
    # and the default scale is 1/sqrt(D)
    out_d, _, _, _ = run_both(case, scale=None)
    out_s, _, _, _ = run_both(case, scale=1 / math.sqrt(64))
    torch.testing.assert_close(out_d, out_s, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_multiple_groups(dtype):
    """Several prefix groups of different sizes (incl. an empty prefix) in one batch."""
    case = make_case(
        batch=8,
        hq=8,
        hkv=2,
        d=64,
        block_size=16,
        prefix_lens=[40, 0, 17, 64],
        suffix_lens=[1, 2, 3, 4, 5, 6, 7, 8],
        group_sizes=[3, 1, 2, 2],
        dtype=dtype,
    )
    out, lse, ref, ref_lse = run_both(case)
    check(out, lse, ref, ref_lse, dtype)
    # prefix lengths as a device tensor give the same result
    case2 = dict(case, prefix_len=torch.tensor(case["prefix_len"], dtype=torch.int32, device=DEVICE))
    out2 = prefix_shared_decode_attention(**case2)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    # ... and so do device-tensor group offsets with a caller-given bound (no host sync)
    case3 = dict(case2, group_offsets=torch.tensor(case["group_offsets"], dtype=torch.int32, device=DEVICE))
    out3 = prefix_shared_decode_attention(**case3, max_group_size=3)
    torch.testing.assert_close(out3, out, atol=0, rtol=0)


def test_strided_query_view():
    """q may be a view into a fused QKV projection (non-contiguous rows)."""
    case = make_case(batch=4, hq=8, hkv=2, d=64, block_size=16, prefix_lens=[25], suffix_lens=[1, 3, 18, 5])
    qkv = torch.randn(4, 8 + 2 * 2, 64, dtype=F16, device=DEVICE)
    qkv[:, :8] = case["q"]
    case["q"] = qkv[:, :8]
    assert not case["q"].is_contiguous()
    out, lse, ref, ref_lse = run_both(case)
    check(out, lse, ref, ref_lse, F16)


def test_prefix_equals_concatenated_tables():
    """Sharing the prefix gives the same result as giving every sequence prefix+suffix pages."""
    bs = 16
    case = make_case(batch=3, hq=4, hkv=2, d=64, block_size=bs, prefix_lens=[48], suffix_lens=[1, 20, 9])
    shared = prefix_shared_decode_attention(
        case["q"], case["key_cache"], case["value_cache"], case["prefix_block_table"][0], 48,
        case["suffix_block_tables"], case["suffix_lens"],
    )
    full_tables = torch.cat([case["prefix_block_table"][0].expand(3, -1), case["suffix_block_tables"]], dim=1)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    flat = prefix_shared_decode_attention(
        case["q"], case["key_cache"], case["value_cache"], empty, 0, full_tables, case["suffix_lens"] + 48,
    )
    torch.testing.assert_close(shared.float(), flat.float(), atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------
# LSE merge on its own
# ---------------------------------------------------------------------------


def _partials_by_key_split(q, k, v, cuts, scale):
    """Attention of q over consecutive key chunks, each with its own (out, lse), in float64."""
    outs, lses = [], []
    bounds = [0, *cuts, k.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            o, l = naive_attention(q, k[lo:hi], v[lo:hi], scale)
        else:
            o = torch.zeros(q.shape, dtype=torch.float64)
            l = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
        outs.append(o.reshape(-1, q.shape[-1]))
        lses.append(l.reshape(-1))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("d", [64, 128])
def test_lse_merge_exact(d):
    """Merging per-chunk results reproduces full attention to float32 precision."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, d, generator=g, dtype=torch.float64)
    k = torch.randn(100, 8, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(100, 8, d, generator=g, dtype=torch.float64)
    scale = d**-0.5
    full_o, full_lse = naive_attention(q, k, v, scale)
    outs, lses = _partials_by_key_split(q, k, v, [7, 7, 50, 99], scale)  # incl. an empty chunk
    out, lse = merge_attention_states(outs.float().to(DEVICE), lses.float().to(DEVICE))
    torch.testing.assert_close(out.double().cpu(), full_o.reshape(-1, d), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), full_lse.reshape(-1), atol=2e-6, rtol=1e-6)
    # the float64 reference merge is exact
    r_out, r_lse = reference_merge_attention_states(outs, lses)
    torch.testing.assert_close(r_out, full_o.reshape(-1, d), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(r_lse, full_lse.reshape(-1), atol=1e-12, rtol=1e-12)
    # order of the parts does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    out_p, lse_p = merge_attention_states(outs[perm].float().to(DEVICE), lses[perm].float().to(DEVICE))
    torch.testing.assert_close(out_p, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_p, lse, atol=1e-6, rtol=1e-6)


def test_lse_merge_edge_cases():
    d = 64
    o = torch.randn(1, 5, d)
    lse = torch.tensor([[0.3, -2.0, 80.0, -80.0, 1.0]])
    # a single part, or one part merged with empty parts, is returned unchanged
    out, l = merge_attention_states(o.to(DEVICE), lse.to(DEVICE))
    torch.testing.assert_close(out.cpu(), o[0], atol=0, rtol=0)
    torch.testing.assert_close(l.cpu(), lse[0], atol=1e-6, rtol=0)
    empty_o = torch.zeros(2, 5, d)
    empty_l = torch.full((2, 5), float("-inf"))
    out, l = merge_attention_states(torch.cat([empty_o[:1], o, empty_o[1:]]).to(DEVICE),
                                    torch.cat([empty_l[:1], lse, empty_l[1:]]).to(DEVICE))
    torch.testing.assert_close(out.cpu(), o[0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(l.cpu(), lse[0], atol=1e-6, rtol=0)
    # all parts empty -> zeros and -inf (no NaN)
    out, l = merge_attention_states(empty_o.to(DEVICE), empty_l.to(DEVICE))
    assert torch.equal(out.cpu(), torch.zeros(5, d))
    assert torch.isneginf(l.cpu()).all()
    # large LSE gaps do not overflow: the part with the larger LSE dominates
    o2 = torch.randn(2, 1, d)
    l2 = torch.tensor([[500.0], [-500.0]])
    out, l = merge_attention_states(o2.to(DEVICE), l2.to(DEVICE), out_dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), o2[0].half().float(), atol=0, rtol=0)
    torch.testing.assert_close(l.cpu(), torch.tensor([500.0]))
    # two equal-LSE parts average and add log(2)
    out, l = merge_attention_states(o2.to(DEVICE), torch.zeros(2, 1).to(DEVICE))
    torch.testing.assert_close(out.cpu(), o2.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l.cpu(), torch.tensor([math.log(2.0)]), atol=1e-6, rtol=0)


def test_rejects_bad_shapes():
    case = make_case(batch=2, hq=6, hkv=4, d=64, block_size=16, prefix_lens=[5], suffix_lens=[1, 2])
    with pytest.raises(AssertionError, match="multiple"):
        prefix_shared_decode_attention(
            case["q"], case["key_cache"], case["value_cache"], case["prefix_block_table"][0], 5,
            case["suffix_block_tables"], case["suffix_lens"],
        )
    case = make_case(batch=2, hq=4, hkv=4, d=64, block_size=16, prefix_lens=[5], suffix_lens=[1, 2])
    with pytest.raises(AssertionError, match="prefix_len"):
        prefix_shared_decode_attention(
            case["q"], case["key_cache"], case["value_cache"], case["prefix_block_table"][0], 17,
            case["suffix_block_tables"], case["suffix_lens"],
        )


# ---------------------------------------------------------------------------
# Finding shared prefixes in a block table (the vLLM integration step)
# ---------------------------------------------------------------------------


def _batch_with_shared_pages(bs=16, hq=8, hkv=2, d=64, dtype=F16, seed=3):
    """Block tables as vLLM's prefix cache makes them: shared prompt pages have the same block ids."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 80
    kc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    doc_a = [next(free) for _ in range(3)]  # 48 shared tokens
    doc_b = [next(free) for _ in range(2)]
    rows, lens = [], []

    def seq(shared, own_tokens):
        own = [next(free) for _ in range(-(-own_tokens // bs))]
        rows.append(shared + own)
        lens.append(len(shared) * bs + own_tokens)

    for n in (1, 7, 16, 20):  # group A: four sequences behind doc_a
        seq(doc_a, n)
    seq(doc_b, 5)  # group B: three behind doc_b, one of which shares a third page with no one
    seq(doc_b, 17)
    seq(doc_b + [next(free)], 2)
    seq([], 9)  # unique sequences
    seq([], 33)
    lone = [next(free)]
    seq(lone, 3)  # shares its first page with one other sequence only
    seq(lone, 4)
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [num_blocks - 1] * (width - len(r)) for r in rows], dtype=torch.int32)
    q = torch.randn(len(rows), hq, d, generator=g).to(dtype)
    return q, kc, vc, table, lens


def test_plan_finds_the_shared_pages():
    _, _, _, table, lens = _batch_with_shared_pages()
    plan = plan_prefix_groups(table, lens, 16, min_prefix_blocks=1, min_group_size=3)
    offsets, prefix_lens = plan.group_offsets.tolist(), plan.prefix_lens.tolist()
    groups = {tuple(sorted(plan.order[a:b].tolist())): n for a, b, n in zip(offsets, offsets[1:], prefix_lens)}
    assert groups == {(0, 1, 2, 3): 48, (4, 5, 6): 32, (7, 8, 9, 10): 0}
    assert sorted(plan.order.tolist()) == list(range(len(lens)))
    assert plan.num_shared == 7 and plan.max_group_size == 4
    # each sequence keeps its own pages, and its length less the prefix, as its suffix
    for i, row in enumerate(plan.order.tolist()):
        g = next(k for k in range(len(prefix_lens)) if offsets[k] <= i < offsets[k + 1])
        n_blocks = prefix_lens[g] // 16
        own = -(-lens[row] // 16) - n_blocks
        assert plan.suffix_tables[i, :own].tolist() == table[row, n_blocks:n_blocks + own].tolist()
        assert int(plan.suffix_lens[i]) == lens[row] - prefix_lens[g]
    # thresholds: groups need enough sequences and enough shared pages
    assert plan_prefix_groups(table, lens, 16, min_prefix_blocks=1, min_group_size=5).num_shared == 0
    only_a = plan_prefix_groups(table, lens, 16, min_prefix_blocks=3, min_group_size=3)
    assert only_a.prefix_lens[0] == 48 and only_a.num_shared == 4


def test_plan_leaves_the_query_token_in_the_suffix():
    """A sequence whose whole length is shared pages still keeps its last token's page as suffix."""
    table = torch.tensor([[5, 6, 7], [5, 6, 8], [5, 6, 9]], dtype=torch.int32)
    lens = [32, 40, 48]  # the first sequence ends exactly at the end of page 6
    plan = plan_prefix_groups(table, lens, 16, min_prefix_blocks=1, min_group_size=2)
    assert plan.prefix_lens.tolist() == [16]
    assert int(plan.suffix_lens[0]) == 16 and plan.suffix_tables[0, 0] == 6


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_grouped_decode_matches_per_sequence_attention(dtype):
    q, kc, vc, table, lens = _batch_with_shared_pages(dtype=dtype)
    q, kc, vc, table = q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), table.to(DEVICE)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    ref = reference_prefix_shared_attention(q, kc, vc, empty, 0, table, lens_t)
    for kw in (dict(min_prefix_blocks=1, min_group_size=3), dict(min_group_size=100)):
        out = grouped_decode_attention(q, kc, vc, table, lens_t, **kw)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOL[dtype])
    # a plan made once and moved to the device serves every later call (one per layer)
    plan = plan_prefix_groups(table, lens, 16, min_prefix_blocks=1, min_group_size=3).to(DEVICE)
    again = grouped_decode_attention(q, kc, vc, table, lens_t, plan=plan)
    torch.testing.assert_close(again.float().cpu(), ref.float().cpu(), **TOL[dtype])
