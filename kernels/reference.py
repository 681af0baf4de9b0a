"""Plain-PyTorch reference for prefix-shared paged attention.

Everything here is deliberately naive: pages are gathered into dense K/V per
sequence, attention is computed per sequence in float64, and nothing is
shared between sequences.  It is the ground truth for the Triton kernels in
:mod:`kernels.prefix_attention` and runs anywhere PyTorch runs (no Triton).

Conventions (identical to :func:`kernels.prefix_attention.prefix_shared_decode_attention`):

* ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_size]``
  (vLLM's paged layout).
* Sequence ``b`` (in group ``g``) attends to the ``prefix_lens[g]`` tokens of its
  group's shared prefix (pages ``prefix_block_table[g]``) followed by the
  ``suffix_lens[b]`` tokens of its own suffix (pages ``suffix_block_tables[b]``).
* ``q`` is ``[batch, num_q_heads, head_size]`` (decode, one query token per
  sequence) or ``[batch, q_len, num_q_heads, head_size]`` (chunked prefill /
  multi-token decode).  The ``q_len`` query tokens are the *last* ``q_len``
  tokens of the suffix: query ``t`` sits at suffix position
  ``suffix_lens[b] - q_len + t`` and sees the whole prefix and the suffix
  positions ``<=`` its own (causal).
* Query head ``h`` uses KV head ``h // (num_q_heads // num_kv_heads)`` (GQA).
* The LSE is the natural-log log-sum-exp of the scaled scores
  (``-inf`` if a query sees no token at all, in which case the output is 0).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

IntsLike = Union[int, Sequence[int], torch.Tensor]


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Gather the first ``length`` tokens addressed by one block-table row.

    ``cache``: ``[num_blocks, block_size, num_kv_heads, head_size]``;
    ``block_table_row``: ``[max_blocks]`` int.  Returns ``[length, num_kv_heads, head_size]``.
    """
    block_size = cache.shape[1]
    if length == 0:
        return cache.new_zeros((0,) + tuple(cache.shape[2:]))
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table_row[:n_blocks].long().to(cache.device)
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _as_int_list(x: IntsLike, n: Optional[int] = None) -> list[int]:
    if isinstance(x, torch.Tensor):
        out = [int(v) for v in x.reshape(-1).tolist()]
    elif isinstance(x, int):
        out = [int(x)]
    else:
        out = [int(v) for v in x]
    if n is not None and len(out) == 1 and n != 1:
        out = out * n
    return out


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention for one sequence, computed in float64.

    ``q``: ``[q_len, num_q_heads, D]``; ``k``, ``v``: ``[kv_len, num_kv_heads, D]``.
    ``q_positions``: ``[q_len]`` absolute positions of the queries among the
    ``kv_len`` keys (query ``t`` sees keys ``<= q_positions[t]``); ``None`` = no mask.
    Returns ``(out [q_len, num_q_heads, D] float64, lse [q_len, num_q_heads] float64)``.
    """
    hq = q.shape[1]
    kv_len, hkv, _ = k.shape
    assert hq % hkv == 0
    group = hq // hkv
    qd = q.double()
    kd = k.double().repeat_interleave(group, dim=1)  # [kv_len, hq, D]
    vd = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,khd->htk", qd, kd) * scale  # [hq, q_len, kv_len]
    if q_positions is not None:
        kpos = torch.arange(kv_len, device=q.device)
        visible = kpos[None, :] <= q_positions.to(q.device)[:, None]  # [q_len, kv_len]
        scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hq, q_len]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("htk,khd->thd", probs, vd)
    return out, lse.transpose(0, 1)


def reference_prefix_shared_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_block_table: torch.Tensor,
    prefix_len: IntsLike,
    suffix_block_tables: torch.Tensor,
    suffix_lens: IntsLike,
    scale: Optional[float] = None,
    group_offsets: Optional[IntsLike] = None,
    return_lse: bool = False,
):
    """Reference for :func:`kernels.prefix_attention.prefix_shared_decode_attention`.

    Shapes: see the module docstring.  ``prefix_block_table`` is ``[P]`` (one
    group) or ``[G, P]``; ``prefix_len`` an int or ``G`` ints; ``group_offsets``
    ``G + 1`` ints (sequences of group ``g`` are ``group_offsets[g]:group_offsets[g+1]``;
    default: one group holding the whole batch).  Returns ``out`` with the shape
    and dtype of ``q`` (and, if ``return_lse``, the float32 LSE of shape ``q.shape[:-1]``).
    """
    decode = q.dim() == 3
    q4 = q.unsqueeze(1) if decode else q
    batch, q_len, hq, d = q4.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    tables = prefix_block_table if prefix_block_table.dim() == 2 else prefix_block_table.unsqueeze(0)
    num_groups = tables.shape[0]
    plens = _as_int_list(prefix_len, num_groups)
    slens = _as_int_list(suffix_lens, batch)
    offsets = [0, batch] if group_offsets is None else _as_int_list(group_offsets)
    assert len(offsets) == num_groups + 1 and offsets[0] == 0 and offsets[-1] == batch

    out = torch.zeros(batch, q_len, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, q_len, hq), float("-inf"), dtype=torch.float64, device=q.device)
    for g in range(num_groups):
        kp = gather_paged_kv(key_cache, tables[g], plens[g])
        vp = gather_paged_kv(value_cache, tables[g], plens[g])
        for b in range(offsets[g], offsets[g + 1]):
            ks = gather_paged_kv(key_cache, suffix_block_tables[b], slens[b])
            vs = gather_paged_kv(value_cache, suffix_block_tables[b], slens[b])
            k = torch.cat([kp, ks], 0)
            v = torch.cat([vp, vs], 0)
            qpos = plens[g] + slens[b] - q_len + torch.arange(q_len, device=q.device)
            o_b, lse_b = naive_attention(q4[b], k, v, scale, qpos)
            out[b] = o_b
            lse[b] = lse_b
    out = out.to(q.dtype)
    lse = lse.float()
    if decode:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def reference_merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of partial attention results, in float64.

    ``outs``: ``[P, N, D]`` (each part normalised over its own keys);
    ``lses``: ``[P, N]`` natural-log LSE of each part (``-inf`` = empty part).
    Returns ``(out [N, D] float64, lse [N] float64)``; rows with every part
    empty get ``out = 0``, ``lse = -inf``.
    """
    lses = lses.double()
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - safe[None])  # [P, N]; 0 for empty parts
    out = (w[..., None] * outs.double()).sum(0)
    return out, lse
