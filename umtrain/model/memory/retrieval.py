"""Product-key retrieval: PKM's additive grid and TDQKR's Tucker grid (eqs. 4-12), as pure functions.

Shapes: T tokens, H heads, r Tucker rank, n keys per side, h cores (MCS), m top-m, c candidates per side.
Sub-key scores are `s_row`, `s_col` [T, H, r, n]; rank r = 1 means PKM's additive grid s_row[a] + s_col[b]
(no core); r > 1 means the bilinear grid S_row^T C S_col with cores [H, h, r, r].

Selection (which n x n cells to read) runs without gradient; the scores of the selected cells are then
recomputed from gathered sub-key scores so that gradients reach the query, the keys and the cores only
through the selected entries (eqs. 8-11), and never through the [T, H, n, n] grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from umtrain.ops.topk import topk_indices


@dataclass
class Selection:
    """The top-m cells of each token and head: grid coordinates, per-core scores and their sum."""

    row: torch.Tensor
    """[T, H, m] row index in [0, n)."""
    col: torch.Tensor
    """[T, H, m] column index in [0, n)."""
    scores: torch.Tensor
    """[h, T, H, m] per-core scores (with gradient); h = 1 without MCS."""

    @property
    def summed(self) -> torch.Tensor:
        """[T, H, m] the score the top-m ranks by (eq. 16), in descending order."""
        return self.scores.sum(0)


def bilinear_grid(f_row: torch.Tensor, f_col: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """G[t,j,a,b] = f_row[t,j,:,a]^T core[j] f_col[t,j,:,b] (eq. 5 / eq. 10): [T,H,r,a], [T,H,r,b], [H,r,r]."""
    return torch.einsum("tjxa,jxy,tjyb->tjab", f_row, core, f_col)


def grid_scores(f_row: torch.Tensor, f_col: torch.Tensor, cores: Optional[torch.Tensor]) -> torch.Tensor:
    """Summed score of every (row, column) pair of the given sub-key scores: [T, H, a, b].

    cores None: PKM's additive grid f_row[a] + f_col[b] (rank 1). Otherwise the sum over the MCS cores.
    """
    if cores is None:
        return f_row[:, :, 0, :, None] + f_col[:, :, 0, None, :]
    return bilinear_grid(f_row, f_col, cores.sum(1))


def pair_scores(f_row: torch.Tensor, f_col: torch.Tensor, cores: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-core scores of aligned pairs: f_row, f_col [T, H, r, m] -> [h, T, H, m] (eq. 17's G^(i)_k)."""
    if cores is None:
        return (f_row[:, :, 0] + f_col[:, :, 0]).unsqueeze(0)
    return _PairScores.apply(f_row, cores, f_col)


class _PairScores(torch.autograd.Function):
    """`einsum("tjxm,jixy,tjym->itjm")` with the cores' gradient computed token by token, then summed in float64.

    Autograd's einsum backward makes the cores' gradient one GEMM of inner dimension T x m with h x r x r outputs
    per head, which cuBLAS ran at about 7 GFLOP/s on an H200 (2.6 ms, 12% of an UltraMem layer at 32,768 tokens;
    `docs/benchmarks/memory_layer_profile.md`). Here it is an elementwise product reduced over m, then over tokens:
    memory-bound kernels over 8 M elements. The float64 sum over tokens makes the float32 result independent of how
    many threads the tokens were split over (across ranks each partial is rounded once before their reduction)."""

    @staticmethod
    def forward(ctx, f_row: torch.Tensor, cores: torch.Tensor, f_col: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f_row, cores, f_col)
        return torch.einsum("tjxm,jixy,tjym->itjm", f_row, cores, f_col)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        f_row, cores, f_col = ctx.saved_tensors
        grad_row = grad_cores = grad_col = None
        if ctx.needs_input_grad[0]:
            grad_row = torch.einsum("itjm,jixy,tjym->tjxm", grad, cores, f_col)
        if ctx.needs_input_grad[1]:
            grad_cores = cores_gradient(grad, f_row, f_col).to(cores.dtype)
        if ctx.needs_input_grad[2]:
            grad_col = torch.einsum("itjm,jixy,tjxm->tjym", grad, cores, f_row)
        return grad_row, grad_cores, grad_col


def cores_gradient(grad: torch.Tensor, f_row: torch.Tensor, f_col: torch.Tensor) -> torch.Tensor:
    """d/dC[j,i,x,y] of sum grad[i,t,j,m] f_row[t,j,x,m] C[j,i,x,y] f_col[t,j,y,m]: [H, h, r, r] in float64."""
    dtype = _at_least_float32(grad.dtype)
    outer = f_row.to(dtype)[:, :, :, None, :] * f_col.to(dtype)[:, :, None, :, :]   # [T, H, x, y, m]
    per_token = (grad.to(dtype).permute(1, 2, 0, 3)[:, :, :, None, None, :] * outer[:, :, None]).sum(-1)
    return per_token.double().sum(0)                                                # [H, h, x, y]


def select_candidates(factor_scores: torch.Tensor, count: int, sign_aware: bool) -> torch.Tensor:
    """Candidate indices per side [T, H, c] from the rank-1 factor scores [T, H, n].

    Plain: the top-`count` (eq. 8-9). Sign-aware: the top-`count` and the bottom-`count` (c = 2*count, or all n
    when that covers the side). For a rank-1 grid a[a]*b[b] a top pair with b > 0 has `a` among the top of its side
    and with b < 0 among the bottom, so sign-aware candidates make the two-stage top-m exact for rank-1 cores.
    """
    n = factor_scores.shape[-1]
    if not sign_aware:
        return topk_indices(factor_scores, count)
    if 2 * count >= n:
        return torch.arange(n, device=factor_scores.device).expand(*factor_scores.shape[:-1], n)
    top = topk_indices(factor_scores, count)
    bottom = topk_indices(factor_scores, count, largest=False)
    return torch.cat([top, bottom], dim=-1)


class _GatherLastDim(torch.autograd.Function):
    """`scores.gather(-1, index)` whose backward keeps only the index: autograd's gather saves its whole source,
    here the [T, H, r, n] sub-key scores, which dominated the layer's saved activations."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.source_shape = scores.shape
        return scores.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.source_shape).scatter_add_(-1, index, grad), None


def gather_sub_scores(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """scores [T, H, r, n], index [T, H, c] -> [T, H, r, c]."""
    return _GatherLastDim.apply(scores, index.unsqueeze(2).expand(-1, -1, scores.shape[2], -1))


def select_top_m(s_row: torch.Tensor, s_col: torch.Tensor, cores: Optional[torch.Tensor],
                 row_factor_scores: Optional[torch.Tensor], col_factor_scores: Optional[torch.Tensor],
                 top_m: int, num_candidates: int, sign_aware: bool) -> Selection:
    """Two-stage top-m (PKM, eqs. 1-3) or TDQKR's approximate top-m (eqs. 6-11).

    1. Candidates per side from the rank-1 factor scores u^T S_row, t^T S_col [T, H, n] (eq. 7; None: the rank-1
       sub-scores themselves, PKM).
    2. Exact summed grid over the c x c candidates, top-m of it.
    3. Per-core scores of the chosen cells recomputed with gradient.
    """
    with torch.no_grad():
        if row_factor_scores is None:
            row_factor_scores, col_factor_scores = s_row[:, :, 0], s_col[:, :, 0]
        row_cand = select_candidates(row_factor_scores.detach(), num_candidates, sign_aware)
        col_cand = select_candidates(col_factor_scores.detach(), num_candidates, sign_aware)
        grid = grid_scores(gather_sub_scores(s_row.detach(), row_cand), gather_sub_scores(s_col.detach(), col_cand),
                           cores)
        num_col = col_cand.shape[-1]
        flat = topk_indices(grid.flatten(2), top_m)
        row = row_cand.gather(-1, flat // num_col)
        col = col_cand.gather(-1, flat % num_col)
    scores = pair_scores(gather_sub_scores(s_row, row), gather_sub_scores(s_col, col), cores)
    return Selection(row=row, col=col, scores=scores)


@dataclass
class CoreFactors:
    """What TDQKR takes from the SVD of the summed core C_bar = sum_i C^(i) (eq. 6), once per optimizer step."""

    row: torch.Tensor
    """u [H, r]: the leading left singular vector, with the sign rule of `tdqkr_core_factors`."""
    col: torch.Tensor
    """t [H, r]: the leading right singular vector, with the same sign."""
    right_basis: torch.Tensor
    """V [H, r, r]: all right singular vectors as columns, leading first (for `tdqkr_aux_loss`), in the SVD's
    dtype (float32, or float64 for float64 cores)."""


@torch.no_grad()
def tdqkr_core_factors(cores: torch.Tensor, previous_row: torch.Tensor, previous_col: torch.Tensor) -> CoreFactors:
    """The SVD of C_bar, for the candidate stage (u, t) and the auxiliary loss (V).

    SVD fixes (u, t) up to a shared sign, and flipping it changes the candidates. Keep the sign closer in L1 to
    the previous (u, t), as the authors' code does; with no previous pair (all zeros) make sum(u) + sum(t) >= 0,
    which for nonnegative cores (the U(0,1) init) gives the Perron vectors.
    """
    u_all, _, vh_all = torch.linalg.svd(cores.sum(1).to(_at_least_float32(cores.dtype)))
    u, t = u_all[..., :, 0], vh_all[..., 0, :]
    keep = (u - previous_row).abs().sum(-1) + (t - previous_col).abs().sum(-1)
    flip = (u + previous_row).abs().sum(-1) + (t + previous_col).abs().sum(-1)
    first_step = (previous_row.abs().sum(-1) + previous_col.abs().sum(-1)) == 0
    sign = torch.where(first_step, torch.where(u.sum(-1) + t.sum(-1) >= 0, 1.0, -1.0),
                       torch.where(flip < keep, -1.0, 1.0))
    return CoreFactors(row=(u * sign[:, None]).to(cores.dtype), col=(t * sign[:, None]).to(cores.dtype),
                       right_basis=vh_all.mT.contiguous())


def tdqkr_aux_loss(cores: torch.Tensor, right_basis: torch.Tensor, coeff: float, tau: float) -> torch.Tensor:
    """Eq. 12: alpha/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 over the singular values of C_bar, mean over heads.

    lambda_i = ||C_bar v_i|| with V = `right_basis` from the last `tdqkr_core_factors` of these cores: the exact
    singular values, and the exact gradient u_i v_i^T of each, without an SVD in the forward. (On CUDA an SVD checks
    its solver's status on the host, which would stop the host at every memory layer until the device got there.)
    """
    rank, dtype = cores.shape[-1], _at_least_float32(cores.dtype)
    singular = torch.linalg.vector_norm(cores.sum(1).to(dtype) @ right_basis.to(dtype), dim=-2)  # [H, r], descending
    excess = torch.relu(singular[:, 1:] - tau)
    return coeff / (rank - 1) * excess.pow(2).sum(-1).mean()


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
