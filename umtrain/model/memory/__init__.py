"""Memory layers (PKM and UltraMem) as plain PyTorch modules; the Megatron wiring lives elsewhere."""

from umtrain.model.memory.layer import MemoryLayer

__all__ = ["MemoryLayer"]
