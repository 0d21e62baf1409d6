"""The causal depthwise convolution over time before the query projection (Table 2 'query conv')."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor,
                          history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[s, b, d] = sum_j weight[d, 0, j] * x[s - (k-1) + j, b, d], zero before the sequence start.

    x is sequence-first [S, B, D] (Megatron's layout); weight [D, 1, k]. Each sequence of the batch is
    convolved on its own; left padding keeps the output at s independent of inputs after s. `history` [k-1, B, D]:
    the tokens before x's first one when x is a slice of a longer sequence (sequence parallelism), instead of zeros.
    """
    kernel = weight.shape[-1]
    if history is None:
        padded = F.pad(x.permute(1, 2, 0), (kernel - 1, 0))             # [B, D, k-1+S]
    else:
        padded = torch.cat([history, x]).permute(1, 2, 0)
    return F.conv1d(padded, weight, groups=x.shape[-1]).permute(2, 0, 1)


def identity_kernel(channels: int, kernel: int) -> torch.Tensor:
    """[D, 1, k] with the current-token tap at 1: the convolution starts as the identity (init UNKNOWN in [P])."""
    weight = torch.zeros(channels, 1, kernel)
    weight[:, 0, -1] = 1.0
    return weight
