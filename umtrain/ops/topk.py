"""Indices of the k largest (or smallest) entries along the last dimension, for the memory layer's selection.

On a GPU with 16-bit scores (bf16/fp16 training) a Triton kernel (`umtrain.ops.triton_topk`) replaces
`torch.topk`: PyTorch's radix select took 3.6 ms of an UltraMem layer's 22 ms on an H200 for the candidates of
32,768 tokens (rows of 2,048 scores), about 150 GB/s (`docs/benchmarks/memory_layer_profile.md`). Elsewhere, for
float32 scores, and for rows longer than `MAX_KERNEL_COLUMNS`, `torch.topk`. Both return the indices in descending
order of score (ascending for smallest); the kernel breaks ties between equal bit patterns by the lower index
(-0.0 ranks below +0.0), `torch.topk` in no specified way.
"""

from __future__ import annotations

import functools

import torch

PACKED_DTYPES = (torch.bfloat16, torch.float16)
"""Score dtypes the kernel takes: a 16-bit score and a 16-bit column index pack into one int32 sort key."""

MAX_PACKED_COLUMNS = 1 << 16
"""The longest row whose column fits the key's low 16 bits."""

MAX_KERNEL_COLUMNS = 2048
"""The longest row the layer sends to the kernel: it was measured faster than `torch.topk` up to rows of 2,048
(`docs/benchmarks/selection_cuda.md`). A row is sorted padded to the next power of two in one program, so a row of
2,200 (UltraMem-151M's sqrt(E x N)) sorts 4,096 keys; not measured yet, so it keeps `torch.topk`."""


def topk_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """scores [..., n] -> int64 [..., k]."""
    if triton_topk_applies(scores, k):
        from umtrain.ops.triton_topk import triton_topk_indices
        return triton_topk_indices(scores, k, largest)
    return scores.topk(k, dim=-1, largest=largest).indices


def triton_topk_applies(scores: torch.Tensor, k: int) -> bool:
    return (scores.is_cuda and scores.dtype in PACKED_DTYPES and 0 < k <= scores.shape[-1] <= MAX_KERNEL_COLUMNS
            and scores.numel() > 0 and triton_has_topk())


@functools.cache
def triton_has_topk() -> bool:
    """`tl.topk` is recent in Triton; an older Triton keeps `torch.topk`."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "topk")
