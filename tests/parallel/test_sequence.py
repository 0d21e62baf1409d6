"""Memory layers on a sequence split over TP ranks (umtrain.parallel.sequence) against the whole sequence on one
process: the previous rank's tokens, the query conv across slice borders, and a whole memory layer (its output, its
input gradient, and its parameter gradients summed over the ranks, as Megatron sums `sequence_parallel` ones)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import tiny_config
from tests.parallel.distributed_helpers import run_on_ranks
from umtrain.config import config_from_dict
from umtrain.config.schema import MemoryConfig
from umtrain.model.memory import MemoryLayer
from umtrain.model.memory.conv import causal_depthwise_conv
from umtrain.ops.lookup_reduce import get_lookup_reduce
from umtrain.parallel.sequence import previous_tokens

MEMORY = MemoryConfig(num_values=1024, value_dim=32, key_dim=16, num_heads=2, topk=8, ive_expansion=4, tucker_rank=2,
                      num_cores=2, query_conv_kernel=4)
HIDDEN, BATCH = 32, 2


def whole_sequence(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input [S, B, D], loss weights of the same shape), the same on every process."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(seq, BATCH, HIDDEN, generator=g), torch.randn(seq, BATCH, HIDDEN, generator=g)


def make_layer(history=None) -> MemoryLayer:
    return MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=3, layer_index=0, lookup=get_lookup_reduce("reference"),
                       sequence_history=history)


def _conv_worker(rank: int, world: int, seq: int, kernel: int) -> tuple:
    x, weights = whole_sequence(seq)
    weight = torch.randn(HIDDEN, 1, kernel, generator=torch.Generator().manual_seed(1), requires_grad=True)
    local = x.chunk(world)[rank].clone().requires_grad_()
    history = previous_tokens(local, kernel - 1, dist.group.WORLD)
    out = causal_depthwise_conv(local, weight, history)
    (out * weights.chunk(world)[rank]).sum().backward()
    return out.detach(), local.grad, weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("world,seq,kernel", [(2, 8, 3), (3, 6, 3)])
def test_query_conv_over_slices_equals_the_whole_sequence(world, seq, kernel):
    """(3, 6, 3): each slice is exactly as long as the history it hands on."""
    results = run_on_ranks(_conv_worker, world, seq, kernel)
    x, weights = whole_sequence(seq)
    x.requires_grad_()
    weight = torch.randn(HIDDEN, 1, kernel, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = causal_depthwise_conv(x, weight)
    (out * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r[0] for r in results]), out.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(sum(r[2] for r in results), weight.grad, rtol=1e-6, atol=1e-6)


def test_previous_tokens_refuses_a_history_longer_than_the_slice():
    with pytest.raises(ValueError, match="3 previous tokens asked of a slice of 2 tokens"):
        previous_tokens(torch.zeros(2, 1, 4), 3, group=None)


def _layer_worker(rank: int, world: int, seq: int) -> tuple:
    x, weights = whole_sequence(seq)
    layer = make_layer(lambda tokens, count: previous_tokens(tokens, count, dist.group.WORLD))
    local = x.chunk(world)[rank].clone().requires_grad_()
    (layer(local) * weights.chunk(world)[rank]).sum().backward()
    return layer(local).detach(), local.grad, {name: p.grad for name, p in layer.named_parameters()}


@pytest.mark.slow
def test_memory_layer_over_slices_equals_the_whole_sequence():
    world, seq = 2, 12
    results = run_on_ranks(_layer_worker, world, seq)
    x, weights = whole_sequence(seq)
    x.requires_grad_()
    layer = make_layer()
    out = layer(x)
    (out * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r[0] for r in results]), out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x.grad, rtol=1e-5, atol=1e-6)
    for name, param in layer.named_parameters():
        summed = sum(r[2][name] for r in results)
        torch.testing.assert_close(summed, param.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def _dense_then_memory_trainer(rank: int, world: int) -> float:
    """Two Trainers in one process on one Megatron parallel state (benchmarks/memory_overlap.py builds its variants
    so), the dense one first: the memory one must still get its sequence group."""
    from umtrain.train.trainer import Trainer

    parallel = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    Trainer(config_from_dict(tiny_config(parallel=parallel), world_size=world))
    memory = tiny_config(parallel=parallel)
    memory["model"].update(family="ultramem", memory={"placements": ["1:2"], "num_values": 1024, "value_dim": 32,
                                                      "key_dim": 16, "topk": 4, "lookup_impl": "reference"})
    trainer = Trainer(config_from_dict(memory, world_size=world))
    trainer.train_step()
    return trainer._aux_losses(steps=1)["aux_loss"]


@pytest.mark.slow
def test_a_memory_trainer_after_a_dense_one_gets_its_sequence_group():
    aux_losses = run_on_ranks(_dense_then_memory_trainer, 2)
    assert aux_losses[0] == aux_losses[1] > 0
