"""Model chunks for this rank: Megatron GPT chunks of any family, memory layers placed by spec, initialised
layout-independently."""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.transformer import TransformerConfig

from umtrain.config import Config
from umtrain.model.gpt import build_model_chunk
from umtrain.model.init import initialize_model
from umtrain.model.memory_block import memory_modules
from umtrain.parallel.parallelize import MemoryLayerParallelism


def placement_index_of_reader(config: Config) -> dict[int, int]:
    """1-based reader layer -> index of its placement in model.memory.placements."""
    return {a: index for index, (a, _) in enumerate(config.model.memory.parsed_placements("model.memory"))}


def make_memory_factory(config: Config, parallelism: MemoryLayerParallelism):
    from umtrain.model.memory import MemoryLayer
    from umtrain.ops import get_lookup_reduce

    index_of = placement_index_of_reader(config)

    def factory(reader_layer: int) -> torch.nn.Module:
        index = index_of[reader_layer]
        lookup, table_shape = (parallelism.lookup_factory(index) if parallelism.lookup_factory is not None
                               else (get_lookup_reduce(config.model.memory.lookup_impl), None))
        return MemoryLayer(config.model.memory, hidden_size=config.model.hidden_size,
                           num_layers=config.model.num_layers, seed=config.training.seed, layer_index=index,
                           lookup=lookup, table_shape=table_shape, sequence_history=parallelism.split.history,
                           record_stats=config.logging.memory_stats, initialize=False)   # `initialize_model` does

    return factory


def build_model_chunks(config: Config, tconfig: TransformerConfig, vocab_size: int,
                       parallelism: MemoryLayerParallelism = MemoryLayerParallelism()) -> list[torch.nn.Module]:
    """One chunk per virtual pipeline stage of this rank, on the training device, initialised from the seed."""
    factory = make_memory_factory(config, parallelism) if config.model.has_memory else None
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        chunk = build_model_chunk(config, tconfig, vocab_size, vp_stage, factory, parallelism.split.aux_loss_scale,
                                  parallelism.runner)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        initialize_model(chunk, config.training.seed, config.model.init_method_std, config.model.num_layers,
                         memory_initial_values(chunk))
        for memory in memory_modules(chunk):
            memory.refresh_tdqkr_factors(restart=True)  # u, t of the cores just initialised (step-0 sign rule)
        chunks.append(chunk)
    return chunks


def memory_initial_values(chunk: torch.nn.Module) -> dict[int, Callable[[torch.Generator], torch.Tensor]]:
    """id(param) -> full initial value, for the memory layers' own initialisation (appendix A)."""
    values = {}
    for memory in memory_modules(chunk):
        for name, param in memory.named_parameters():
            values[id(param)] = (lambda generator, m=memory, n=name: m.initial_value(n, generator))
    return values


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
