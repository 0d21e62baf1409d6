"""Appendix A's improved initialisation: the Monte-Carlo E[y] and the value variance, plus seed derivation."""

from __future__ import annotations

import functools
import hashlib

import torch

from umtrain.config.schema import MemoryConfig

_DRAW_CHUNK = 1 << 20
_MIN_TOTAL_DRAWS = 1 << 22


def derive_seed(seed: int, layer_index: int, purpose: str) -> int:
    """A 63-bit seed from (seed, layer, purpose), identical in every process (unlike Python's hash)."""
    digest = hashlib.sha256(f"{seed}:{layer_index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=None)
def expected_top_m_mean(num_draws: int, top_m: int, seed: int = 0) -> float:
    """E[y]: the mean of the top-m of `num_draws` iid N(0,1) draws, by Monte Carlo (App. A).

    Draws in chunks with a running top-m, so memory stays O(chunk) even for the 12.85 M virtual values of
    UltraMem-1.6B; small populations are repeated until at least 2^22 draws in total have been averaged.
    """
    if not 1 <= top_m <= num_draws:
        raise ValueError(f"top_m={top_m} must be in [1, num_draws={num_draws}]")
    generator = torch.Generator().manual_seed(seed)
    trials = max(1, -(-_MIN_TOTAL_DRAWS // num_draws))
    means = []
    for _ in range(trials):
        best = torch.empty(0, dtype=torch.float64)
        for start in range(0, num_draws, _DRAW_CHUNK):
            chunk = torch.randn(min(_DRAW_CHUNK, num_draws - start), generator=generator, dtype=torch.float64)
            merged = torch.cat([best, chunk])
            best = merged.topk(min(top_m, merged.numel())).values
        means.append(best.mean())
    return float(torch.stack(means).mean())


def score_population(config: MemoryConfig) -> int:
    """n_draw for E[y] (the spec's open conflict 3), chosen by `config.init_score_population`."""
    return {
        "virtual": config.ive_expansion * config.num_values,
        "physical": config.num_values,
        "keys": config.keys_per_side,
        "grid": config.candidates ** 2,
    }[config.init_score_population]


def improved_value_variance(config: MemoryConfig, num_layers: int, mean_square_score: float) -> float:
    """Var(V) = E / (2 L K E[s^2]) with K = H m, so the memory output has an MLP's variance 1/(2L) (App. A).

    App. A assumes E[s^2] = 1 (E/(2 m H L)); `mean_square_score` is the measured E[s^2] of the per-core weights
    at init, which also absorbs the MCS 1/h^2 and the bilinear TDQKR score scale (spec 2.6).
    """
    activated = config.num_heads * config.topk
    return config.ive_expansion / (2.0 * num_layers * activated * mean_square_score)
