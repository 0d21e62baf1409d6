"""Apply parallelism from outside the model: what the memory layers are handed (their lookups over the
memory-parallel group, the sequence split, the overlap runner), and Megatron-Core DDP around every model chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer import TransformerConfig

from umtrain.config import Config
from umtrain.parallel.memory_tables import finalize_model_grads_with_tables, memory_lookup_factory
from umtrain.parallel.overlap import StreamRunner, SyncRunner, memory_runner
from umtrain.parallel.sequence import MemorySequenceSplit, memory_sequence_split


@dataclass(frozen=True)
class MemoryLayerParallelism:
    """What the layout hands the model's memory layers. The defaults are one process: every table whole, the lookup
    of `model.memory.lookup_impl`, no sequence split, no overlap."""

    lookup_factory: Optional[Callable[[int], tuple[Callable, Optional[tuple[int, int]]]]] = None
    """placement index -> (lookup-reduce over this rank's memory-parallel group, local table shape)."""
    split: MemorySequenceSplit = MemorySequenceSplit()
    runner: Any = field(default_factory=SyncRunner)


def memory_layer_parallelism(config: Config) -> MemoryLayerParallelism:
    """Call on every rank once the process groups exist (the sequence split uses the memory layers' TP group)."""
    if not config.model.has_memory:
        return MemoryLayerParallelism()
    p = config.parallel
    return MemoryLayerParallelism(
        lookup_factory=memory_lookup_factory(config),
        split=memory_sequence_split(p.sequence_parallel),
        runner=memory_runner(config.model.memory.overlap, p.overlap_grad_reduce, p.overlap_param_gather))


def mark_expert_parameters(chunk: torch.nn.Module) -> None:
    """Flag the MoE experts' weights expert-parallel (`allreduce = False`) at every expert-parallel size.

    Megatron flags them only when EP > 1. The optimizer then changes structure with EP (one optimizer at EP 1, a
    dense and an expert one chained above), and a checkpoint's optimizer state saved at one EP does not load at
    another. At EP 1 the expert-data-parallel group is the data-parallel group, so nothing else changes (the memory
    tables are flagged the same way at every memory-parallel size)."""
    for module in chunk.modules():
        if getattr(module, "is_expert", False):
            for param in module.parameters(recurse=False):
                param.allreduce = False


def wrap_data_parallel(config: Config, tconfig: TransformerConfig, chunks: list) -> list[DistributedDataParallel]:
    p = config.parallel
    if not p.overlap_grad_reduce:
        adopt_memory_gradient_accumulators(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    tconfig.finalize_model_grads_func = finalize_model_grads_with_tables
    if p.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        tconfig.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if p.overlap_param_gather:
        param_sync = [chunk.start_param_sync for chunk in wrapped]
        tconfig.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    return wrapped


def adopt_memory_gradient_accumulators(chunks: list) -> None:
    """A side-stream memory runner makes its memory layers' gradient accumulators (`StreamRunner.adopt_parameters`)
    before DDP makes them on the default stream and keeps them; after any dtype cast (Float16Module), which would
    discard accumulators made earlier. Not with `overlap_grad_reduce`: DDP's gradient hook then starts a bucket's
    reduction from the stream its last gradient arrived on, and a bucket that mixes memory and other parameters
    would be reduced on the side stream without waiting for the default stream's gradients."""
    for chunk in chunks:
        for module in chunk.modules():
            runner = getattr(getattr(module, "skip_bus", None), "runner", None)
            memory = getattr(module, "memory", None)
            if isinstance(runner, StreamRunner) and memory is not None:
                runner.adopt_parameters(memory.parameters())
