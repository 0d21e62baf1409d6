"""The lookup-reduce: the one interface between a memory layer and its value table.

    pooled[t, p, slice_i] = sum_k [blocks[t, k] == p] * scores[i, t, k] * table[rows[t, k], slice_i]

rows, blocks: [T, K] int64 (physical row of each selected value, and its IVE virtual block in [0, E));
scores: [h, T, K] (one score per MCS core; core i weights the i-th of h equal slices of d_v);
table: [N, d_v]; returns pooled [T, E, d_v] (eq. 15 of the paper before the projection, eq. 17 for MCS).

Every implementation (the reference here, the fused CPU one, the Triton kernel, the sharded tables of
`umtrain.parallel.memory_sharding`) has exactly this signature and these semantics, so the layer is written
against this interface only.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from umtrain.config.base import ConfigError

LookupReduce = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def lookup_reduce_reference(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                            num_blocks: int) -> torch.Tensor:
    """Gather [T, K, d_v], weight per core slice, scatter-add into blocks. Plain autograd; O(T K d_v) memory."""
    num_cores = scores.shape[0]
    tokens, k = rows.shape
    gathered = table[rows]                                              # [T, K, d_v]
    gathered = gathered.view(tokens, k, num_cores, table.shape[1] // num_cores)  # [T, K, h, d_v/h]
    weighted = gathered * scores.permute(1, 2, 0).unsqueeze(-1)         # [T, K, h, d_v/h]
    weighted = weighted.reshape(tokens, k, -1)
    pooled = weighted.new_zeros(tokens, num_blocks, weighted.shape[-1])
    index = blocks.unsqueeze(-1).expand_as(weighted)
    return pooled.scatter_add(1, index, weighted)


def check_lookup_reduce_inputs(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                               num_blocks: int) -> None:
    """Raise ValueError naming the bad argument. Index ranges are checked on CPU tensors only (one min/max pass);
    on a GPU that check would cost a device-to-host synchronisation per memory layer."""
    if rows.dtype != torch.int64 or blocks.dtype != torch.int64:
        raise ValueError(f"rows and blocks must be int64, got rows {rows.dtype}, blocks {blocks.dtype}")
    check_lookup_shapes(rows, blocks, scores)
    if table.dim() != 2:
        raise ValueError(f"table must be [N, d_v], got {tuple(table.shape)}")
    if scores.shape[0] < 1 or table.shape[1] % scores.shape[0]:
        raise ValueError(f"table's d_v={table.shape[1]} must split into h={scores.shape[0]} equal core slices")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if rows.numel() and rows.device.type == "cpu":
        _check_range("rows", rows, table.shape[0])
        _check_range("blocks", blocks, num_blocks)


def check_lookup_shapes(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor) -> None:
    if rows.dim() != 2 or blocks.shape != rows.shape:
        raise ValueError(f"rows and blocks must both be [T, K], got rows {tuple(rows.shape)}, "
                         f"blocks {tuple(blocks.shape)}")
    if scores.dim() != 3 or scores.shape[1:] != rows.shape:
        raise ValueError(f"scores must be [h, T, K] = [h, {rows.shape[0]}, {rows.shape[1]}], "
                         f"got {tuple(scores.shape)}")


def _check_range(name: str, index: torch.Tensor, size: int) -> None:
    low, high = torch.aminmax(index)
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{int(low)}, {int(high)}]")


LOOKUP_REDUCE_IMPLS: Dict[str, LookupReduce] = {"reference": lookup_reduce_reference}


def main_grad_to_accumulate(table: torch.Tensor) -> Optional[torch.Tensor]:
    """The fp32 main gradient Megatron's DDP keeps for the table parameter, when a backward may add the table's
    gradient into it and return `table_grad_in_main_grad(table)`, as Megatron's own layers do with gradient
    accumulation fusion: no fp32 gradient buffer is then zeroed, cast to the table's dtype and added again by DDP's
    hook (2.5 GB of fp32 for one 1.2 M x 512 table, per micro-batch). None for any other table, and for one with a
    gradient hook (the 1/TP of `parallel.memory_tables` would see only the placeholder).

    DDP then drops every gradient of the table until its next `zero_grad_buffer`, so within a step all of them
    must come this way: a run's lookup is fixed, and an empty lookup's gradient is zero."""
    main_grad = getattr(table, "main_grad", None)
    if (main_grad is None or not hasattr(table, "grad_added_to_main_grad") or getattr(table, "zero_out_wgrad", False)
            or table._backward_hooks or main_grad.dtype != torch.float32 or main_grad.shape != table.shape
            or not main_grad.is_contiguous()):
        return None
    return main_grad


def table_grad_in_main_grad(table: torch.Tensor) -> torch.Tensor:
    """What a backward returns for the table once it has added the gradient into `main_grad`: a placeholder in the
    table's dtype, allocated but never written, that Megatron's DDP hook drops on seeing `grad_added_to_main_grad`."""
    table.grad_added_to_main_grad = True
    return torch.empty_like(table)


def triton_runs_on(device_type: str) -> bool:
    """Triton kernels run on a GPU, or on CPU tensors under its interpreter (how CI tests them)."""
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_can_run() -> None:
    """Refuse `triton` on a machine that cannot run it when the model is built, not at its first forward."""
    if not triton_runs_on("cuda" if torch.cuda.is_available() else "cpu"):
        raise ConfigError("model.memory.lookup_impl", "'triton' runs on GPU, and this machine has none (use 'fused' "
                                                      "on CPU, or set TRITON_INTERPRET=1 to interpret the kernels)")


def lookup_reduce_auto(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                       num_blocks: int) -> torch.Tensor:
    """The Triton kernel for a CUDA table, the fused CPU one otherwise, chosen per call: a model built with
    `lookup_impl: auto` runs wherever its table is moved (a portable checkpoint decodes on CPU on a GPU machine)."""
    name = "triton" if table.is_cuda else "fused"
    impl = LOOKUP_REDUCE_IMPLS.get(name) or get_lookup_reduce(name)
    return impl(rows, blocks, scores, table, num_blocks)


def get_lookup_reduce(name: str) -> LookupReduce:
    """The implementation registered under `name` (fused and Triton ones register on import, when first asked
    for); "auto" picks per call on the table's device (`lookup_reduce_auto`)."""
    if name == "auto":
        return lookup_reduce_auto
    if name == "fused":
        import umtrain.ops.fused_lookup_reduce  # noqa: F401  (registers "fused")
    if name == "triton":
        check_triton_can_run()
        import umtrain.ops.triton_lookup_reduce  # noqa: F401  (registers "triton")
    if name not in LOOKUP_REDUCE_IMPLS:
        raise KeyError(f"no lookup-reduce implementation named {name!r}; have {sorted(LOOKUP_REDUCE_IMPLS)}")
    return LOOKUP_REDUCE_IMPLS[name]
