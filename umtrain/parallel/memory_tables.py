"""Memory-layer value tables in the trainer: which lookup each layer uses, and how its shard is checkpointed.

The memory-parallel group is Megatron-Core's expert-parallel group (P = parallel.expert_model_parallel_size), so
DDP and the distributed optimizer treat table shards like expert weights: reduced over the expert-data-parallel
group only (`param.allreduce = False`, kept at P = 1 too so the optimizer has the same structure at every P).
Memory layers are replicated across tensor-parallel ranks: each TP rank looks up all of its tokens, and the
expert-parallel groups run across data-parallel ranks of equal TP rank.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from umtrain.config import Config
from umtrain.ops import get_lookup_reduce
from umtrain.parallel.cost_model import DEFAULT_CALIBRATION, Calibration, plan_config
from umtrain.parallel.memory_sharding import ShardedLookup, lookup_from_plan, mark_table_shard

TABLE_PARAM = "values"


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
    """Raise if a fixed-capacity lookup overflowed since the last check (reads a device flag: call it where the
    host synchronises anyway, e.g. when the loss is logged)."""
    for memory in memories:
        check = getattr(memory.lookup, "check_overflow", None)
        if check is not None:
            check()


def mark_memory_tables(memories: list[torch.nn.Module]) -> None:
    for memory in memories:
        mark_table_shard(getattr(memory, TABLE_PARAM))


def table_sharded_tensor(key: str, table: torch.Tensor, lookup: Optional[ShardedLookup]) -> ShardedTensor:
    """The checkpoint view of one table shard: its place in the full [N, d_v] table, replicated across TP ranks
    and expert-data-parallel ranks, so a table saved over P ranks loads over P' ranks."""
    replica_id = (0, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_data_parallel_rank())
    if lookup is None or lookup.size == 1:
        return ShardedTensor.from_rank_offsets(key, table, replica_id=replica_id)
    return ShardedTensor.from_rank_offsets(key, table, (lookup.shard_axis, lookup.rank, lookup.size),
                                           replica_id=replica_id)
