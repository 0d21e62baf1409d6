"""The Triton lookup-reduce against the reference; on CPU through Triton's interpreter (tiny shapes: it is slow), in
a fresh process (`tests/ops/triton_cases.py`)."""

import pytest
import torch

from tests.ops.lookup_inputs import check_main_grad_accumulation, forward_backward, make_inputs
from tests.ops.triton_cases import (DEVICE, needs_kernels, only_in_the_parent, only_without_kernels,
                                    run_cases_under_interpreter)
from umtrain.ops.lookup_reduce import lookup_reduce_reference

# (tokens T, top-m K, d_v, blocks E, rows N, cores h); K not a power of two exercises the masks, N < K repeats rows.
SHAPES = [
    (3, 5, 8, 4, 3, 2),
    (2, 4, 6, 1, 10, 1),
    (2, 3, 12, 2, 2, 3),
]


def assert_matches_reference(lookup_reduce, shape):
    inputs = make_inputs(*shape, device=DEVICE)
    expected = forward_backward(lookup_reduce_reference, *inputs, shape[3])
    actual = forward_backward(lookup_reduce, *inputs, shape[3])
    for name, want, got in zip(("pooled", "grad scores", "grad table"), expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@only_in_the_parent
def test_cases_under_interpreter():
    run_cases_under_interpreter(__file__, "10 passed, 2 skipped")


@only_without_kernels
def test_triton_without_a_gpu_or_the_interpreter_is_refused_when_resolved():
    """At model build, not at the first forward: no Triton import, no kernel launch."""
    from umtrain.config import ConfigError
    from umtrain.ops.lookup_reduce import get_lookup_reduce
    with pytest.raises(ConfigError, match="model.memory.lookup_impl: 'triton' runs on GPU, and this machine has none"):
        get_lookup_reduce("triton")


@pytest.fixture(scope="module")
def lookup_reduce():
    from umtrain.ops.lookup_reduce import get_lookup_reduce
    return get_lookup_reduce("triton")


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(lookup_reduce, shape):
    assert_matches_reference(lookup_reduce, shape)


@needs_kernels
def test_bf16_table_accumulates_in_fp32(lookup_reduce):
    inputs = make_inputs(2, 64, 8, 2, 3, 2, dtype=torch.bfloat16, device=DEVICE)   # ~32 terms per sum
    exact = forward_backward(lookup_reduce_reference, *(x.double() if x.is_floating_point() else x for x in inputs), 2)
    actual = forward_backward(lookup_reduce, *inputs, 2)
    for name, want, got in zip(("pooled", "grad scores", "grad table"), exact, actual):
        assert got.dtype == torch.bfloat16, name
        # Within one bf16 ulp (2**-7 relative; the interpreter truncates where a GPU rounds) of the exact sum,
        # which summing 32 terms in bf16 would miss.
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_gradient_is_added_into_megatrons_main_grad(lookup_reduce, dtype):
    check_main_grad_accumulation(lookup_reduce, dtype, DEVICE)


@needs_kernels
def test_zero_tokens_and_frozen_table(lookup_reduce):
    rows, blocks, scores, table = make_inputs(0, 4, 8, 2, 5, 2, device=DEVICE)
    scores.requires_grad_()
    pooled = lookup_reduce(rows, blocks, scores, table, 2)
    assert pooled.shape == (0, 2, 8)
    pooled.sum().backward()
    assert scores.grad.shape == scores.shape and table.grad is None


@pytest.fixture
def entry_by_entry_calls(monkeypatch) -> list:
    """Each call of the entry-by-entry path (still run) records its (K, num_blocks)."""
    import umtrain.ops.triton_lookup_reduce as kernels
    calls, original = [], kernels._pool_entry_by_entry

    def recorded(rows, blocks, scores, table, num_blocks):
        calls.append((rows.shape[1], num_blocks))
        return original(rows, blocks, scores, table, num_blocks)
    monkeypatch.setattr(kernels, "_pool_entry_by_entry", recorded)
    return calls


@needs_kernels
def test_more_blocks_than_a_program_takes_pool_entry_by_entry(lookup_reduce, entry_by_entry_calls):
    """Number-wise owner pooling's call: one 'token' of every request an owner received, a block per (source token,
    IVE block) of the group. One program per token would unroll its block loop 300 times, and at realistic sizes
    its [next_pow2(K), d] tile is beyond Triton's 2**20 elements (it crashed there)."""
    assert_matches_reference(lookup_reduce, (1, 600, 8, 300, 50, 2))
    assert entry_by_entry_calls == [(600, 300)]


@needs_kernels
def test_rows_longer_than_a_program_takes_pool_entry_by_entry(lookup_reduce, entry_by_entry_calls, monkeypatch):
    import umtrain.ops.triton_lookup_reduce as kernels
    monkeypatch.setattr(kernels, "MAX_KERNEL_K", 4)
    assert_matches_reference(lookup_reduce, (3, 5, 8, 4, 3, 2))
    assert entry_by_entry_calls == [(5, 4)]


@needs_kernels
def test_entry_by_entry_adds_the_table_gradient_into_megatrons_main_grad(lookup_reduce, entry_by_entry_calls,
                                                                         monkeypatch):
    import umtrain.ops.triton_lookup_reduce as kernels
    monkeypatch.setattr(kernels, "MAX_KERNEL_BLOCKS", 0)
    check_main_grad_accumulation(lookup_reduce, torch.float32, DEVICE)
    assert entry_by_entry_calls
