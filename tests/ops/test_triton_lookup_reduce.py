"""The Triton lookup-reduce against the reference, run on CPU by Triton's interpreter (tiny shapes: it is slow)."""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from umtrain.ops.lookup_reduce import lookup_reduce_reference  # noqa: E402

# (tokens T, top-m K, d_v, blocks E, rows N, cores h); K not a power of two exercises the masks, N < K repeats rows.
SHAPES = [
    (3, 5, 8, 4, 3, 2),
    (2, 4, 6, 1, 10, 1),
    (2, 3, 12, 2, 2, 3),
]


@pytest.fixture(scope="module")
def triton_lookup_reduce():
    """The kernels, jitted for the interpreter unless a GPU is present (TRITON_INTERPRET is read at decoration)."""
    if torch.cuda.is_available():
        module = importlib.import_module("umtrain.ops.triton_lookup_reduce")
        yield module.triton_lookup_reduce, "cuda"
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.reload(importlib.import_module("umtrain.ops.triton_lookup_reduce"))
        yield module.triton_lookup_reduce, "cpu"
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def make_inputs(tokens, k, d_v, num_blocks, num_rows, num_cores, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_rows, (tokens, k), generator=gen)
    blocks = torch.randint(0, num_blocks, (tokens, k), generator=gen)
    scores = torch.randn(num_cores, tokens, k, generator=gen)
    table = torch.randn(num_rows, d_v, generator=gen)
    return tuple(x.to(device) for x in (rows, blocks, scores.to(dtype), table.to(dtype)))


def forward_backward(fn, rows, blocks, scores, table, num_blocks):
    scores = scores.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    pooled = fn(rows, blocks, scores, table, num_blocks)
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(pooled)
    pooled.backward(grad)
    return pooled.detach(), scores.grad, table.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(triton_lookup_reduce, shape):
    fn, device = triton_lookup_reduce
    inputs = make_inputs(*shape, device)
    expected = forward_backward(lookup_reduce_reference, *inputs, shape[3])
    actual = forward_backward(fn, *inputs, shape[3])
    for name, want, got in zip(("pooled", "grad scores", "grad table"), expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_table_accumulates_in_fp32(triton_lookup_reduce):
    fn, device = triton_lookup_reduce
    inputs = make_inputs(3, 6, 8, 2, 2, 2, device, dtype=torch.bfloat16)
    exact = forward_backward(lookup_reduce_reference, *(x.double() if x.is_floating_point() else x for x in inputs), 2)
    actual = forward_backward(fn, *inputs, 2)
    for name, want, got in zip(("pooled", "grad scores", "grad table"), exact, actual):
        assert got.dtype == torch.bfloat16, name
        # One bf16 rounding of an fp32-accumulated sum: relative error below 2**-8.
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_zero_tokens_and_frozen_table(triton_lookup_reduce):
    fn, device = triton_lookup_reduce
    rows, blocks, scores, table = make_inputs(0, 4, 8, 2, 5, 2, device)
    scores.requires_grad_()
    pooled = fn(rows, blocks, scores, table, 2)
    assert pooled.shape == (0, 2, 8)
    pooled.sum().backward()
    assert scores.grad.shape == scores.shape and table.grad is None
