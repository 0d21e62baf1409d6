"""Appendix A's improved initialisation: the Monte-Carlo E[y] and the value variance, plus seed derivation.
n_draw for E[y] is `MemoryConfig.init_score_draws`."""

from __future__ import annotations

import functools
import hashlib

import torch

from umtrain.config.schema import MemoryConfig


def derive_seed(seed: int, layer_index: int, purpose: str) -> int:
    """A 63-bit seed from (seed, layer, purpose), identical in every process (unlike Python's hash)."""
    digest = hashlib.sha256(f"{seed}:{layer_index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=None)
def expected_top_m_mean(num_draws: int, top_m: int, trials: int = 1 << 16, seed: int = 0) -> float:
    """E[y]: the mean of the top-m of `num_draws` iid N(0,1) draws, by Monte Carlo (App. A).

    Each trial samples the top-m order statistics exactly in O(m), whatever the population (Renyi's
    representation): the k-th smallest of n uniforms is (E_1 + ... + E_k) / (E_1 + ... + E_m + G) with E_j ~ Exp(1)
    and G ~ Gamma(n + 1 - m), and the k-th largest normal is -ndtri of it. So the 12.85 M virtual values of
    UltraMem-1.6B cost the same as 256, and 2^16 trials put the Monte-Carlo error near 1e-4.
    """
    if not 1 <= top_m <= num_draws:
        raise ValueError(f"top_m={top_m} must be in [1, num_draws={num_draws}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spacings = torch.empty(trials, top_m, dtype=torch.float64).exponential_()
        rest = torch.distributions.Gamma(torch.tensor(float(num_draws + 1 - top_m), dtype=torch.float64),
                                         torch.tensor(1.0, dtype=torch.float64)).sample((trials, 1))
    smallest_uniforms = spacings.cumsum(-1) / (spacings.sum(-1, keepdim=True) + rest)
    return float(-torch.special.ndtri(smallest_uniforms).mean())


def improved_value_variance(config: MemoryConfig, num_layers: int, mean_square_score: float) -> float:
    """Var(V) = E / (2 L K E[s^2]) with K = H m, so the memory output has an MLP's variance 1/(2L) (App. A).

    App. A assumes E[s^2] = 1 (E/(2 m H L)); `mean_square_score` is the measured E[s^2] of the per-core weights
    at init, which also absorbs the MCS 1/h^2 and the bilinear TDQKR score scale (spec 2.6).
    """
    activated = config.num_heads * config.topk
    return config.ive_expansion / (2.0 * num_layers * activated * mean_square_score)
