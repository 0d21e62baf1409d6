"""The few small collectives the trainer and the checkpointer need, named for what they decide."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (get_moe_layer_wise_logging_tracker,
                                                     reduce_aux_losses_tracker_across_ranks)


def is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _scalar(value: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")


def on_rank0(fn: Callable, *args) -> Any:
    """Run fn on global rank 0 and hand its result (or its exception) to every rank, so no rank hangs."""
    box: list = [None]
    if is_rank0():
        try:
            box[0] = ("ok", fn(*args))
        except Exception as err:  # re-raised on every rank below
            box[0] = ("error", err)
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank passes True."""
    if not torch.distributed.is_initialized():
        return flag
    value = _scalar(1.0 if flag else 0.0)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    torch.distributed.barrier()


def loss_on_every_rank(micro_batch_losses: Optional[list[torch.Tensor]], is_reporting_rank: bool) -> float:
    """The data-parallel mean of a global batch's micro-batch losses (known on the last pipeline stage), on every
    rank: averaged over DP there, then summed over the world from the one reporting rank."""
    value = _scalar(0.0)
    if micro_batch_losses and parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        value[0] = torch.stack([loss.double() for loss in micro_batch_losses]).mean()
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    if not is_reporting_rank:
        value.zero_()
    torch.distributed.all_reduce(value)
    return float(value[0])


def union_over_group(names: Iterable[str], group: torch.distributed.ProcessGroup) -> list[str]:
    """The sorted union of every rank's `names` in `group` (the same list on each of them)."""
    gathered: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, sorted(names), group=group)
    return sorted(set().union(*gathered))


def aux_losses_over_pipeline(num_layers: int) -> dict[str, float]:
    """Each auxiliary loss in Megatron's tracker, summed over layers and over the steps tracked since the tracker was
    last cleared. Megatron sums each loss's per-layer values over the pipeline group (and the groups the loss names),
    so every stage takes part, with zeros for the losses of layers it does not hold (a stage without memory or MoE
    layers tracks nothing), and in one order."""
    tracker = get_moe_layer_wise_logging_tracker()
    names = union_over_group(tracker, parallel_state.get_pipeline_model_parallel_group())
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    for name in names:
        tracker.setdefault(name, {"values": torch.zeros(num_layers, device=device)})
    reduce_aux_losses_tracker_across_ranks(names)
    return {name: float(tracker[name]["values"].sum()) for name in names}


def memory_health_over_ranks(layers: list[torch.nn.Module], num_placements: int) -> dict[str, float]:
    """`memory/layer{N}/{metric}` for every memory layer of the model (each transformer layer in `layers` carries one
    as `.memory`), over the tokens of every TP and DP rank, from all stages; resets the counters. Collective over the
    world: the values hit merged over each stage's TP x DP ranks (logical or), then one all-reduce of a
    [placements, layer number + `health_sums`] table, to which every rank adds its statistic sums and the first TP
    and DP rank of each stage the layer number and merged hit fraction, and one host read."""
    from umtrain.model.memory.layer import health_means

    merge_value_hits([layer.memory for layer in layers])
    reports = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    table = torch.zeros(num_placements, 5, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    for layer in layers:
        row = table[layer.memory.layer_index]
        sums = layer.memory.health_sums(reset=True)
        row[2:] = sums[1:]
        if reports:
            row[0], row[1] = layer.layer_number, sums[0]
    torch.distributed.all_reduce(table)
    return {f"memory/layer{int(number)}/{name}": value for number, *sums in table.tolist() if number
            for name, value in health_means(*sums).items()}


def merge_value_hits(memories: list[torch.nn.Module]) -> None:
    """Merge the memory layers' values-hit masks (logical or) over the ranks that run the same layers on other tokens
    (TP x DP of this pipeline stage: under sequence parallelism TP ranks see different tokens too), so that the one
    rank that reports them reports the whole batch. Every rank of the stage calls it, with its layers in the same
    order."""
    group = parallel_state.get_tensor_and_data_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return
    for memory in memories:
        hits = memory.value_hits.to(torch.uint8)
        torch.distributed.all_reduce(hits, op=torch.distributed.ReduceOp.MAX, group=group)
        memory.value_hits.copy_(hits.bool())
