"""Memory layers inside Megatron-Core's TransformerBlock, through layer specs (no fork).

A memory layer `a:b` reads block a's pre-MLP LayerNorm output and adds its output after block b (paper section
"split big mem & skip"). Block a is a reader `MemoryTransformerLayer` that hands that tensor to a `SkipBus` shared by the
chunk's layers; block b is a writer that owns the memory module and adds the memory output to its own
output. The bus starts the memory computation at block a (synchronously at b, or overlapped with blocks a..b: see
umtrain.parallel.overlap). `a == b` (PKM) is one layer that does both. The bus must be empty after every
block forward: a pair split across pipeline stages or recompute chunks is rejected at config load.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.transformer_layer import TransformerLayer

MEMORY_AUX_LOSS = "memory_aux_loss"


class SkipBus:
    """Carries block a's memory input to block b within one forward of one model chunk.

    `put` at block a starts the memory computation registered for a (through the runner: now, on a side stream or
    thread, or lazily); `take` at block b returns its output.
    """

    def __init__(self, runner):
        self.runner = runner
        self._computations: Dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._pending: Dict[int, object] = {}

    def register(self, reader_layer: int, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._computations[reader_layer] = compute

    def put(self, reader_layer: int, tensor: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """Start the memory computation on `tensor`; returns what block a's main path `main` continues as."""
        if reader_layer in self._pending:
            raise RuntimeError(f"memory input of layer {reader_layer} was put twice without being taken")
        main, self._pending[reader_layer] = self.runner.start(self._computations[reader_layer], tensor, main)
        return main

    def take(self, reader_layer: int) -> torch.Tensor:
        if reader_layer not in self._pending:
            raise RuntimeError(f"memory input of layer {reader_layer} is missing: its reader did not run "
                               "in this forward (pipeline or recompute split a memory placement?)")
        return self.runner.finish(self._pending.pop(reader_layer))

    def assert_empty(self) -> None:
        if self._pending:
            raise RuntimeError(f"memory inputs of layers {sorted(self._pending)} were never consumed")


class MemoryTransformerLayer(TransformerLayer):
    """A TransformerLayer that is the reader (`reads_for`) and/or writer (`memory`) of memory placements.

    Spec params: `reader: bool`, `writer_of: Optional[int]` (the 1-based reader layer whose input this layer's
    memory consumes), `memory_factory(layer_number) -> nn.Module` (builds the memory module for a writer), and
    `aux_loss_scale: float`, the share of the auxiliary loss this rank adds (1/TP when TP ranks split the sequence:
    umtrain.parallel.sequence).
    """

    def __init__(self, *args, reader: bool = False, writer_of: Optional[int] = None,
                 memory_factory: Optional[Callable[[int], torch.nn.Module]] = None,
                 aux_loss_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_memory_reader = reader
        self.memory_reader_layer = writer_of
        self.memory = memory_factory(writer_of) if writer_of is not None else None
        self.aux_loss_scale = aux_loss_scale
        self.skip_bus: Optional[SkipBus] = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron's view, except the value table: a shard of the full table over the memory-parallel group."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.memory is not None:
            from umtrain.parallel.memory_tables import TABLE_PARAM, table_sharded_tensor

            key = f"{prefix}memory.{TABLE_PARAM}"
            state[key] = table_sharded_tensor(key, getattr(self.memory, TABLE_PARAM), self.memory.lookup)
        return state

    def _forward_pre_mlp_layernorm(self, hidden_states):
        output = super()._forward_pre_mlp_layernorm(hidden_states)
        if self.is_memory_reader:
            output = self.skip_bus.put(self.layer_number, output, output)
        return output

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        if self.memory is not None:
            output = output + self.skip_bus.take(self.memory_reader_layer)
        return output, context

    def memory_with_aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The memory output, with the TDQKR auxiliary loss (eq. 12) routed into its backward, scaled like the main
        loss (times `aux_loss_scale`), and tracked: one computation, so that a runner can take it (and its backward)
        off the main path. The memory is a `MemoryLayer`, whose forward sets `aux_loss`; PKM's (no TDQKR cores) is a
        constant zero without a graph, and so is skipped like one computed under no_grad."""
        memory_output = self.memory(x)
        aux_loss = self.memory.aux_loss
        if not aux_loss.requires_grad or not self.training:
            return memory_output
        save_to_aux_losses_tracker(MEMORY_AUX_LOSS, aux_loss, self.layer_number, self.config.num_layers)
        return MoEAuxLossAutoScaler.apply(memory_output, aux_loss * self.aux_loss_scale)


def attach_skip_bus(model: torch.nn.Module, runner) -> None:
    """Give every memory layer of one model chunk the same bus, and check it after each block forward."""
    bus = SkipBus(runner)
    layers = [m for m in model.modules() if isinstance(m, MemoryTransformerLayer)]
    for layer in layers:
        layer.skip_bus = bus
        if layer.memory is not None:
            bus.register(layer.memory_reader_layer, layer.memory_with_aux_loss)
    if layers:
        decoder = model.decoder
        decoder.register_forward_hook(lambda module, inputs, output: bus.assert_empty())


def memory_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m.memory for m in model.modules() if isinstance(m, MemoryTransformerLayer) and m.memory is not None]
