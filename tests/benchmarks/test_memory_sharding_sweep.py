"""The verdict of benchmarks/memory_sharding_sweep.py: the sign test, the paired verdict between two modes, the
regret and the per-run scores, checked against hand-computed values (no process groups)."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks.helpers import benchmark_module
from umtrain.parallel.cost_model import Calibration


@pytest.fixture(scope="module")
def sweep():
    with benchmark_module("memory_sharding_sweep") as module:
        yield module


def test_sign_test_by_hand(sweep):
    assert sweep.sign_test_p(9, 1) == pytest.approx(2 * (1 + 10) / 2 ** 10)
    assert sweep.sign_test_p(1, 9) == sweep.sign_test_p(9, 1)
    assert sweep.sign_test_p(8, 0) == pytest.approx(2 / 2 ** 8)           # the fewest samples resolving at 0.01
    assert sweep.sign_test_p(7, 0) == pytest.approx(2 / 2 ** 7)
    assert sweep.sign_test_p(5, 5) == 1.0                                  # capped: 2 * 638 / 1024 > 1
    assert sweep.sign_test_p(0, 0) == 1.0


def test_paired_verdict_resolves_a_consistent_difference(sweep):
    verdict = sweep.paired_verdict("number", [1.0] * 8, "dimension", [2.0] * 8)
    assert (verdict.faster, verdict.slower) == ("number", "dimension")
    assert verdict.log_ratio == pytest.approx(math.log(2))
    assert verdict.p_value == pytest.approx(2 / 2 ** 8) and verdict.resolved
    assert verdict.regret("number") == 0.0
    assert verdict.regret("dimension") == pytest.approx(1.0)               # twice the faster mode's time


def test_paired_verdict_leaves_a_split_indistinguishable(sweep):
    """Ratios log 1.5, log 0.75, log 1.5, log 0.75, log 1.5: the median says the first by 50%, the signs split 3:2."""
    verdict = sweep.paired_verdict("pooled", [1.0, 2.0, 1.0, 2.0, 1.0], "dimension", [1.5] * 5)
    assert verdict.faster == "pooled" and verdict.log_ratio == pytest.approx(math.log(1.5))
    assert verdict.p_value == 1.0 and not verdict.resolved
    assert verdict.regret("dimension") == pytest.approx(0.5)


def test_paired_verdict_estimators_differ_on_one_lucky_repetition(sweep):
    """First mode: 1 s once, then 3 s eleven times; second: 2 s throughout. The median ratio says the second is
    faster by 50% (11 of 12 signs, p = 2 * 13 / 4096); the ratio of minima says the first, by 100%, against the
    signs, so it is not resolved."""
    first, second = [1.0] + [3.0] * 11, [2.0] * 12
    median = sweep.paired_verdict("number", first, "dimension", second, "median")
    assert median.faster == "dimension" and median.log_ratio == pytest.approx(math.log(1.5))
    assert median.p_value == pytest.approx(2 * 13 / 4096) and median.resolved
    minima = sweep.paired_verdict("number", first, "dimension", second, "minima")
    assert minima.faster == "number" and minima.log_ratio == pytest.approx(math.log(2))
    assert minima.p_value == median.p_value and not minima.resolved


def test_paired_verdict_needs_paired_samples(sweep):
    with pytest.raises(ValueError, match="paired samples"):
        sweep.paired_verdict("number", [1.0, 2.0], "dimension", [1.0])
    with pytest.raises(ValueError, match="paired samples"):
        sweep.paired_verdict("number", [], "dimension", [])


def _row(number: list[float], pooled: list[float], dimension: list[float], **point) -> dict:
    point = {"P": 2, "tokens": 8, "topk": 4, "E": 1, "d_v": 16, **point}
    times = {"number": number, "pooled": pooled, "dimension": dimension}
    return {**point, **{f"samples_{v}": t for v, t in times.items()},
            **{f"measured_{v}": min(t) for v, t in times.items()}}


def test_judge_weighs_the_predicted_number_wise_variant_against_dimension(sweep):
    row = _row([1.0] * 8, [4.0] * 8, [2.0] * 8)
    variant, choice, verdict = sweep.judge(row, {"number": 3.0, "pooled": 2.0, "dimension": 1.0})
    assert (variant, choice) == ("pooled", "dimension")            # rows never enter: the model preferred pooled
    assert verdict.faster == "dimension" and verdict.regret(choice) == 0.0
    variant, choice, verdict = sweep.judge(row, {"number": 1.0, "pooled": 2.0, "dimension": 3.0})
    assert (variant, choice, verdict.faster) == ("number", "number", "number")


def test_summarize_and_accuracy_by_hand(sweep):
    """Three points; every model predicts rows fastest. Point 1: rows faster, resolved. Point 2: dimension faster
    by 20% at every repetition, resolved: a miss with regret 0.2. Point 3: a 3:2 split of signs (median 5%):
    indistinguishable, a miss with regret 0.05."""
    rows = [_row([1.0] * 8, [9.0] * 8, [2.0] * 8),
            _row([1.2] * 8, [9.0] * 8, [1.0] * 8),
            _row([1.05, 0.9, 1.05, 0.9, 1.05], [9.0] * 5, [1.0] * 5)]
    for row in rows:
        row.update({f"{kind}_{v}": t for kind in ("predicted", "comm") for v, t in
                    (("number", 1.0), ("pooled", 3.0), ("dimension", 2.0))})
    judged = sweep.summarize(rows, Calibration(alpha_s=1.0, beta_s_per_byte=1e-15))   # refit: fewest calls wins
    assert [r["choice"] for r in judged] == ["number"] * 3
    assert [r["correct"] for r in judged] == [True, False, False]
    assert [r["regret"] for r in judged] == pytest.approx([0.0, 0.2, 0.05])
    expected = {"points": 3, "correct": 1, "resolved": 2, "resolved_correct": 1, "indistinguishable": 1,
                "regret_mean": pytest.approx(0.25 / 3), "regret_max": pytest.approx(0.2)}
    assert sweep.accuracy(judged) == expected
    assert sweep.accuracy(judged, "comm_") == expected
    assert judged[0]["refit_choice"] == "number"                   # 4 collectives against 5 (dimension) and 7


def test_label_agreement_and_pooled_verdict_by_hand(sweep):
    """Two runs of one point. Rows vs dimension: rows faster by 2x in both runs (resolved in both). Pooled vs
    dimension: dimension faster in run 1 (resolved), pooled by a 3:2 split in run 2 (not resolved)."""
    run1 = _row([1.0] * 8, [3.0] * 8, [2.0] * 8)
    run2 = _row([1.0] * 8, [1.9, 2.2, 1.9, 2.2, 1.9, 2.2, 1.9, 1.9], [2.0] * 8)
    runs = []
    for row in (run1, run2):
        row.update({f"{kind}_{v}": t for kind in ("predicted", "comm") for v, t in
                    (("number", 1.0), ("pooled", 3.0), ("dimension", 2.0))})
        runs.append(sweep.summarize([row], Calibration(alpha_s=1.0, beta_s_per_byte=1e-15)))
    agreement = sweep.label_agreement(runs)
    assert agreement["median"] == {"labels": 2, "same": 1, "resolved_in_both": 1, "same_resolved": 1,
                                   "model_pair": 1, "model_pair_same": 1}          # the model weighed rows
    pooled = sweep.pooled_accuracy(runs)
    # 16 paired samples of rows vs dimension, all for rows: both runs' choice (rows) is right and resolved
    assert pooled["full"] == {"choices": 2, "correct": 2, "resolved": 2, "resolved_correct": 2}
