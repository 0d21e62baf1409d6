"""Fused lookup-reduce on CPU (spec §5 "Fused lookup-reduce"): never materialises the [T, K, d_v] gathered rows.

Forward and the table's gradient are the same operation with roles swapped, a weighted bag-sum:

    forward     pooled[t, p, slice_i] = sum_{k: blocks[t,k]=p}   scores[i,t,k] * table[rows[t,k], slice_i]
    grad table  d_table[r, slice_i]   = sum_{(t,k): rows[t,k]=r} scores[i,t,k] * d_pooled[t, blocks[t,k], slice_i]

Both group the (token, k) entries by their bag key (t*E + p forward, by E running counts; the row backward, by a
sort), lay out one bag per (key, core slice) and run `torch.nn.functional.embedding_bag` with per-sample weights,
which reads each source row slice once and writes each output row once (the spec's sort + segment-sum, no
atomics, deterministic). The scores' gradient is a dot product per entry,
grad_s[i,t,k] = <d_pooled[t, p_k, slice_i], table[rows[t,k], slice_i]>, computed in cache-sized chunks of entries.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from umtrain.ops.lookup_reduce import LOOKUP_REDUCE_IMPLS

CHUNK_BYTES = 4 << 20
"""Gathered bytes per chunk of the scores' gradient: two such buffers stay in a core's L2 + the shared L3."""


def check_lookup_reduce_inputs(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                               num_blocks: int) -> None:
    """Raise ValueError naming the bad argument; cheap (one min/max pass over the indices)."""
    if rows.dtype != torch.int64 or blocks.dtype != torch.int64:
        raise ValueError(f"rows and blocks must be int64, got rows {rows.dtype}, blocks {blocks.dtype}")
    if rows.dim() != 2 or blocks.shape != rows.shape:
        raise ValueError(f"rows and blocks must both be [T, K], got rows {tuple(rows.shape)}, "
                         f"blocks {tuple(blocks.shape)}")
    if scores.dim() != 3 or scores.shape[1:] != rows.shape:
        raise ValueError(f"scores must be [h, T, K] = [h, {rows.shape[0]}, {rows.shape[1]}], "
                         f"got {tuple(scores.shape)}")
    if table.dim() != 2:
        raise ValueError(f"table must be [N, d_v], got {tuple(table.shape)}")
    if scores.shape[0] < 1 or table.shape[1] % scores.shape[0]:
        raise ValueError(f"table's d_v={table.shape[1]} must split into h={scores.shape[0]} equal core slices")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if rows.numel():
        _check_range("rows", rows, table.shape[0])
        _check_range("blocks", blocks, num_blocks)


def _check_range(name: str, index: torch.Tensor, size: int) -> None:
    low, high = torch.aminmax(index)
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{int(low)}, {int(high)}]")


def bag_sum(keys: torch.Tensor, num_keys: int, rank: torch.Tensor, source_rows: torch.Tensor,
            weights: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """out[key, slice_i] = sum_{m: keys[m]=key} weights[i, m] * source[source_rows[m], slice_i]; out is [num_keys, d].

    keys, source_rows: [M] int64; rank: [M], entry m's distinct place in [0, count of its key) (see `rank_by_sort`,
    `rank_by_block`); weights: [h, M]; source: [R, d] with d divisible by h. One bag per (key, slice), in that order,
    so embedding_bag writes `out` in place with no permute; empty bags give zeros.
    """
    num_cores = weights.shape[0]
    core = torch.arange(num_cores, device=keys.device)
    counts = torch.bincount(keys, minlength=num_keys)
    starts = counts.cumsum(0) - counts
    offsets = num_cores * starts[:, None] + core * counts[:, None]          # [num_keys, h]: where bag (key, i) begins
    position = (offsets[keys] + rank[:, None]).view(-1)                     # [M * h]: entry m, slice i goes here
    slice_rows = (source_rows[:, None] * num_cores + core).view(-1)         # row of `source` viewed [R * h, d / h]
    indices = torch.empty_like(position).scatter_(0, position, slice_rows)
    bag_weights = torch.empty(position.shape, dtype=source.dtype, device=source.device)
    bag_weights.scatter_(0, position, weights.t().to(source.dtype).reshape(-1))
    slices = source.contiguous().view(-1, source.shape[1] // num_cores)
    pooled = F.embedding_bag(indices, slices, offsets.view(-1), mode="sum", per_sample_weights=bag_weights)
    return pooled.view(num_keys, source.shape[1])


def rank_by_sort(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[M]: how many entries with the same key come before entry m, by a stable sort (any number of keys)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_keys)
    starts = counts.cumsum(0) - counts
    sorted_rank = torch.arange(keys.numel(), device=keys.device) - starts[sorted_keys]
    return torch.empty_like(keys).scatter_(0, order, sorted_rank)


def rank_by_block(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[T*K]: how many earlier k of the same token share block[t, k]; E running counts, cheaper than a sort."""
    rank = torch.zeros_like(blocks)
    for block in range(num_blocks):
        in_block = blocks == block
        rank += in_block * (in_block.cumsum(1) - 1)
    return rank.view(-1)


def entry_dot(table_rows: torch.Tensor, grad_rows: torch.Tensor, table: torch.Tensor, grad: torch.Tensor,
              num_cores: int, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """[h, M]: <table[table_rows[m], slice_i], grad[grad_rows[m], slice_i]> for each entry m and core slice i.

    Works through the entries in chunks whose gathered rows fit in cache, so nothing [M, d] is materialised.
    """
    num_entries, width = table_rows.numel(), table.shape[1]
    out = torch.empty(num_entries, num_cores, dtype=table.dtype, device=table.device)
    chunk = max(1, min(num_entries, chunk_bytes // (width * table.element_size())))
    table_buffer = table.new_empty(chunk, width)
    grad_buffer = grad.new_empty(chunk, width)
    for begin in range(0, num_entries, chunk):
        end = min(begin + chunk, num_entries)
        gathered = torch.index_select(table, 0, table_rows[begin:end], out=table_buffer[:end - begin])
        gathered.mul_(torch.index_select(grad, 0, grad_rows[begin:end], out=grad_buffer[:end - begin]))
        torch.sum(gathered.view(end - begin, num_cores, -1), dim=-1, out=out[begin:end])
    return out.t()


class FusedLookupReduce(torch.autograd.Function):
    """Autograd wrapper: saves only the indices, scores and table (no [T, K, d_v] activation)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                num_blocks: int) -> torch.Tensor:
        tokens = rows.shape[0]
        keys = bag_keys(blocks, num_blocks)
        ctx.save_for_backward(rows, keys, scores, table)
        # Detached, or embedding_bag takes its slower path that also records what its own backward needs.
        pooled = bag_sum(keys, tokens * num_blocks, rank_by_block(blocks, num_blocks), rows.reshape(-1),
                         scores.detach().reshape(scores.shape[0], -1), table.detach())
        return pooled.view(tokens, num_blocks, table.shape[1])

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor
                 ) -> Tuple[None, None, Optional[torch.Tensor], Optional[torch.Tensor], None]:
        rows, keys, scores, table = ctx.saved_tensors
        num_cores = scores.shape[0]
        flat_rows = rows.reshape(-1)
        grad_bags = grad_pooled.to(table.dtype).contiguous().view(-1, table.shape[1])   # [T*E, d_v]
        grad_scores = grad_table = None
        if ctx.needs_input_grad[2]:
            grad_scores = entry_dot(flat_rows, keys, table, grad_bags, num_cores)
            grad_scores = grad_scores.reshape(scores.shape).to(scores.dtype)
        if ctx.needs_input_grad[3]:
            num_rows = table.shape[0]
            grad_table = bag_sum(flat_rows, num_rows, rank_by_sort(flat_rows, num_rows), keys,
                                 scores.reshape(num_cores, -1), grad_bags)
        return None, None, grad_scores, grad_table, None


def bag_keys(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[T*K]: t*E + blocks[t, k], the output row of [T*E, d_v] that entry (t, k) pools into."""
    token = torch.arange(blocks.shape[0], device=blocks.device).unsqueeze(1)
    return (token * num_blocks + blocks).view(-1)


def fused_lookup_reduce(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                        num_blocks: int) -> torch.Tensor:
    """Same signature and semantics as `lookup_reduce_reference`; pooled is in the table's dtype."""
    check_lookup_reduce_inputs(rows, blocks, scores, table, num_blocks)
    return FusedLookupReduce.apply(rows, blocks, scores, table, num_blocks)


LOOKUP_REDUCE_IMPLS["fused"] = fused_lookup_reduce
