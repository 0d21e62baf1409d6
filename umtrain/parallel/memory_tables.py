"""Memory-layer value tables in the trainer: which lookup each layer uses, how its shard is checkpointed, and the flags
Megatron's gradient reduction reads from memory parameters.

The memory-parallel group is Megatron-Core's expert-parallel group (P = parallel.expert_model_parallel_size), so
DDP and the distributed optimizer treat table shards like expert weights: reduced over the expert-data-parallel
group only (`param.allreduce = False`, kept at P = 1 too so the optimizer has the same structure at every P).
With `parallel.memory_parallel_group: data` the expert-parallel groups run across data-parallel ranks of equal TP rank
(each TP rank holds a replica of its group's shards); with `tensor_data` (expert TP size 1) they take consecutive
ranks in TP-then-DP order, so TP ranks hold different shards.

Which tokens a TP rank looks up decides the rest (`mark_memory_parameters`):
- without sequence parallelism every TP rank looks up all its tokens. Under `tensor_data` a shard's
  expert-data-parallel group then holds TP peers that looked up the same tokens: DDP would sum TP copies of each
  token's gradient, so the shards' gradients are scaled by 1/TP;
- under sequence parallelism each TP rank looks up its 1/TP of the sequence (umtrain.parallel.sequence). The memory
  layer's dense parameters are tagged `sequence_parallel`: Megatron's `finalize_model_grads` sums them over TP.
  Under `tensor_data` a shard's expert-data-parallel group already sums every token once. Under `data` TP peers
  fill replicas of one shard from different tokens: `finalize_model_grads_with_tables` sums those over TP, in place
  (Megatron's sum of `sequence_parallel` gradients would copy them all into one flat buffer first, a second copy
  of every table's gradient).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import finalize_model_grads
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from umtrain.config import Config
from umtrain.ops import get_lookup_reduce
from umtrain.parallel.cost_model import DEFAULT_CALIBRATION, Calibration, plan_config, table_gradient_tp_sum_bytes
from umtrain.parallel.collectives import any_rank
from umtrain.parallel.memory_sharding import ShardedLookup, lookup_from_plan, mark_table_shard, overflow_message

TABLE_PARAM = "values"
logger = logging.getLogger(__name__)


def memory_lookup_factory(config: Config):
    """placement index -> (lookup-reduce over this rank's memory-parallel group, local table shape)."""
    path = config.parallel.comm_calibration
    calibration = Calibration.load(path) if path else DEFAULT_CALIBRATION
    plans = plan_config(config, calibration)
    memory = config.model.memory
    group = parallel_state.get_expert_model_parallel_group()
    local_impl = get_lookup_reduce(memory.lookup_impl)

    def factory(index: int):
        lookup = lookup_from_plan(plans[index], group, memory.num_values, memory.value_dim, local_impl,
                                  num_cores=memory.num_cores)
        return lookup, lookup.local_table_shape()

    return factory


def check_table_overflow(memories: list[torch.nn.Module]) -> None:
    """Collective over every rank: raise on all of them if a fixed-capacity lookup of any rank overflowed since the
    last check (each reads a device flag: call it where the host synchronises anyway, e.g. when the loss is logged,
    and before anything is saved from the step's weights)."""
    overflowed = [memory.lookup.take_overflow() for memory in memories if hasattr(memory.lookup, "take_overflow")]
    if any_rank(any(overflowed)):
        raise RuntimeError(overflow_message())


TABLE_GRAD_TP_SUM = "umtrain_sum_grad_over_tp"
"""Set on table shards whose gradient `finalize_model_grads_with_tables` sums over TP."""


def mark_memory_parameters(memories: list[torch.nn.Module], config: Config) -> None:
    """Flag the table shards as expert-parallel parameters, and set what the module docstring describes. When the
    memory-parallel groups span TP ranks (`tensor_data`: expert TP size 1), TP peers hold different shards or are
    expert-data-parallel peers (P < TP): the shards are then marked TP-parallel, so that the clipping norm counts
    each rank's shard (Megatron skips the non-TP-parallel parameters of TP ranks other than 0)."""
    p = config.parallel
    groups_span_tp = p.tensor_model_parallel_size > 1 and p.memory_parallel_group == "tensor_data"
    for memory in memories:
        table = mark_table_shard(getattr(memory, TABLE_PARAM))
        if groups_span_tp:
            tensor_parallel.set_tensor_model_parallel_attributes(table, True, 0, 1)
        if p.sequence_parallel:
            for param in memory.parameters():
                if param is not table:
                    param.sequence_parallel = True
            setattr(table, TABLE_GRAD_TP_SUM, table_gradient_tp_sum_bytes(config) > 0)
        elif groups_span_tp:
            copies = p.tensor_model_parallel_size
            table.register_hook(lambda grad: grad / copies)
    if memories and table_gradient_tp_sum_bytes(config):
        logger.warning("sequence parallel with memory_parallel_group data: every step also all-reduces each memory "
                       "layer's table-shard gradient (%.2f GB) over TP=%d; memory_parallel_group: tensor_data holds "
                       "1/P of each table per rank without it", table_gradient_tp_sum_bytes(config) / 1e9,
                       p.tensor_model_parallel_size)


def finalize_model_grads_with_tables(model: list[torch.nn.Module], *args, **kwargs) -> None:
    """Megatron's `finalize_model_grads` (DP reduction, then the TP sums it knows), then the in-place TP sum of the
    table shards marked `TABLE_GRAD_TP_SUM`."""
    finalize_model_grads(model, *args, **kwargs)
    group = parallel_state.get_tensor_model_parallel_group()
    for chunk in model:
        for param in chunk.parameters():
            if getattr(param, TABLE_GRAD_TP_SUM, False):
                torch.distributed.all_reduce(param.main_grad, group=group)


def table_replicated_across_tp() -> bool:
    """Whether TP peers hold the same table shards (expert TP size = TP: memory_parallel_group data), rather than
    different shards or copies that are expert-data-parallel peers (expert TP size 1: tensor_data)."""
    return parallel_state.get_expert_tensor_parallel_world_size() > 1


def table_sharded_tensor(key: str, table: torch.Tensor, lookup: Optional[ShardedLookup]) -> ShardedTensor:
    """The checkpoint view of one table shard: its place in the full [N, d_v] table, replicated across TP ranks
    (memory_parallel_group data) and expert-data-parallel ranks, so a table saved over P ranks loads over P' ranks."""
    tp_replica = parallel_state.get_tensor_model_parallel_rank() if table_replicated_across_tp() else 0
    replica_id = (0, tp_replica, parallel_state.get_expert_data_parallel_rank())
    if lookup is None or lookup.size == 1:
        return ShardedTensor.from_rank_offsets(key, table, replica_id=replica_id)
    return ShardedTensor.from_rank_offsets(key, table, (lookup.shard_axis, lookup.rank, lookup.size),
                                           replica_id=replica_id)
