"""Triton prefix-sharing ("cascade") paged attention for decode / chunked prefill.

A batch of sequences is split into *groups*; all sequences of a group share a
prefix (e.g. a system prompt or a few-shot context) whose K/V lives once in the
paged cache, described by its own block table.  Each sequence additionally has
its own suffix (its own block table).  Attention is computed in three steps:

1. ``_prefix_attn_kernel`` -- attention of *all* queries of a group over the
   shared prefix.  One program handles one (group, KV head, M tile, KV split):
   the M dimension of the ``tl.dot`` is ``sequences-in-group x q_len x
   query-heads-per-KV-head``, so every prefix K/V tile is loaded once and
   multiplied against all the queries that use it.  For decode this turns
   ``batch`` matrix-vector products (memory bound, prefix re-read per
   sequence) into one matrix-matrix product per KV head.
2. ``_suffix_attn_kernel`` -- ordinary paged attention of each sequence over its
   own suffix (causal within the suffix when ``q_len > 1``).  One program per
   (sequence, KV head, M tile, KV split); M = ``q_len x heads-per-KV-head``.
3. ``_merge_kernel`` -- exact log-sum-exp merge of all partial results
   (prefix splits + suffix splits) into the final output.  When the suffix is
   not split (the common decode case) the suffix kernel does this merge in its
   epilogue instead, and there is no third launch.

Each partial result is stored normalised (``o_i = sum_j p_ij v_j / l_i``) in
float32 together with its natural-log LSE; the merge computes
``o = sum_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i lse_i``, which is
exact (up to float32 rounding) and handles empty parts (``lse_i = -inf``).

The public entry point is :func:`prefix_shared_decode_attention`.  The kernels
run on GPU, and on CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
set before triton is imported) for testing.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

__all__ = [
    "prefix_shared_decode_attention",
    "merge_attention_states",
]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------


@triton.jit
def _attn_tile_loop(
    acc,
    m_i,
    l_i,
    q,
    K_cache,
    V_cache,
    table_ptr,
    kv_lo,
    kv_hi,
    kvh,
    q_pos,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Online-softmax loop over the paged KV tokens ``[kv_lo, kv_hi)`` of one table row.

    ``q``: ``[BLOCK_M, HEAD]`` queries (all using KV head ``kvh``).  Scores are
    kept in the log2 domain (``qk_scale`` = softmax scale * log2(e), applied
    in the same FMA that subtracts the running max).
    ``MASKED``: the range may end inside a tile or (``CAUSAL``) hide keys from
    some queries; callers run the whole tiles every query sees with
    ``MASKED=False``, which skips all masking, and only the rest masked.
    ``q_pos``: ``[BLOCK_M]`` position of each query in the same coordinate
    system as the KV tokens (only used if ``CAUSAL``).
    ``DOT_F32``: do the two ``tl.dot`` in float32 (after rounding ``p`` to the
    KV dtype, as the native path does).  Only used under the CPU interpreter,
    whose bf16 ``tl.dot`` multiplies raw bit patterns (triton-lang/triton#11584).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    k_head = K_cache + kvh.to(tl.int64) * stride_kh
    v_head = V_cache + kvh.to(tl.int64) * stride_vh
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + offs_n
        if BLOCK_N <= BLOCK_SIZE:
            # The tile lies inside one page (kv_lo is a multiple of BLOCK_N and
            # BLOCK_N divides BLOCK_SIZE): one page index, contiguous slots.
            blk = tl.load(table_ptr + (start // BLOCK_SIZE) * stride_tb).to(tl.int64)
        elif MASKED:
            blk = tl.load(table_ptr + (pos // BLOCK_SIZE) * stride_tb, mask=pos < kv_hi, other=0).to(tl.int64)
        else:
            blk = tl.load(table_ptr + (pos // BLOCK_SIZE) * stride_tb).to(tl.int64)
        k_row = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ks
        v_row = blk * stride_vb + (pos % BLOCK_SIZE) * stride_vs
        if MASKED:
            kv_mask = pos < kv_hi
            k = tl.load(k_head + k_row[:, None] + offs_d[None, :], mask=kv_mask[:, None], other=0.0)
        else:
            k = tl.load(k_head + k_row[:, None] + offs_d[None, :])
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], fp32 accumulate, unscaled
        if MASKED:
            if CAUSAL:
                visible = kv_mask[None, :] & (pos[None, :] <= q_pos[:, None])
            else:
                visible = kv_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # Rows that have seen nothing yet keep m = -inf; subtract 0 instead so
            # that exp2(-inf - (-inf)) never produces NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_sub = m_new  # finite: this tile is visible to every row
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s * qk_scale - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_head + v_row[:, None] + offs_d[None, :], mask=kv_mask[:, None], other=0.0)
        else:
            v = tl.load(v_head + v_row[:, None] + offs_d[None, :])
        if DOT_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_range(
    acc,
    m_i,
    l_i,
    q,
    K_cache,
    V_cache,
    table_ptr,
    kv_lo,
    full_hi,
    kv_hi,
    kvh,
    q_pos,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """``_attn_tile_loop`` over ``[kv_lo, kv_hi)``: the whole tiles below ``full_hi`` (keys every query of
    the tile sees) unmasked, the rest masked."""
    kv_mid = kv_lo + tl.maximum(full_hi - kv_lo, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attn_tile_loop(
        acc, m_i, l_i, q, K_cache, V_cache, table_ptr, kv_lo, kv_mid, kvh, q_pos, qk_scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
        HEAD, BLOCK_SIZE, BLOCK_N, False, CAUSAL, DOT_F32,
    )
    acc, m_i, l_i = _attn_tile_loop(
        acc, m_i, l_i, q, K_cache, V_cache, table_ptr, kv_mid, kv_hi, kvh, q_pos, qk_scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
        HEAD, BLOCK_SIZE, BLOCK_N, True, CAUSAL, DOT_F32,
    )
    return acc, m_i, l_i


@triton.jit
def _store_partial(
    O_part,
    LSE_part,
    part,
    out_rows,
    row_mask,
    acc,
    m_i,
    l_i,
    stride_op,
    stride_on,
    stride_lp,
    HEAD: tl.constexpr,
):
    """Write a normalised partial output and its natural-log LSE (``-inf`` if empty)."""
    offs_d = tl.arange(0, HEAD)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    rows64 = out_rows.to(tl.int64)
    part = part.to(tl.int64)
    o_ptrs = O_part + part * stride_op + rows64[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, o, mask=row_mask[:, None])
    tl.store(LSE_part + part * stride_lp + rows64, lse, mask=row_mask)


@triton.jit
def _prefix_attn_kernel(
    Q,
    K_cache,
    V_cache,
    PrefixTables,
    PrefixLens,
    GroupOffsets,
    O_part,
    LSE_part,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ptg,
    stride_ptb,
    stride_op,
    stride_on,
    stride_lp,
    q_len,
    num_q_heads,
    tokens_per_split,
    batch,
    single_prefix_len,
    NUM_KV_HEADS: tl.constexpr,
    GQA: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_GROUP: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Grid: (M tiles, prefix splits, groups * KV heads).  Writes part ``pid_s``.

    ``SINGLE_GROUP``: the whole batch is one group with ``single_prefix_len`` prefix tokens,
    passed as scalars so that the wrapper launches no kernels to build the two small tensors.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_gh = tl.program_id(2)
    g = pid_gh // NUM_KV_HEADS
    kvh = pid_gh % NUM_KV_HEADS

    if SINGLE_GROUP:
        seq_lo = 0
        n_seqs = batch
        prefix_len = single_prefix_len
    else:
        seq_lo = tl.load(GroupOffsets + g)
        n_seqs = tl.load(GroupOffsets + g + 1) - seq_lo
        prefix_len = tl.load(PrefixLens + g)
    rows_per_seq = q_len * GQA
    n_rows = n_seqs * rows_per_seq

    # Row r of the M dimension = (sequence s of the group, query token t, head h of this KV head).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    s_idx = rows // rows_per_seq
    rem = rows % rows_per_seq
    t_idx = rem // GQA
    h_idx = kvh * GQA + rem % GQA
    b_idx = (seq_lo + s_idx).to(tl.int64)

    offs_d = tl.arange(0, HEAD)
    q_ptrs = Q + b_idx[:, None] * stride_qb + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)

    kv_lo = pid_s * tokens_per_split
    kv_hi = tl.minimum(kv_lo + tokens_per_split, prefix_len)
    # M tiles past the end of this group (groups are padded to the largest) do no work.
    kv_hi = tl.where(pid_m * BLOCK_M < n_rows, kv_hi, kv_lo)

    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table = PrefixTables + g.to(tl.int64) * stride_ptg
    acc, m_i, l_i = _attn_range(
        acc, m_i, l_i, q, K_cache, V_cache, table, kv_lo, kv_hi, kv_hi, kvh, t_idx, qk_scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ptb,
        HEAD, BLOCK_SIZE, BLOCK_N, False, DOT_F32,
    )
    out_rows = (b_idx * q_len + t_idx) * num_q_heads + h_idx
    _store_partial(O_part, LSE_part, pid_s, out_rows, row_mask, acc, m_i, l_i, stride_op, stride_on, stride_lp, HEAD)


@triton.jit
def _suffix_attn_kernel(
    Q,
    K_cache,
    V_cache,
    SuffixTables,
    SuffixLens,
    O_part,
    LSE_part,
    Out,
    LSE_out,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_stb,
    stride_stc,
    stride_op,
    stride_on,
    stride_lp,
    stride_out,
    q_len,
    num_q_heads,
    tokens_per_split,
    NUM_KV_HEADS: tl.constexpr,
    GQA: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PART_BASE: tl.constexpr,
    FUSE_MERGE: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Grid: (M tiles, suffix splits, batch * KV heads).  Writes part ``PART_BASE + pid_s``.

    ``FUSE_MERGE`` (one suffix split): instead, merge this result with the prefix kernel's
    ``PART_BASE`` parts (already written: same stream, earlier launch) and write the final rows.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // NUM_KV_HEADS
    kvh = pid_bh % NUM_KV_HEADS
    b64 = b.to(tl.int64)

    seq_len = tl.load(SuffixLens + b)
    n_rows = q_len * GQA
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    t_idx = rows // GQA
    h_idx = kvh * GQA + rows % GQA
    q_pos = seq_len - q_len + t_idx  # position of each query inside the suffix

    offs_d = tl.arange(0, HEAD)
    q_ptrs = Q + b64 * stride_qb + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)

    kv_lo = pid_s * tokens_per_split
    kv_hi = tl.minimum(kv_lo + tokens_per_split, seq_len)
    if CAUSAL:
        # The last query of this tile sees nothing past its own position.
        t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GQA, q_len - 1)
        kv_hi = tl.minimum(kv_hi, seq_len - q_len + t_last + 1)

    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys before the first query's position are visible to every query of the tile.
    table = SuffixTables + b64 * stride_stb
    full_hi = tl.minimum(kv_hi, seq_len - q_len + 1) if CAUSAL else kv_hi
    acc, m_i, l_i = _attn_range(
        acc, m_i, l_i, q, K_cache, V_cache, table, kv_lo, full_hi, kv_hi, kvh, q_pos, qk_scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_stc,
        HEAD, BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_F32,
    )
    out_rows = (b64 * q_len + t_idx) * num_q_heads + h_idx
    if FUSE_MERGE:
        # This part enters the merge as its first term: lse = m + log2(l) (log2 domain), so
        # relative to m its weight is l and its contribution acc (acc = l * normalised output).
        m_nat = tl.where(l_i > 0.0, m_i * 0.6931471805599453, float("-inf"))
        _merge_parts_and_store(acc, m_nat, l_i, O_part, LSE_part, Out, LSE_out, out_rows, row_mask, PART_BASE,
                               stride_op, stride_on, stride_lp, stride_out, HEAD, WRITE_LSE)
    else:
        _store_partial(
            O_part, LSE_part, PART_BASE + pid_s, out_rows, row_mask, acc, m_i, l_i, stride_op, stride_on, stride_lp,
            HEAD,
        )


@triton.jit
def _merge_parts_and_store(
    acc,
    m,
    denom,
    O_part,
    LSE_part,
    Out,
    LSE_out,
    rows64,
    row_mask,
    NUM_PARTS: tl.constexpr,
    stride_op,
    stride_on,
    stride_lp,
    stride_out,
    HEAD: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Fold partial results ``[0, NUM_PARTS)`` into a running merge and write the final rows.

    The loop is unrolled (``NUM_PARTS`` is a compile-time constant, one compile per part count) so
    that the compiler can issue the parts' loads early; on the H200 headline this took the fused
    suffix+merge kernel from 20.7 to 19.8 us.

    The running state is ``acc = sum_i exp(lse_i - m) o_i`` and ``denom = sum_i exp(lse_i - m)``
    (``m = -inf`` and both zero when nothing has been merged yet).
    """
    offs_d = tl.arange(0, HEAD)
    for p in tl.static_range(NUM_PARTS):
        lse = tl.load(LSE_part + p * stride_lp + rows64, mask=row_mask, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        o = tl.load(O_part + p * stride_op + rows64[:, None] * stride_on + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + o * w[:, None]
        denom = denom * alpha + w
        m = m_new
    has = denom > 0.0
    d_safe = tl.where(has, denom, 1.0)
    out = acc / d_safe[:, None]
    tl.store(Out + rows64[:, None] * stride_out + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_mask[:, None])
    if WRITE_LSE:
        tl.store(LSE_out + rows64, tl.where(has, m + tl.log(d_safe), float("-inf")), mask=row_mask)


@triton.jit
def _merge_kernel(
    O_part,
    LSE_part,
    Out,
    LSE_out,
    n_rows,
    stride_op,
    stride_on,
    stride_lp,
    stride_out,
    NUM_PARTS: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Merge ``NUM_PARTS`` normalised partial outputs by their LSEs (single online pass)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD], dtype=tl.float32)
    _merge_parts_and_store(acc, m, denom, O_part, LSE_part, Out, LSE_out, rows.to(tl.int64), row_mask, NUM_PARTS,
                           stride_op, stride_on, stride_lp, stride_out, HEAD, WRITE_LSE)


# --------------------------------------------------------------------------
# Host-side wrappers
# --------------------------------------------------------------------------

IntsLike = Union[int, Sequence[int], torch.Tensor]


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: small, but enough to exercise the split-KV path


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _int32_on(x: IntsLike, device: torch.device) -> torch.Tensor:
    """int32 1-D tensor on ``device``.  No copy for a matching tensor; an int
    becomes a fill (no host-to-device copy, so it is CUDA-graph capturable)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32).reshape(-1).contiguous()
    if isinstance(x, numbers.Integral):
        return torch.full((1,), int(x), dtype=torch.int32, device=device)
    return torch.tensor(list(x), dtype=torch.int32, device=device)


def _host_ints(x: IntsLike) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]  # may synchronise if on GPU
    if isinstance(x, numbers.Integral):
        return [int(x)]
    return [int(v) for v in x]


def merge_attention_states(
    outs: torch.Tensor,
    lses: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
    return_lse: bool = True,
):
    """Merge partial attention results with their log-sum-exps (Triton).

    ``outs``: ``[P, N, D]`` float32, part ``i`` normalised over its own keys;
    ``lses``: ``[P, N]`` float32 natural-log LSE (``-inf`` = empty part).
    ``D`` must be a power of two.  Returns ``out [N, D]`` (``out_dtype``,
    default float32) and, if ``return_lse``, ``lse [N]`` float32.  Rows whose
    parts are all empty get ``out = 0`` and ``lse = -inf``.
    """
    assert outs.dim() == 3 and lses.shape == outs.shape[:2], (outs.shape, lses.shape)
    num_parts, n, d = outs.shape
    assert _is_pow2(d) and d >= 16, "head size must be a power of two >= 16"
    outs = outs.float().contiguous()
    lses = lses.float().contiguous()
    out = torch.empty((n, d), dtype=out_dtype or torch.float32, device=outs.device)
    lse = torch.empty((n,), dtype=torch.float32, device=outs.device)
    _launch_merge(outs, lses, out, lse, n, num_parts, d, write_lse=return_lse)
    return (out, lse) if return_lse else out


def _launch_merge(o_part, lse_part, out2d, lse_out, n_rows, num_parts, head, write_lse):
    block_r = 16 if head >= 128 else 32
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](
        o_part, lse_part, out2d, lse_out, n_rows,
        o_part.stride(0), o_part.stride(1), lse_part.stride(0), out2d.stride(0),
        NUM_PARTS=num_parts, HEAD=head, BLOCK_R=block_r, WRITE_LSE=write_lse, num_warps=4,
    )


def prefix_shared_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_block_table: torch.Tensor,
    prefix_len: IntsLike,
    suffix_block_tables: torch.Tensor,
    suffix_lens: IntsLike,
    scale: Optional[float] = None,
    *,
    group_offsets: Optional[IntsLike] = None,
    max_group_size: Optional[int] = None,
    return_lse: bool = False,
    num_prefix_splits: Optional[int] = None,
    num_suffix_splits: Optional[int] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    suffix_block_n: Optional[int] = None,
    suffix_num_warps: Optional[int] = None,
    suffix_num_stages: Optional[int] = None,
):
    """Decode (or chunked-prefill) attention over a shared prefix + per-sequence suffixes.

    Shapes (``B`` sequences, ``Hq`` query heads, ``Hkv`` KV heads, ``D`` head size):

    * ``q``: ``[B, Hq, D]`` (decode: one query token per sequence) or
      ``[B, Lq, Hq, D]`` (``Lq`` query tokens per sequence: the *last* ``Lq``
      tokens of each suffix, causal among themselves).  fp16 or bf16.
    * ``key_cache``, ``value_cache``: ``[num_blocks, block_size, Hkv, D]``
      (vLLM paged layout), same dtype as ``q``; ``block_size`` a power of two
      >= 16 (any power of two works), ``D`` in {64, 128} (any power of two >= 16
      works), ``Hq % Hkv == 0`` (GQA / MQA / MHA).
    * ``prefix_block_table``: int32 ``[P]`` -- the pages of the shared prefix of
      the single group -- or ``[G, P]`` for ``G`` groups.
    * ``prefix_len``: int (one group) or ``G`` ints / int tensor ``[G]``:
      number of prefix tokens (0 = no shared prefix; only the suffix is used).
      Must be ``<= P * block_size``.
    * ``suffix_block_tables``: int32 ``[B, S]`` pages of each sequence's own suffix.
    * ``suffix_lens``: int tensor ``[B]`` (or list): suffix length of each
      sequence *including* the ``Lq`` query tokens (whose K/V must already be
      in the cache, as in vLLM).  Must be ``<= S * block_size``.
    * ``scale``: softmax scale (default ``D ** -0.5``).
    * ``group_offsets``: ``G + 1`` ints (list or tensor): the sequences of group
      ``g`` are ``q[group_offsets[g]:group_offsets[g+1]]``; must start at 0 and
      end at ``B``.  Default (``None``): one group containing the whole batch.
      Read on the host (one sync if it is a GPU tensor) unless
      ``max_group_size`` (an upper bound on the sequences per group) is given
      together with a tensor ``group_offsets``; then nothing is read back and
      the call can be captured in a CUDA graph (as can the default single-group
      call with an int ``prefix_len`` and tensor ``suffix_lens``).

    Query head ``h`` uses KV head ``h // (Hq // Hkv)``.  Sequence ``b`` of group
    ``g`` attends to prefix tokens ``[0, prefix_len[g])`` and to its suffix
    tokens ``[0, suffix_lens[b] - Lq + t]`` for query ``t``.

    Returns ``out`` with the shape and dtype of ``q``; with ``return_lse`` also
    the float32 natural-log LSE of shape ``q.shape[:-1]``.

    Tuning knobs (``None`` = heuristic): ``num_prefix_splits`` /
    ``num_suffix_splits`` (split-KV factor), ``block_m`` (upper bound of the M
    tile), ``block_n`` (KV tile), ``num_warps``, ``num_stages``; the last three
    apply to both attention kernels unless ``suffix_block_n`` /
    ``suffix_num_warps`` / ``suffix_num_stages`` set the suffix kernel's own.
    """
    decode = q.dim() == 3
    q4 = q.unsqueeze(1) if decode else q
    assert q4.dim() == 4, "q must be [B, Hq, D] or [B, Lq, Hq, D]"
    batch, q_len, hq, d = q4.shape
    assert key_cache.dim() == 4 and key_cache.shape == value_cache.shape
    _, block_size, hkv, d_k = key_cache.shape
    assert d_k == d, f"head size mismatch: q {d} vs cache {d_k}"
    assert hq % hkv == 0, f"num_q_heads {hq} not a multiple of num_kv_heads {hkv}"
    assert _is_pow2(d) and d >= 16, "head size must be a power of two >= 16 (64 and 128 are tested)"
    assert _is_pow2(block_size), "block size must be a power of two"
    assert q.dtype in (torch.float16, torch.bfloat16), "q must be fp16 or bf16"
    assert key_cache.dtype == q.dtype and value_cache.dtype == q.dtype, "q and KV cache dtypes must match"
    assert key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1, "KV cache head dim must be contiguous"
    if q4.stride(-1) != 1:
        q4 = q4.contiguous()
    device = q.device
    gqa = hq // hkv
    if batch == 0 or q_len == 0:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=device)
        return (out, lse) if return_lse else out
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qk_scale = float(scale) * _LOG2E

    # ---- groups / prefix ------------------------------------------------
    prefix_tables = prefix_block_table if prefix_block_table.dim() == 2 else prefix_block_table.reshape(1, -1)
    num_groups = prefix_tables.shape[0]
    if prefix_tables.dtype != torch.int32:
        prefix_tables = prefix_tables.to(torch.int32)
    prefix_tables = prefix_tables.to(device)
    if isinstance(prefix_len, numbers.Integral):
        prefix_len = int(prefix_len)
        assert num_groups == 1, "an int prefix_len needs a single group"
        assert 0 <= prefix_len <= prefix_tables.shape[1] * block_size, "prefix_len exceeds the prefix block table"
        prefix_present = prefix_len > 0
    else:
        prefix_present = prefix_tables.shape[1] > 0
    # One group with a host-known prefix length goes to the kernel as scalars (no tensors to build).
    single_group = isinstance(prefix_len, int) and group_offsets is None
    if single_group:
        prefix_lens_t = offsets_t = prefix_tables  # unread placeholders
    else:
        prefix_lens_t = _int32_on(prefix_len, device)
        assert prefix_lens_t.numel() == num_groups, "need one prefix_len per group"
    if group_offsets is None:
        assert num_groups == 1, "group_offsets is required with several groups"
        if not single_group:
            offsets_t = torch.arange(2, dtype=torch.int32, device=device) * batch  # [0, B], no H2D copy
        max_group = batch
    elif isinstance(group_offsets, torch.Tensor) and max_group_size is not None:
        # caller-provided bound: no device-to-host sync (CUDA-graph friendly)
        offsets_t = group_offsets.to(device=device, dtype=torch.int32).reshape(-1).contiguous()
        assert offsets_t.numel() == num_groups + 1, "group_offsets must have G + 1 entries"
        max_group = int(max_group_size)
    else:
        offsets_host = _host_ints(group_offsets)
        assert len(offsets_host) == num_groups + 1 and offsets_host[0] == 0 and offsets_host[-1] == batch, (
            "group_offsets must have G + 1 entries from 0 to B"
        )
        assert all(b >= a for a, b in zip(offsets_host[:-1], offsets_host[1:])), "group_offsets must be sorted"
        offsets_t = torch.tensor(offsets_host, dtype=torch.int32, device=device)
        max_group = max(b - a for a, b in zip(offsets_host[:-1], offsets_host[1:]))

    suffix_tables = suffix_block_tables
    if suffix_tables.dtype != torch.int32:
        suffix_tables = suffix_tables.to(torch.int32)
    suffix_tables = suffix_tables.to(device)
    assert suffix_tables.dim() == 2 and suffix_tables.shape[0] == batch
    suffix_lens_t = _int32_on(suffix_lens, device)
    assert suffix_lens_t.numel() == batch

    # ---- tiling heuristics ----------------------------------------------
    # Defaults from benchmarks/kernel_tune.py on an H200 (headline, D=64 and chunked shapes):
    # 64x64 tiles, 4 warps, 2 stages were best or within 3% everywhere, and spill no registers;
    # what mattered most was the prefix split count (see below).
    on_gpu = device.type == "cuda"
    n_sm = _num_sms(device)
    bn = block_n or 64
    assert _is_pow2(bn) and bn >= 16
    warps = num_warps
    stages = num_stages if num_stages is not None else (2 if on_gpu else 1)
    # The interpreter (CPU tensors) cannot do bf16 tl.dot; see _attn_tile_loop.
    dot_f32 = (not on_gpu) and q.dtype == torch.bfloat16

    # prefix tiling
    prefix_rows = max_group * q_len * gqa
    if prefix_present and prefix_rows > 0:
        bm_p = block_m or min(64, max(16, _next_pow2(prefix_rows)))
        w_p = warps or (8 if bm_p >= 128 else 4)
        m_tiles_p = triton.cdiv(prefix_rows, bm_p)
        cap_p = prefix_tables.shape[1] * block_size
        if isinstance(prefix_len, int):  # known on the host: no empty splits
            cap_p = prefix_len
        n_tiles_p = triton.cdiv(cap_p, bn)
        if num_prefix_splits is None:
            # As many CTAs as fit on the GPU at once and no more: a partial second wave
            # costs as much as a full one (measured: 8 splits 68 us, 5 or 16 splits 81 us).
            base = num_groups * hkv * m_tiles_p
            resident = n_sm * (2 if w_p <= 4 else 1)
            # keep >= 4 KV tiles per split so the partial-result traffic stays small
            splits_p = max(1, min(resident // base, n_tiles_p // 4))
        else:
            splits_p = max(1, min(num_prefix_splits, n_tiles_p))
        tps_p = triton.cdiv(n_tiles_p, splits_p) * bn
        splits_p = triton.cdiv(cap_p, tps_p)
    else:
        splits_p = 0

    # suffix tiling
    suffix_rows = q_len * gqa
    bm_s = min(block_m or (64 if q_len > 1 else 128), max(16, _next_pow2(suffix_rows)))
    bn_s = suffix_block_n or block_n or 64
    assert _is_pow2(bn_s) and bn_s >= 16
    m_tiles_s = triton.cdiv(suffix_rows, bm_s)
    cap_s = suffix_tables.shape[1] * block_size
    n_tiles_s = max(1, triton.cdiv(cap_s, bn_s))
    if num_suffix_splits is None:
        base = batch * hkv * m_tiles_s
        want = triton.cdiv(n_sm, base)
        splits_s = max(1, min(want, n_tiles_s // 4))
    else:
        splits_s = max(1, min(num_suffix_splits, n_tiles_s))
    tps_s = triton.cdiv(n_tiles_s, splits_s) * bn_s
    splits_s = max(1, triton.cdiv(cap_s, tps_s))

    # One suffix split: the suffix kernel merges the prefix parts itself (no merge launch).
    fuse_merge = splits_s == 1
    num_parts = splits_p + (0 if fuse_merge else splits_s)
    n_rows = batch * q_len * hq
    o_part = torch.empty((max(num_parts, 1), n_rows, d), dtype=torch.float32, device=device)
    lse_part = torch.empty((max(num_parts, 1), n_rows), dtype=torch.float32, device=device)
    out = torch.empty((batch, q_len, hq, d), dtype=q.dtype, device=device)
    lse = torch.empty((batch, q_len, hq), dtype=torch.float32, device=device)
    out2d, lse1d = out.view(n_rows, d), lse.view(n_rows)

    sq = q4.stride()
    sk = key_cache.stride()
    sv = value_cache.stride()

    if splits_p > 0:
        grid = (m_tiles_p, splits_p, num_groups * hkv)
        _prefix_attn_kernel[grid](
            q4, key_cache, value_cache, prefix_tables, prefix_lens_t, offsets_t, o_part, lse_part,
            qk_scale,
            sq[0], sq[1], sq[2],
            sk[0], sk[1], sk[2],
            sv[0], sv[1], sv[2],
            prefix_tables.stride(0), prefix_tables.stride(1),
            o_part.stride(0), o_part.stride(1), lse_part.stride(0),
            q_len, hq, tps_p, batch, prefix_len if single_group else 0,
            NUM_KV_HEADS=hkv, GQA=gqa, HEAD=d, BLOCK_SIZE=block_size, BLOCK_M=bm_p, BLOCK_N=bn,
            SINGLE_GROUP=single_group, DOT_F32=dot_f32, num_warps=w_p, num_stages=stages,
        )

    w = suffix_num_warps or warps or (8 if bm_s >= 128 else 4)
    grid = (m_tiles_s, splits_s, batch * hkv)
    _suffix_attn_kernel[grid](
        q4, key_cache, value_cache, suffix_tables, suffix_lens_t, o_part, lse_part, out2d, lse1d,
        qk_scale,
        sq[0], sq[1], sq[2],
        sk[0], sk[1], sk[2],
        sv[0], sv[1], sv[2],
        suffix_tables.stride(0), suffix_tables.stride(1),
        o_part.stride(0), o_part.stride(1), lse_part.stride(0), out2d.stride(0),
        q_len, hq, tps_s,
        NUM_KV_HEADS=hkv, GQA=gqa, HEAD=d, BLOCK_SIZE=block_size, BLOCK_M=bm_s, BLOCK_N=bn_s,
        CAUSAL=q_len > 1, PART_BASE=splits_p, FUSE_MERGE=fuse_merge, WRITE_LSE=return_lse, DOT_F32=dot_f32,
        num_warps=w, num_stages=suffix_num_stages or num_stages or (2 if on_gpu else 1),
    )

    if not fuse_merge:
        _launch_merge(o_part, lse_part, out2d, lse1d, n_rows, num_parts, d, write_lse=return_lse)
    if decode:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out
