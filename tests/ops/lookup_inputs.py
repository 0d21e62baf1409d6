"""Seeded lookup-reduce inputs and a forward+backward returning what to compare, for the lookup-reduce tests."""

from __future__ import annotations

from typing import Callable

import torch


def make_inputs(tokens: int, k: int, d_v: int, num_blocks: int, num_rows: int, num_cores: int,
                dtype: torch.dtype = torch.float32, seed: int = 0,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows, blocks [T, K]; scores [h, T, K]; table [N, d_v]. Floats are drawn in float32 and then cast, so every
    dtype sees the same values (rounded)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_rows, (tokens, k), generator=gen)
    blocks = torch.randint(0, num_blocks, (tokens, k), generator=gen)
    scores = torch.randn(num_cores, tokens, k, generator=gen).to(dtype)
    table = torch.randn(num_rows, d_v, generator=gen).to(dtype)
    return tuple(x.to(device) for x in (rows, blocks, scores, table))


def forward_backward(fn: Callable, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor,
                     table: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pooled and the gradients of scores and table, for fresh leaves copied from the inputs."""
    scores = scores.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    pooled = fn(rows, blocks, scores, table, num_blocks)
    pooled.backward(upstream_gradient(pooled))
    return pooled.detach(), scores.grad, table.grad


def upstream_gradient(pooled: torch.Tensor) -> torch.Tensor:
    """Positive, so bf16 sums of positive inputs do not cancel; bf16-representable, so every dtype sees the same one."""
    return torch.rand(pooled.shape, generator=torch.Generator().manual_seed(1)).bfloat16().to(pooled)



def check_main_grad_accumulation(fn: Callable, dtype: torch.dtype, device: str) -> None:
    """Under Megatron's DDP the table's gradient goes straight into its fp32 main_grad (here already holding 0.5),
    over two micro-batches, and the parameter is marked so that DDP's hook does not add it again; the scores'
    gradient is unchanged. Against the reference lookup in float64."""
    from umtrain.ops.lookup_reduce import lookup_reduce_reference

    rows, blocks, scores, table = make_inputs(3, 5, 8, 4, 3, 2, dtype=dtype, device=device)
    exact = (x.double() for x in (scores, table))
    _, want_scores, want_table = forward_backward(lookup_reduce_reference, rows, blocks, *exact, 4)
    param = torch.nn.Parameter(table.clone())
    param.main_grad = torch.full(param.shape, 0.5, dtype=torch.float32, device=device)
    param.grad_added_to_main_grad = False
    scores = scores.clone().requires_grad_()
    for _ in range(2):
        pooled = fn(rows, blocks, scores, param, 4)
        pooled.backward(upstream_gradient(pooled))
    assert param.grad_added_to_main_grad
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close((param.main_grad - 0.5).double(), 2 * want_table, rtol=tolerance, atol=1e-5)
    torch.testing.assert_close(scores.grad.double(), 2 * want_scores, rtol=tolerance, atol=1e-5)
