"""Memory layers on a sequence split over tensor-parallel ranks (sequence parallelism).

Memory-layer parameters are not TP-sharded. Under sequence parallelism the residual stream holds 1/TP of the
sequence, and each memory layer runs on this rank's slice only: its lookups, their communication and its dense
work shrink by TP instead of being repeated on every TP rank. Three things make that equal to the whole-sequence
layer:
- the causal query convolution reads the k-1 tokens before the slice from the previous TP rank (`previous_tokens`,
  over a copy of the TP group of its own, since a memory layer may run on a worker thread beside the main thread's
  TP collectives);
- the layer's parameters get gradients from this rank's tokens only, so they are tagged `sequence_parallel` and
  Megatron's `finalize_model_grads` sums them over the TP group (`mark_memory_parameters` in memory_tables);
- the TDQKR auxiliary loss (eq. 12) depends on parameters only: each TP rank adds 1/TP of it, and that sum restores
  it once.
Without sequence parallelism every TP rank holds the whole sequence and runs the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

SequenceHistory = Callable[[torch.Tensor, int], torch.Tensor]
"""(x [S, B, D], n) -> the n tokens before x's first one, [n, B, D] (zeros before the sequence start)."""

_MEMORY_SEQUENCE_GROUP: Optional[dist.ProcessGroup] = None


@dataclass(frozen=True)
class MemorySequenceSplit:
    """What a memory layer needs to know about the sequence split (see the module docstring)."""

    aux_loss_scale: float = 1.0
    history: Optional[SequenceHistory] = None


def memory_sequence_split(sequence_parallel: bool) -> MemorySequenceSplit:
    if not sequence_parallel:
        return MemorySequenceSplit()
    group = memory_sequence_group()
    return MemorySequenceSplit(aux_loss_scale=1.0 / dist.get_world_size(group),
                               history=lambda x, count: previous_tokens(x, count, group))


def ensure_memory_sequence_group(timeout: timedelta) -> None:
    """Create, on every rank (a collective over the world), one more process group per TP group for the memory
    layers' sequence exchanges, unless this rank has one over its current TP ranks already. Call after Megatron's
    parallel state is initialised, on every rank alike."""
    global _MEMORY_SEQUENCE_GROUP
    mine = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    current = _MEMORY_SEQUENCE_GROUP is not None and dist.get_process_group_ranks(_MEMORY_SEQUENCE_GROUP) == mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (current, mine))
    if all(is_current for is_current, _ in everyone):
        return
    for ranks in sorted({tuple(tp_ranks) for _, tp_ranks in everyone}):
        group = dist.new_group(list(ranks), timeout=timeout)
        if dist.get_rank() in ranks:
            _MEMORY_SEQUENCE_GROUP = group


def memory_sequence_group() -> dist.ProcessGroup:
    if _MEMORY_SEQUENCE_GROUP is None:
        raise RuntimeError("memory layers under sequence parallelism need ensure_memory_sequence_group() first")
    return _MEMORY_SEQUENCE_GROUP


def destroy_memory_sequence_group() -> None:
    global _MEMORY_SEQUENCE_GROUP
    _MEMORY_SEQUENCE_GROUP = None


def previous_tokens(x: torch.Tensor, count: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The `count` tokens before this rank's slice x [S_local, B, D] of a sequence split in rank order over `group`
    (zeros on the first rank); the backward sends their gradient back to the previous rank. Needs S_local >= count
    (checked at config load).

    One all-gather of every rank's last `count` tokens, not a send/receive shift: it moves TP-1 times the tokens a
    shift would, but those are k-1 = 4 tokens per sequence (a few hundred KiB per layer at TP = 8), latency-bound
    either way, and a single collective cannot deadlock on the order of sends and receives."""
    if count > x.shape[0]:
        raise ValueError(f"{count} previous tokens asked of a slice of {x.shape[0]} tokens")
    return _PreviousTokens.apply(x, count, group)


class _PreviousTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, count: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.count, ctx.length = group, count, x.shape[0]
        tails = _all_gather(x[x.shape[0] - count:], group)
        rank = dist.get_rank(group)
        return tails[rank - 1] if rank > 0 else torch.zeros_like(tails[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = _all_gather(grad, ctx.group)
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grad_x = grad.new_zeros((ctx.length, *grad.shape[1:]))
        if rank + 1 < size:
            grad_x[ctx.length - ctx.count:] = grads[rank + 1]
        return grad_x, None, None


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return parts
