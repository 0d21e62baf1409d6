"""Indices of the k largest (or smallest) entries along the last dimension, for the memory layer's selection.

On a GPU with 16-bit scores (bf16/fp16 training) a Triton kernel (`umtrain.ops.triton_topk`) replaces
`torch.topk`: PyTorch's radix select took 3.6 ms of an UltraMem layer's 22 ms on an H200 for the candidates of
32,768 tokens (rows of 2,048 scores), about 150 GB/s (`docs/benchmarks/memory_layer_profile.md`). Elsewhere, and
for float32 scores, `torch.topk`. Both return the indices in descending order of score (ascending for smallest);
the kernel breaks ties by the lower index, `torch.topk` in no specified way.
"""

from __future__ import annotations

import functools

import torch

PACKED_DTYPES = (torch.bfloat16, torch.float16)
"""Score dtypes the kernel takes: a 16-bit score and a 16-bit column index pack into one int32 sort key."""

MAX_PACKED_COLUMNS = 1 << 16


def topk_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """scores [..., n] -> int64 [..., k]."""
    if triton_topk_applies(scores, k):
        from umtrain.ops.triton_topk import triton_topk_indices
        return triton_topk_indices(scores, k, largest)
    return scores.topk(k, dim=-1, largest=largest).indices


def triton_topk_applies(scores: torch.Tensor, k: int) -> bool:
    return (scores.is_cuda and scores.dtype in PACKED_DTYPES and 0 < k <= scores.shape[-1] <= MAX_PACKED_COLUMNS
            and scores.numel() > 0 and triton_has_topk())


@functools.cache
def triton_has_topk() -> bool:
    """`tl.topk` is recent in Triton; an older Triton keeps `torch.topk`."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "topk")
