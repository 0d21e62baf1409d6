"""Triton lookup-reduce for the GPU (spec §5 "Fused lookup-reduce"); on CPU only under TRITON_INTERPRET=1.

One program per (token, core slice[, d block]) loads the token's K rows' slice once and pools them into the E
virtual blocks in fp32 registers; the [T, K, d_v] gathered tensor never exists. Tables may be bf16 (CUDA's
`embedding_bag` has no bf16 backward with per-sample weights): loads are upcast, sums and the table's gradient
accumulate in fp32 (atomic adds into an fp32 buffer, so the table gradient's summation order is not fixed).
Calls beyond what one program per token takes (more than MAX_KERNEL_K entries per token or MAX_KERNEL_BLOCKS blocks:
number-wise sharding's owner-side pooling) pool entry by entry, each weighted row then added into its slot.

Imported only when asked for (`get_lookup_reduce("triton")`), so CPU paths never import Triton.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from umtrain.ops.lookup_reduce import (LOOKUP_REDUCE_IMPLS, check_lookup_reduce_inputs, main_grad_to_accumulate,
                                       table_grad_in_main_grad, triton_runs_on)

MAX_BLOCK_D = 64
"""Columns per program; with BLOCK_K = next_pow2(K) <= 128 the [BLOCK_K, BLOCK_D] fp32 tile stays in registers."""
MAX_KERNEL_K = 4096
"""Entries one program pools per token ([BLOCK_K, BLOCK_D] tile: Triton refuses tiles of over 2**20 elements)."""
MAX_KERNEL_BLOCKS = 64
"""Virtual blocks one program pools into (a loop unrolled at compile time)."""


@triton.jit
def _load_entries(rows_ptr, blocks_ptr, scores_ptr, token, core, tokens, k, missing_block, BLOCK_K: tl.constexpr):
    """One token's K (row, block, score-of-this-core) entries, padded to BLOCK_K (padding: row 0, score 0), with
    their positions and mask."""
    entry = tl.arange(0, BLOCK_K)
    entry_mask = entry < k
    rows = tl.load(rows_ptr + token * k + entry, mask=entry_mask, other=0)
    blocks = tl.load(blocks_ptr + token * k + entry, mask=entry_mask, other=missing_block)
    scores = tl.load(scores_ptr + (core * tokens + token) * k + entry, mask=entry_mask, other=0.0).to(tl.float32)
    return entry, entry_mask, rows, blocks, scores


@triton.jit
def _forward_kernel(rows_ptr, blocks_ptr, scores_ptr, table_ptr, pooled_ptr, tokens, k, d_v, slice_width,
                    NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """pooled[t, p, slice_i] = sum_{k: blocks[t,k]=p} scores[i,t,k] * table[rows[t,k], slice_i] (eqs. 15, 17)."""
    token = tl.program_id(0).to(tl.int64)
    core = tl.program_id(1)
    entry, entry_mask, rows, blocks, scores = _load_entries(rows_ptr, blocks_ptr, scores_ptr, token, core, tokens, k,
                                                     NUM_BLOCKS, BLOCK_K)
    column = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    column_mask = column < slice_width
    column += core * slice_width
    tile_mask = entry_mask[:, None] & column_mask[None, :]
    values = tl.load(table_ptr + rows[:, None] * d_v + column[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    for block in tl.static_range(NUM_BLOCKS):
        weight = tl.where(blocks == block, scores, 0.0)
        pooled = tl.sum(weight[:, None] * values, axis=0)
        tl.store(pooled_ptr + (token * NUM_BLOCKS + block) * d_v + column,
                 pooled.to(pooled_ptr.dtype.element_ty), mask=column_mask)


@triton.jit
def _backward_kernel(rows_ptr, blocks_ptr, scores_ptr, table_ptr, grad_pooled_ptr, grad_scores_ptr, grad_table_ptr,
                     tokens, k, d_v, slice_width, NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, SCORE_GRAD: tl.constexpr, TABLE_GRAD: tl.constexpr):
    """grad_scores[i,t,k] = <g[t, p_k, slice_i], table[row_k, slice_i]>; grad_table[row_k, slice_i] += s * g."""
    token = tl.program_id(0).to(tl.int64)
    core = tl.program_id(1)
    entry, entry_mask, rows, blocks, scores = _load_entries(rows_ptr, blocks_ptr, scores_ptr, token, core, tokens, k,
                                                     0, BLOCK_K)
    grad_rows = token * NUM_BLOCKS + blocks
    score_grad = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, slice_width, BLOCK_D):
        column = start + tl.arange(0, BLOCK_D)
        tile_mask = entry_mask[:, None] & (column < slice_width)[None, :]
        column += core * slice_width
        grads = tl.load(grad_pooled_ptr + grad_rows[:, None] * d_v + column[None, :], mask=tile_mask,
                        other=0.0).to(tl.float32)
        if SCORE_GRAD:
            values = tl.load(table_ptr + rows[:, None] * d_v + column[None, :], mask=tile_mask,
                             other=0.0).to(tl.float32)
            score_grad += tl.sum(values * grads, axis=1)
        if TABLE_GRAD:
            tl.atomic_add(grad_table_ptr + rows[:, None] * d_v + column[None, :], scores[:, None] * grads,
                          mask=tile_mask)
    if SCORE_GRAD:
        tl.store(grad_scores_ptr + (core * tokens + token) * k + entry, score_grad, mask=entry_mask)


def _tile_sizes(k: int, slice_width: int) -> Tuple[int, int]:
    return triton.next_power_of_2(k), min(MAX_BLOCK_D, triton.next_power_of_2(slice_width))


class TritonLookupReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                num_blocks: int) -> torch.Tensor:
        rows, blocks, scores, table = (x.contiguous() for x in (rows, blocks, scores, table))
        ctx.save_for_backward(rows, blocks, scores, table)
        ctx.num_blocks = num_blocks
        num_cores, (tokens, k), d_v = scores.shape[0], rows.shape, table.shape[1]
        pooled = table.new_empty(tokens, num_blocks, d_v)
        if tokens == 0:
            return pooled
        slice_width = d_v // num_cores
        block_k, block_d = _tile_sizes(k, slice_width)
        grid = (tokens, num_cores, triton.cdiv(slice_width, block_d))
        _forward_kernel[grid](rows, blocks, scores, table, pooled, tokens, k, d_v, slice_width,
                              NUM_BLOCKS=num_blocks, BLOCK_K=block_k, BLOCK_D=block_d)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor
                 ) -> Tuple[None, None, Optional[torch.Tensor], Optional[torch.Tensor], None]:
        rows, blocks, scores, table = ctx.saved_tensors
        want_scores, want_table = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        num_cores, (tokens, k), d_v = scores.shape[0], rows.shape, table.shape[1]
        main_grad = main_grad_to_accumulate(table) if want_table else None
        # fp32 accumulators (the table's: Megatron's main gradient when it has one); a gradient not asked for gets
        # a placeholder the kernel never touches.
        grad_scores = scores.new_zeros(scores.shape, dtype=torch.float32) if want_scores else scores
        if main_grad is not None:
            grad_table = main_grad
        else:
            grad_table = table.new_zeros(table.shape, dtype=torch.float32) if want_table else table
        if tokens and (want_scores or want_table):
            slice_width = d_v // num_cores
            block_k, block_d = _tile_sizes(k, slice_width)
            _backward_kernel[(tokens, num_cores)](
                rows, blocks, scores, table, grad_pooled.contiguous(), grad_scores, grad_table, tokens, k, d_v,
                slice_width, NUM_BLOCKS=ctx.num_blocks, BLOCK_K=block_k, BLOCK_D=block_d,
                SCORE_GRAD=want_scores, TABLE_GRAD=want_table)
        if main_grad is not None:
            grad_table = table_grad_in_main_grad(table)
        return (None, None, grad_scores.to(scores.dtype) if want_scores else None,
                grad_table.to(table.dtype) if want_table else None, None)


def _pool_entry_by_entry(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                         num_blocks: int) -> torch.Tensor:
    """For rows longer or blocks more numerous than one program per token takes (number-wise sharding's owner-side
    pooling: one 'token' of every request the owner received, a block per (source token, IVE block) of the group):
    every entry a token of its own, its weighted row then added into its (token, block) slot in fp32."""
    tokens, k = rows.shape
    d_v = table.shape[1]
    weighted = TritonLookupReduce.apply(rows.reshape(-1, 1), torch.zeros_like(rows).view(-1, 1),
                                        scores.reshape(scores.shape[0], -1, 1), table, 1)      # [T*K, 1, d_v]
    slots = torch.arange(tokens, device=rows.device).repeat_interleave(k) * num_blocks + blocks.reshape(-1)
    pooled = torch.zeros(tokens * num_blocks, d_v, dtype=torch.float32, device=table.device)
    pooled = pooled.index_add(0, slots, weighted.view(-1, d_v).float())
    return pooled.to(table.dtype).view(tokens, num_blocks, d_v)


def triton_lookup_reduce(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                         num_blocks: int) -> torch.Tensor:
    """Same signature and semantics as `lookup_reduce_reference`; pooled is in the table's dtype."""
    check_lookup_reduce_inputs(rows, blocks, scores, table, num_blocks)
    if not triton_runs_on(table.device.type):
        raise ValueError(f"model.memory.lookup_impl: 'triton' runs on GPU, but the table is on {table.device} "
                         f"(use 'fused' on CPU, or set TRITON_INTERPRET=1 to interpret the kernels)")
    if rows.shape[1] > MAX_KERNEL_K or num_blocks > MAX_KERNEL_BLOCKS:
        return _pool_entry_by_entry(rows, blocks, scores, table, num_blocks)
    return TritonLookupReduce.apply(rows, blocks, scores, table, num_blocks)


LOOKUP_REDUCE_IMPLS["triton"] = triton_lookup_reduce
