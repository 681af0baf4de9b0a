"""Find the shared prefixes of a decode batch from its block tables, and run the kernel on them.

vLLM stopped reporting common prefixes when it removed cascade attention, but with prefix caching a
shared prefix *is* shared physical pages: sequences that share a prompt prefix have block-table rows
that start with the same block ids.  :func:`plan_prefix_groups` reads that off the block table the
attention metadata already holds; :func:`grouped_decode_attention` takes exactly what a paged decode
kernel takes (``block_table``, ``seq_lens``), groups, runs
:func:`kernels.prefix_attention.prefix_shared_decode_attention` and returns rows in the batch's order.
This is the step a vLLM attention backend's metadata builder would call (kernels/README.md).

Grouping is deliberately simple: sequences are bucketed by their first block id, and a bucket's
prefix is the longest run of leading blocks all its sequences share.  A bucket becomes a group when
it has ``min_group_size`` sequences and the run is at least ``min_prefix_blocks`` long (vLLM 0.11's
cascade heuristic used 256 tokens and 8 requests); other sequences go to one group with no prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch

from .prefix_attention import prefix_shared_decode_attention

__all__ = ["PrefixGroupPlan", "plan_prefix_groups", "grouped_decode_attention"]


@dataclass(frozen=True)
class PrefixGroupPlan:
    """The batch in group order: sequences ``order[group_offsets[g]:group_offsets[g+1]]`` share group g's prefix.

    Invariants: ``order`` is a permutation of ``range(B)``; each ``prefix_lens[g]`` is a whole number of
    blocks and leaves every sequence of the group at least ``q_len`` tokens of suffix; the no-prefix
    group, if any, is last and has ``prefix_lens == 0``.  Move it to the GPU once per step with
    :meth:`to`; then every layer's call reads nothing back and can be captured in a CUDA graph.
    """

    order: torch.Tensor  # int64 [B], batch rows in group order
    group_offsets: torch.Tensor  # int32 [G + 1]
    prefix_tables: torch.Tensor  # int32 [G, P]
    prefix_lens: torch.Tensor  # int32 [G], tokens
    suffix_tables: torch.Tensor  # int32 [B, S], rows in group order
    suffix_lens: torch.Tensor  # int32 [B], rows in group order
    max_group_size: int
    num_shared: int  # sequences that read a shared prefix

    def to(self, device: Union[str, torch.device]) -> "PrefixGroupPlan":
        move = ("order", "group_offsets", "prefix_tables", "prefix_lens", "suffix_tables", "suffix_lens")
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=True) for k in move})


def _common_leading_blocks(rows: torch.Tensor) -> int:
    """Length of the run of leading columns on which all ``rows`` agree."""
    same = (rows == rows[:1]).all(dim=0).to(torch.int32)
    return int(same.cumprod(0).sum())


def plan_prefix_groups(
    block_table: torch.Tensor,
    seq_lens: Union[Sequence[int], torch.Tensor],
    block_size: int,
    *,
    q_len: int = 1,
    min_prefix_blocks: int = 16,
    min_group_size: int = 8,
) -> PrefixGroupPlan:
    """Group a batch by shared leading blocks (host-side; ``block_table`` is read on the CPU).

    ``block_table``: int ``[B, W]`` (vLLM's per-request block ids, padded); ``seq_lens``: ``B`` ints,
    tokens in each sequence including its ``q_len`` query tokens.
    """
    table = block_table.detach().to("cpu", torch.int32)
    lens = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1).cpu()
    batch, width = table.shape
    assert lens.numel() == batch, "need one seq_len per block-table row"
    used = (lens + block_size - 1) // block_size
    # Leading blocks a sequence may give to a prefix: whole blocks before its query tokens.
    shareable = (lens - q_len).clamp(min=0) // block_size

    firsts, bucket, counts = torch.unique(table[:, 0], return_inverse=True, return_counts=True)
    groups: list[tuple[torch.Tensor, int]] = []  # (rows, prefix blocks)
    grouped = torch.zeros(batch, dtype=torch.bool)
    for i in (counts >= min_group_size).nonzero().flatten().tolist():
        members = (bucket == i).nonzero().flatten()
        n = min(_common_leading_blocks(table[members]), int(shareable[members].min()))
        if n >= min_prefix_blocks:
            groups.append((members, n))
            grouped[members] = True
    if not grouped.all():
        groups.append(((~grouped).nonzero().flatten(), 0))

    order = torch.cat([members for members, _ in groups])
    sizes = [int(members.numel()) for members, _ in groups]
    offsets = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    prefix_blocks = [n for _, n in groups]
    prefix_tables = torch.zeros((len(groups), max(prefix_blocks + [1])), dtype=torch.int32)
    for g, (members, n) in enumerate(groups):
        prefix_tables[g, :n] = table[members[0], :n]
    # Each row's suffix = its block-table row shifted left by its group's prefix blocks.
    shift = torch.repeat_interleave(torch.tensor(prefix_blocks), torch.tensor(sizes))
    suffix_width = max(1, int((used[order] - shift).max()))
    cols = (shift[:, None] + torch.arange(suffix_width)[None, :]).clamp(max=width - 1)
    suffix_tables = torch.gather(table[order], 1, cols)  # entries past a row's length are never read
    suffix_lens = (lens[order] - shift * block_size).to(torch.int32)
    assert width >= int(used.max()), "block_table narrower than seq_lens need"
    return PrefixGroupPlan(
        order=order,
        group_offsets=offsets,
        prefix_tables=prefix_tables,
        prefix_lens=torch.tensor([n * block_size for n in prefix_blocks], dtype=torch.int32),
        suffix_tables=suffix_tables,
        suffix_lens=suffix_lens,
        max_group_size=max(sizes),
        num_shared=sum(size for size, n in zip(sizes, prefix_blocks) if n),
    )


def grouped_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: Union[Sequence[int], torch.Tensor],
    scale: Optional[float] = None,
    *,
    plan: Optional[PrefixGroupPlan] = None,
    min_prefix_blocks: int = 16,
    min_group_size: int = 8,
) -> torch.Tensor:
    """Paged decode attention (``q`` ``[B, Hq, D]`` or ``[B, Lq, Hq, D]``) with shared prefixes read once.

    Same inputs as a per-sequence paged kernel; the result is in the batch's order.  Pass ``plan``
    to reuse one across layers (the grouping depends only on the block table).
    """
    q_len = 1 if q.dim() == 3 else q.shape[1]
    if plan is None:
        plan = plan_prefix_groups(block_table, seq_lens, key_cache.shape[1], q_len=q_len,
                                  min_prefix_blocks=min_prefix_blocks, min_group_size=min_group_size)
    device = q.device
    if plan.num_shared == 0:  # nothing shared: one group, no prefix kernel launch
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        lens = torch.as_tensor(seq_lens, dtype=torch.int32).to(device)
        return prefix_shared_decode_attention(q, key_cache, value_cache, empty, 0, block_table.to(device, torch.int32),
                                              lens, scale)
    if plan.order.device != device:
        plan = plan.to(device)
    out = prefix_shared_decode_attention(
        q.index_select(0, plan.order), key_cache, value_cache, plan.prefix_tables, plan.prefix_lens,
        plan.suffix_tables, plan.suffix_lens, scale, group_offsets=plan.group_offsets,
        max_group_size=plan.max_group_size,
    )
    result = torch.empty_like(out)
    result.index_copy_(0, plan.order, out)
    return result
