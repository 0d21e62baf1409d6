"""The Triton top-k against a stable sort (ties: lower index first); on CPU through Triton's interpreter, in a
fresh process (`tests/ops/triton_cases.py`)."""

import pytest
import torch

from tests.ops.triton_cases import (DEVICE, needs_kernels, only_in_the_parent, only_without_kernels,
                                    run_cases_under_interpreter)
from umtrain.ops.topk import MAX_KERNEL_COLUMNS, topk_indices, triton_topk_applies


def reference(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return torch.sort(scores.float(), dim=-1, descending=largest, stable=True).indices[..., :k]


@only_in_the_parent
def test_cases_under_interpreter():
    run_cases_under_interpreter(__file__, "6 passed, 2 skipped")


@only_without_kernels
def test_cpu_and_float32_scores_keep_torch_topk():
    scores = torch.randn(3, 40)
    assert not triton_topk_applies(scores.bfloat16(), 4)
    torch.testing.assert_close(topk_indices(scores, 4), scores.topk(4).indices)
    torch.testing.assert_close(topk_indices(scores, 4, largest=False), scores.topk(4, largest=False).indices)


# (leading shape, n, k, largest): a candidate row of UltraMem-151M, the grid's top-m, n and k not powers of two.
CASES = [((2, 3), 2048, 16, True), ((3, 2), 256, 16, True), ((5,), 100, 5, False), ((4, 1), 33, 33, True)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_a_stable_sort(dtype):
    from umtrain.ops.triton_topk import triton_topk_indices
    generator = torch.Generator().manual_seed(0)
    for leading, n, k, largest in CASES:
        scores = torch.randn(*leading, n, generator=generator).to(dtype).to(DEVICE)
        got = triton_topk_indices(scores, k, largest)
        torch.testing.assert_close(got, reference(scores, k, largest), msg=f"{leading} n={n} k={k}")


@needs_kernels
def test_ties_signs_zeros_and_infinities_follow_the_float_order():
    from umtrain.ops.triton_topk import triton_topk_indices
    values = torch.tensor([0.0, -0.5, 3.0, float("-inf"), 3.0, -0.5, float("inf"), -2.0, 1.0, 0.0, -0.5, 3.0])
    scores = values.repeat(2, 1).to(torch.bfloat16).to(DEVICE)
    for largest in (True, False):
        for k in (1, 4, 7, 12):
            torch.testing.assert_close(triton_topk_indices(scores, k, largest), reference(scores, k, largest),
                                       msg=f"k={k} largest={largest}")


@needs_kernels
def test_strided_rows_are_read_in_place():
    """The factor scores are a [T, H, n] view of an [H, T, n] GEMM output."""
    from umtrain.ops.triton_topk import triton_topk_indices
    base = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEVICE)
    scores = base.transpose(0, 1)
    torch.testing.assert_close(triton_topk_indices(scores, 8), reference(scores, 8, True))
    # 3 rows' worth of keys per program: programs take 2 (a power of two)
    torch.testing.assert_close(triton_topk_indices(scores, 8, row_elements=3 * 64), reference(scores, 8, True))


@needs_kernels
def test_empty_input_and_bad_arguments():
    from umtrain.ops.triton_topk import triton_topk_indices
    assert triton_topk_indices(torch.zeros(0, 2, 16, dtype=torch.bfloat16, device=DEVICE), 4).shape == (0, 2, 4)
    with pytest.raises(ValueError, match="bfloat16 or float16 scores, got torch.float32"):
        triton_topk_indices(torch.zeros(2, 16, device=DEVICE), 4)
    with pytest.raises(ValueError, match="k=17, n=16"):
        triton_topk_indices(torch.zeros(2, 16, dtype=torch.bfloat16, device=DEVICE), 17)


@needs_kernels
def test_the_dispatch_takes_the_kernel_for_16_bit_gpu_scores():
    scores = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEVICE)
    assert triton_topk_applies(scores, 8) == (DEVICE == "cuda")
    assert not triton_topk_applies(torch.zeros(2, MAX_KERNEL_COLUMNS + 1, dtype=torch.bfloat16, device=DEVICE), 8)
    torch.testing.assert_close(scores.gather(-1, topk_indices(scores, 8)), scores.topk(8).values)
