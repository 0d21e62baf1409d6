"""LayerNorm / RMSNorm for the local spec that also works under sequence parallelism.

Megatron-Core's local `WrappedTorchNorm` refuses sequence parallelism (its fused alternatives need Apex or
Transformer Engine). Under SP each TP rank normalises its slice of the sequence, so the norm's weight gradients are
partial sums: tagging the parameters `sequence_parallel` makes Megatron's `finalize_model_grads` all-reduce them
over the TP group.
"""

from __future__ import annotations

import torch


def _tag_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    for param in module.parameters():
        param.sequence_parallel = sequence_parallel


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        _tag_sequence_parallel(self, config.sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        _tag_sequence_parallel(self, config.sequence_parallel)


def norm_class(normalization: str) -> type[torch.nn.Module]:
    return RMSNorm if normalization == "RMSNorm" else LayerNorm
