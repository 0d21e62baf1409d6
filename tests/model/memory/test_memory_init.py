"""App. A pieces: the Monte-Carlo E[y] against brute force and the spec's values, n_draw choices, value variance."""

from __future__ import annotations

import pytest
import torch

from umtrain.config.base import ConfigError
from umtrain.config.schema import MemoryConfig
from umtrain.model.memory.init import derive_seed, expected_top_m_mean, improved_value_variance


def test_expected_top_m_mean_matches_brute_force_sampling() -> None:
    generator = torch.Generator().manual_seed(0)
    for num_draws, top_m in [(256, 16), (1000, 3)]:
        draws = torch.randn(4000, num_draws, generator=generator, dtype=torch.float64)
        brute = draws.topk(top_m, dim=-1).values.mean().item()
        assert expected_top_m_mean(num_draws, top_m) == pytest.approx(brute, abs=0.01)


@pytest.mark.parametrize("num_draws,top_m,spec_value", [
    (256, 16, 1.95), (4_840_000, 16, 4.70), (12_850_000, 42, 4.71), (1_210_000, 16, 4.41), (1764, 42, 2.35)])
def test_expected_top_m_mean_reproduces_the_spec_reference_values(num_draws, top_m, spec_value) -> None:
    assert expected_top_m_mean(num_draws, top_m) == pytest.approx(spec_value, abs=0.01)


def test_score_population_follows_the_config_choice() -> None:
    config = MemoryConfig(num_values=1024, ive_expansion=4, topk=8, num_candidates=10)
    expected = {"virtual": 4096, "physical": 1024, "keys": 64, "grid": 100}
    for choice, n_draw in expected.items():
        config.init_score_population = choice
        assert config.init_score_draws == n_draw
    config.sign_aware_candidates = True
    assert config.init_score_draws == 20 * 20


@pytest.mark.parametrize("population,topk,num_candidates", [("keys", 9, 4), ("grid", 9, 4), ("grid", 1, 1)])
def test_a_population_too_small_for_top_m_is_refused(population, topk, num_candidates) -> None:
    """keys: n = 16 draws for m = 9; grid: 16 draws for m = 9, or 1 draw for m = 1 (E[y] = 0 there)."""
    config = MemoryConfig(num_values=64, ive_expansion=4, topk=topk, num_candidates=num_candidates,
                          init_score_population=population)
    with pytest.raises(ConfigError, match=rf"memory.init_score_population: '{population}' gives E\[y\] over "):
        config.validate("memory")
    config.improved_init = False
    config.validate("memory")


def test_improved_value_variance_is_app_a_when_scores_have_unit_second_moment() -> None:
    config = MemoryConfig(num_values=1024, ive_expansion=4, topk=16, num_heads=2)
    assert improved_value_variance(config, num_layers=12, mean_square_score=1.0) == pytest.approx(4 / (2 * 16 * 2 * 12))
    assert improved_value_variance(config, 12, 0.25) == pytest.approx(4 * 4 / (2 * 16 * 2 * 12))


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(1, 2, "init") == derive_seed(1, 2, "init")
    assert len({derive_seed(1, 2, "init"), derive_seed(1, 3, "init"), derive_seed(2, 2, "init"),
                derive_seed(1, 2, "ive-permutation")}) == 4
    assert 0 <= derive_seed(123, 4, "x") < 2 ** 63
