"""Product-key / TDQKR retrieval against brute force over the whole grid, the PKM oracle, recall, and eq. 12."""

from __future__ import annotations

import pytest
import torch

from umtrain.model.memory.retrieval import (bilinear_grid, grid_scores, pair_scores, select_top_m, tdqkr_aux_loss,
                                            tdqkr_core_factors)


def exact_top_m(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor | None, top_m: int) -> torch.Tensor:
    """Addresses [T, H, m] of the exact top-m over all n*n cells, from an explicit per-cell loop over the grid."""
    tokens, heads, _, n = s_row.shape
    addresses = torch.empty(tokens, heads, top_m, dtype=torch.long)
    for t in range(tokens):
        for j in range(heads):
            if cores is None:
                grid = s_row[t, j, 0][:, None] + s_col[t, j, 0][None, :]
            else:
                grid = s_row[t, j].T @ cores[j].sum(0) @ s_col[t, j]
            addresses[t, j] = grid.flatten().topk(top_m).indices
    return addresses


def recall(selection, exact: torch.Tensor, n: int) -> float:
    chosen = selection.row * n + selection.col
    hits = (chosen.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


def rank_one_cores(heads: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """[H, 1, r, r] cores u t^T with positive u, t."""
    u = torch.rand(heads, rank, generator=generator) + 0.1
    t = torch.rand(heads, rank, generator=generator) + 0.1
    return (u[:, :, None] * t[:, None, :]).unsqueeze(1)


def factors_of(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zeros = torch.zeros(cores.shape[0], cores.shape[-1])
    factors = tdqkr_core_factors(cores, zeros, zeros)
    return factors.row, factors.col


def factor_scores_of(cores: torch.Tensor, s_row: torch.Tensor, s_col: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """u^T S_row, t^T S_col (eq. 7) with the leading singular vectors of the cores' sum."""
    u, t = factors_of(cores.detach())
    return torch.einsum("tjrn,jr->tjn", s_row.detach(), u), torch.einsum("tjrn,jr->tjn", s_col.detach(), t)


@pytest.mark.parametrize("tokens,heads,n,top_m", [(6, 2, 16, 4), (3, 3, 32, 8), (5, 1, 7, 7)])
def test_pkm_two_stage_top_m_is_the_exact_top_m_over_all_values(tokens, heads, n, top_m) -> None:
    generator = torch.Generator().manual_seed(n)
    s_row, s_col = (torch.randn(tokens, heads, 1, n, generator=generator, requires_grad=True) for _ in range(2))
    selection = select_top_m(s_row, s_col, None, None, None, top_m, top_m, sign_aware=False)
    exact = exact_top_m(s_row.detach(), s_col.detach(), None, top_m)
    assert torch.equal(selection.row * n + selection.col, exact)

    full = s_row[:, :, 0, :, None] + s_col[:, :, 0, None, :]
    expected = full.flatten(2).gather(-1, exact)
    torch.testing.assert_close(selection.scores[0], expected)
    upstream = torch.randn(expected.shape, generator=generator)
    got = torch.autograd.grad((selection.scores[0] * upstream).sum(), [s_row, s_col])
    want = torch.autograd.grad((expected * upstream).sum(), [s_row, s_col])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_pkm_additive_grid_is_the_rank_2_tucker_grid_with_identity_core() -> None:
    """Spec 2.3 oracle: S_row = [s_row; 1], S_col = [1; s_col], C = I gives s_row[a] + s_col[b]."""
    generator = torch.Generator().manual_seed(0)
    s_row, s_col = (torch.randn(4, 2, 1, 9, generator=generator) for _ in range(2))
    ones = torch.ones_like(s_row)
    tucker = bilinear_grid(torch.cat([s_row, ones], 2), torch.cat([ones, s_col], 2), torch.eye(2).expand(2, 2, 2))
    torch.testing.assert_close(grid_scores(s_row, s_col, None), tucker)
    swapped = bilinear_grid(torch.cat([s_row, ones], 2), torch.cat([ones, s_col], 2),
                            torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(2, 2, 2))
    assert not torch.allclose(swapped, tucker)


@pytest.mark.parametrize("rank,num_cores", [(2, 1), (3, 2)])
def test_tdqkr_rank_one_core_with_nonnegative_factor_scores_has_exact_recall(rank, num_cores) -> None:
    generator = torch.Generator().manual_seed(rank)
    tokens, heads, n, top_m = 32, 2, 24, 6
    cores = rank_one_cores(heads, rank, generator).expand(-1, num_cores, -1, -1) / num_cores
    s_row, s_col = (torch.rand(tokens, heads, rank, n, generator=generator) for _ in range(2))
    selection = select_top_m(s_row, s_col, cores, *factor_scores_of(cores, s_row, s_col), top_m, top_m,
                             sign_aware=False)
    assert recall(selection, exact_top_m(s_row, s_col, cores, top_m), n) == 1.0


def test_tdqkr_recall_with_signed_scores_and_the_sign_aware_fix() -> None:
    """Rank-1 core, signed sub-scores: plain candidates miss pairs of large negative factors; sign-aware does not."""
    generator = torch.Generator().manual_seed(11)
    tokens, heads, n, top_m, rank = 64, 2, 32, 8, 2
    cores = rank_one_cores(heads, rank, generator)
    s_row, s_col = (torch.randn(tokens, heads, rank, n, generator=generator) for _ in range(2))

    def recall_with(cores_: torch.Tensor, sign_aware: bool) -> float:
        selection = select_top_m(s_row, s_col, cores_, *factor_scores_of(cores_, s_row, s_col), top_m, top_m,
                                     sign_aware)
        return recall(selection, exact_top_m(s_row, s_col, cores_, top_m), n)

    full_rank = torch.rand(heads, 2, rank, rank, generator=generator)
    plain, aware = recall_with(cores, False), recall_with(cores, True)
    plain_full, aware_full = recall_with(full_rank, False), recall_with(full_rank, True)
    print(f"\nTDQKR recall (n={n}, m=m_c={top_m}, signed N(0,1) sub-scores): rank-1 core plain {plain:.3f}, "
          f"sign-aware {aware:.3f}; U(0,1) cores h=2 plain {plain_full:.3f}, sign-aware {aware_full:.3f}; "
          f"grid cells scored {top_m ** 2} vs {(2 * top_m) ** 2}")
    assert aware == 1.0
    assert plain < 0.9
    assert aware_full >= plain_full


def test_tdqkr_selection_gradients_match_brute_force_per_core_scores() -> None:
    """MCS: per-core scores G^(i) at the chosen cells, from the full per-core grids, with the same gradients."""
    generator = torch.Generator().manual_seed(5)
    tokens, heads, n, top_m, rank, num_cores = 5, 2, 10, 4, 2, 3
    cores = torch.rand(heads, num_cores, rank, rank, generator=generator, requires_grad=True)
    s_row, s_col = (torch.randn(tokens, heads, rank, n, generator=generator, requires_grad=True) for _ in range(2))
    selection = select_top_m(s_row, s_col, cores, *factor_scores_of(cores, s_row, s_col), top_m, 5, sign_aware=False)
    address = selection.row * n + selection.col
    per_core = torch.stack([torch.stack([torch.stack([
        (s_row[t, j].T @ cores[j, i] @ s_col[t, j]).flatten()[address[t, j]]
        for j in range(heads)]) for t in range(tokens)]) for i in range(num_cores)])
    torch.testing.assert_close(selection.scores, per_core)
    assert torch.all(selection.summed[..., :-1] >= selection.summed[..., 1:])
    upstream = torch.randn(per_core.shape, generator=generator)
    got = torch.autograd.grad((selection.scores * upstream).sum(), [s_row, s_col, cores])
    want = torch.autograd.grad((per_core * upstream).sum(), [s_row, s_col, cores])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pair_scores_custom_backward_matches_einsum_autograd(dtype) -> None:
    """The per-core scores' own backward (the cores' gradient reduced token by token) against autograd through the
    einsum, computed in float64: each gradient in its input's dtype, equal to rounding."""
    generator = torch.Generator().manual_seed(6)
    f_row, f_col = (torch.randn(300, 2, 2, 16, generator=generator) for _ in range(2))
    cores = torch.rand(2, 3, 2, 2, generator=generator)
    upstream = torch.randn(3, 300, 2, 16, generator=generator)
    inputs = [x.to(dtype).requires_grad_() for x in (f_row, f_col, cores)]
    got = torch.autograd.grad(pair_scores(*inputs), inputs, upstream.to(dtype))
    exact = [x.detach().double().requires_grad_() for x in inputs]
    want = torch.autograd.grad(torch.einsum("tjxm,jixy,tjym->itjm", exact[0], exact[2], exact[1]), exact,
                               upstream.to(dtype).double())
    tolerance = 1e-12 if dtype == torch.float64 else 2e-2
    for g, w, x in zip(got, want, inputs):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.double(), w, rtol=tolerance, atol=tolerance * w.abs().max().item())


def test_core_factors_keep_the_previous_sign_and_are_deterministic_at_step_0() -> None:
    generator = torch.Generator().manual_seed(3)
    cores = torch.randn(4, 2, 3, 3, generator=generator)
    u, t = factors_of(cores)
    assert torch.all(u.sum(-1) + t.sum(-1) >= 0)
    summed = cores.sum(1)
    sigma = torch.linalg.svdvals(summed)[:, 0]
    torch.testing.assert_close(torch.einsum("jr,jrs,js->j", u, summed, t), sigma)
    flipped = tdqkr_core_factors(cores, -u, -t)
    torch.testing.assert_close(flipped.row, -u)
    torch.testing.assert_close(flipped.col, -t)
    positive = torch.rand(2, 1, 3, 3, generator=generator)
    pu, pt = factors_of(positive)
    assert torch.all(pu >= 0) and torch.all(pt >= 0)


def rotated_cores(singular_values: list[list[float]], num_cores: int, generator: torch.Generator) -> torch.Tensor:
    """[H, h, r, r] whose sum is Q1 diag(sigma) Q2^T (known singular values), split evenly over h cores."""
    heads, rank = len(singular_values), len(singular_values[0])
    q1 = torch.linalg.qr(torch.randn(heads, rank, rank, generator=generator)).Q
    q2 = torch.linalg.qr(torch.randn(heads, rank, rank, generator=generator)).Q
    summed = q1 @ torch.diag_embed(torch.tensor(singular_values)) @ q2.transpose(-1, -2)
    return (summed / num_cores).unsqueeze(1).repeat(1, num_cores, 1, 1)


def aux_loss(cores: torch.Tensor) -> torch.Tensor:
    """The aux loss with the singular basis taken from these cores, as a refresh before the forward gives it."""
    zeros = torch.zeros(cores.shape[0], cores.shape[-1])
    return tdqkr_aux_loss(cores, tdqkr_core_factors(cores, zeros, zeros).right_basis, coeff=0.001, tau=0.15)


def test_aux_loss_matches_svdvals_in_value_and_gradient() -> None:
    """Against the loss written with torch.linalg.svdvals (whose gradient is u_i v_i^T), on random cores."""
    cores = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cores.requires_grad_(True)
    got = aux_loss(cores)
    excess = torch.relu(torch.linalg.svdvals(cores.sum(1))[:, 1:] - 0.15)
    want = 0.001 / 3 * excess.pow(2).sum(-1).mean()
    assert want.item() > 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, cores)[0], torch.autograd.grad(want, cores)[0])


def test_aux_loss_is_zero_when_non_leading_singular_values_are_under_tau() -> None:
    cores = rotated_cores([[2.0, 0.1, 0.05], [1.0, 0.14, 0.0]], 2, torch.Generator().manual_seed(0))
    cores.requires_grad_(True)
    loss = aux_loss(cores)
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, cores)[0]) == 0


def test_aux_loss_value_and_gradient_push_the_excess_singular_values_down() -> None:
    sigmas = [[2.0, 0.9, 0.4], [1.0, 0.5, 0.1]]
    cores = rotated_cores(sigmas, 2, torch.Generator().manual_seed(1)).requires_grad_(True)
    loss = aux_loss(cores)
    by_hand = 0.001 / 2 * (((0.9 - 0.15) ** 2 + (0.4 - 0.15) ** 2) + (0.5 - 0.15) ** 2) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, cores)
    with torch.no_grad():
        stepped = cores - 50.0 * grad
    before, after = torch.linalg.svdvals(cores.detach().sum(1)), torch.linalg.svdvals(stepped.sum(1))
    assert torch.all(after[0, 1:] < before[0, 1:]) and after[1, 1] < before[1, 1]
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert after[1, 2].item() == pytest.approx(before[1, 2].item(), abs=1e-6)
