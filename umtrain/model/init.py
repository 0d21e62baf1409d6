"""Layout-independent weight initialisation.

Megatron's own init draws differ between pipeline layouts (layer offsets change the draw order), so losses of
(TP, PP, DP) layouts could not be compared. Here every parameter is identified by its global checkpoint key
(from `sharded_state_dict`, which already knows layer offsets, TP/EP shards and tied weights); the full tensor is
drawn from a generator seeded by (seed, key), and each rank keeps its slice. Any layout therefore starts from the
same global weights.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
NORM_WEIGHTS = ("layer_norm_weight", "layernorm.weight", "norm.weight")


def key_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def megatron_initial_value(key: str, shape: tuple[int, ...], generator: torch.Generator, std: float,
                           num_layers: int) -> torch.Tensor:
    """Megatron's scheme: N(0, std) weights, N(0, std/sqrt(2L)) output projections, zero biases, unit norms."""
    if key.endswith("bias"):
        return torch.zeros(shape)
    if any(key.endswith(s) for s in NORM_WEIGHTS) or ".layer_norm_weight" in key:
        return torch.ones(shape)
    if key.endswith(OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=generator) * std


def _sharded_tensors(model: torch.nn.Module) -> Iterable[ShardedTensor]:
    sharded, _ = extract_sharded_tensors(model.sharded_state_dict())
    for _, tensor in sorted(sharded.items()):
        yield tensor


def _local_slice(tensor: ShardedTensor) -> tuple[slice, ...]:
    offsets = tensor.global_offset[tensor.prepend_axis_num:]
    return tuple(slice(o, o + n) for o, n in zip(offsets, tensor.local_shape))


def initialize_model(model: torch.nn.Module, seed: int, std: float, num_layers: int,
                     custom_initial_values: dict[int, Callable[[torch.Generator], torch.Tensor]]) -> None:
    """Overwrite every parameter of `model` with its slice of the layout-independent global initial value.

    `custom_initial_values` maps id(param) -> fn(generator) giving that param's FULL (unsharded, without prepended
    axes) initial tensor; memory layers provide theirs. Every other parameter follows Megatron's scheme.
    """
    params = {id(p): p for p in model.parameters()}
    done = set()
    for tensor in _sharded_tensors(model):
        if tensor.data is None or id(tensor.data) not in params or id(tensor.data) in done:
            continue
        generator = key_generator(seed, f"{tensor.key}@{tensor.global_offset[:tensor.prepend_axis_num]}")
        make = custom_initial_values.get(id(tensor.data))
        global_shape = tuple(tensor.global_shape[tensor.prepend_axis_num:])
        if make is not None:
            full = make(generator)
        else:
            full = megatron_initial_value(tensor.key, global_shape, generator, std, num_layers)
        if tuple(full.shape) != global_shape:
            raise RuntimeError(f"initial value of {tensor.key} has shape {tuple(full.shape)}, expected {global_shape}")
        with torch.no_grad():
            tensor.data.copy_(full[_local_slice(tensor)].to(tensor.data.dtype).view_as(tensor.data))
        done.add(id(tensor.data))
    missing = [name for name, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"parameters without a layout-independent initial value: {missing}")
