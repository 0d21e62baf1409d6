"""Row-wise top-k of 16-bit scores in Triton (see `umtrain.ops.topk`); on CPU only under TRITON_INTERPRET=1.

Each score's bits become a signed 16-bit key with the order of the floats (negative values get their magnitude bits
flipped), packed above the inverted column index into one int32: one `tl.topk` over the packed keys sorts by score,
then by lower column, and the index comes back from the low 16 bits. Each program holds BLOCK_R whole rows in
registers, so rows up to a few thousand scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from umtrain.ops.topk import MAX_PACKED_COLUMNS, PACKED_DTYPES

ROW_ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4
"""Keys one program sorts at once (BLOCK_R rows of N_POW2) and its warps: on an H200, rows of 2,048 took 0.95 ms
per 65,536 rows at 1,024-2,048 keys and 4 warps, 1.03-1.11 ms at 8 warps (`docs/benchmarks/selection_cuda.md`)."""


@triton.jit
def _topk_kernel(scores_ptr, out_ptr, rows, inner, n, k, stride_outer, stride_inner, N_POW2: tl.constexpr,
                 K_POW2: tl.constexpr, BLOCK_R: tl.constexpr, LARGEST: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.arange(0, N_POW2)
    row_mask = row < rows
    mask = row_mask[:, None] & (column < n)[None, :]
    start = (row // inner).to(tl.int64) * stride_outer + (row % inner).to(tl.int64) * stride_inner
    bits = tl.load(scores_ptr + start[:, None] + column[None, :], mask=mask, other=0).to(tl.int32)
    order = bits ^ ((bits >> 15) & 0x7FFF)              # float order as signed 16-bit integers
    if not LARGEST:
        order = ~order
    key = tl.where(mask, order * 65536 + (65535 - column[None, :]), -2147483647 - 1)
    top = tl.topk(key, K_POW2)
    out_column = tl.arange(0, K_POW2)
    tl.store(out_ptr + row[:, None].to(tl.int64) * k + out_column[None, :], (65535 - (top & 0xFFFF)).to(tl.int64),
             mask=row_mask[:, None] & (out_column < k)[None, :])


def triton_topk_indices(scores: torch.Tensor, k: int, largest: bool = True, *,
                        row_elements: int = ROW_ELEMENTS_PER_PROGRAM, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """scores [..., n] (bf16 or fp16) -> int64 [..., k], like `torch.topk(...).indices`. `row_elements`: scores
    sorted per program (whole rows, a power of two of them, at least one)."""
    n = scores.shape[-1]
    if scores.dtype not in PACKED_DTYPES:
        raise ValueError(f"the Triton top-k takes bfloat16 or float16 scores, got {scores.dtype}")
    if not 0 < k <= n <= MAX_PACKED_COLUMNS:
        raise ValueError(f"the Triton top-k needs 0 < k <= n <= {MAX_PACKED_COLUMNS}, got k={k}, n={n}")
    rows3 = _as_rows(scores)
    num_rows = rows3.shape[0] * rows3.shape[1]
    out = torch.empty(num_rows, k, dtype=torch.int64, device=scores.device)
    if num_rows:
        n_pow2, k_pow2 = triton.next_power_of_2(n), triton.next_power_of_2(k)
        rows_per_program = max(1, row_elements // n_pow2)
        block_r = min(triton.next_power_of_2(num_rows), 1 << (rows_per_program.bit_length() - 1))
        _topk_kernel[(triton.cdiv(num_rows, block_r),)](
            rows3.view(torch.int16), out, num_rows, rows3.shape[1], n, k, rows3.stride(0), rows3.stride(1),
            N_POW2=n_pow2, K_POW2=k_pow2, BLOCK_R=block_r, LARGEST=largest, num_warps=num_warps)
    return out.view(*scores.shape[:-1], k)


def _as_rows(scores: torch.Tensor) -> torch.Tensor:
    """[outer, inner, n] with a contiguous last dimension, without a copy where strides allow (the factor scores
    come out of their GEMM as a [T, H, n] view of an [H, T, n] tensor)."""
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if scores.dim() == 1:
        return scores.view(1, 1, -1)
    if scores.dim() == 2:
        return scores.unsqueeze(0)
    try:
        return scores.view(-1, scores.shape[-2], scores.shape[-1])
    except RuntimeError:
        return scores.reshape(-1, scores.shape[-2], scores.shape[-1])
