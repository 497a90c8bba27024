"""Tests of fedjax_llm.privacy.audit: one-run epsilon lower bounds and membership inference."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize, special, stats

from fedjax_llm.privacy.audit import (
    canary_audit,
    epsilon_lower_bound,
    membership_inference,
    one_run_p_value,
)


def _binom_tail(r: int, v: int, eps: float) -> float:
    return stats.binom.sf(v - 1, r, special.expit(eps))


def _appendix_d_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The p-value as a plain loop (Steinke et al. 2023, Appendix D)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("r,v", [(10, 10), (20, 18), (50, 40), (100, 70), (300, 200)])
def test_pure_dp_bound_matches_scipy(r, v):
    eps = epsilon_lower_bound(r, v, confidence=0.95)
    # The largest eps with P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= 0.05, by brentq.
    root = optimize.brentq(lambda e: _binom_tail(r, v, e) - 0.05, 0.0, 50.0, xtol=1e-12)
    assert eps == pytest.approx(root, abs=1e-7)
    assert _binom_tail(r, v, eps) < 1 - 0.95  # The level as the code computes it.


@pytest.mark.parametrize("m,r,v,delta", [(100, 40, 38, 1e-3), (1000, 200, 160, 1e-5)])
def test_approximate_dp_bound_matches_appendix_d(m, r, v, delta):
    eps = epsilon_lower_bound(r, v, delta=delta, confidence=0.9, num_canaries=m)
    assert one_run_p_value(r, v, eps, delta, m) == pytest.approx(
        _appendix_d_p_value(m, r, v, eps, delta), rel=1e-9
    )
    assert _appendix_d_p_value(m, r, v, eps, delta) < 0.1
    assert _appendix_d_p_value(m, r, v, eps + 1e-6, delta) >= 0.1
    assert 0 < eps < epsilon_lower_bound(r, v, confidence=0.9)  # delta > 0 weakens the bound.


def test_extreme_guess_counts():
    perfect = epsilon_lower_bound(1000, 1000)
    assert perfect == pytest.approx(math.log(1000 / math.log(20)), rel=1e-3)  # q^r = 0.05.
    assert perfect > 5
    assert epsilon_lower_bound(1000, 500) < 1e-6
    assert epsilon_lower_bound(1000, 0) == 0.0 and epsilon_lower_bound(0, 0) == 0.0
    assert epsilon_lower_bound(100, 90, confidence=0.99) < epsilon_lower_bound(100, 90)
    with pytest.raises(ValueError, match="num_canaries"):
        epsilon_lower_bound(100, 90, delta=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        epsilon_lower_bound(10, 11)


def test_canary_audit_counts_guesses():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    result = canary_audit(scores, included, 2)
    # "in": canaries 0 (right) and 1 (wrong); "out": 4 (right) and 5 (wrong).
    assert (result.num_guesses, result.num_correct, result.num_guesses_each_side) == (4, 2, 2)
    assert result.epsilon_lower_bound == epsilon_lower_bound(4, 2)
    with pytest.raises(ValueError, match="2k must be"):
        canary_audit(scores, included, 4)
    with pytest.raises(ValueError, match="equal length"):
        canary_audit(scores, included[:3], 1)


def test_canary_audit_grid_splits_confidence():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included + 0.5 * rng.standard_normal(400)
    result = canary_audit(scores, included, [20, 50, 100], confidence=0.95)
    single = epsilon_lower_bound(
        result.num_guesses, result.num_correct, confidence=1 - 0.05 / 3, num_canaries=400
    )
    assert result.epsilon_lower_bound == single
    alone = canary_audit(scores, included, result.num_guesses_each_side)
    assert alone.epsilon_lower_bound > result.epsilon_lower_bound  # The grid costs confidence.


def _gaussian_canaries(seed: int, m: int, noise_multiplier: float):
    """Canaries released by a Gaussian mechanism: each coordinate is 1[included] + z N(0, 1)."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return included + noise_multiplier * rng.standard_normal(m), included


def test_canary_audit_is_sound_and_flags_a_weakened_mechanism():
    z, delta, m = 2.0, 1e-5, 1000
    eps0 = dp_accounting.get_epsilon_gaussian(z, delta)  # The exact epsilon, about 1.99.
    grid = [50, 100, 200, 300]
    for seed in range(4):
        scores, included = _gaussian_canaries(seed, m, z)
        audit = canary_audit(scores, included, grid, delta=delta)
        assert audit.epsilon_lower_bound <= eps0
        # The weakened mechanism (a tenth of the noise) is caught: its bound exceeds eps0.
        scores, included = _gaussian_canaries(seed, m, z / 10)
        audit = canary_audit(scores, included, grid, delta=delta)
        assert audit.epsilon_lower_bound > eps0


def test_membership_inference():
    rng = np.random.default_rng(0)
    same = membership_inference(rng.standard_normal(4000), rng.standard_normal(4000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    assert same["advantage"] < 0.06 and same["tpr_at_1pct_fpr"] < 0.05
    apart = membership_inference(rng.standard_normal(500) + 20, rng.standard_normal(500))
    assert apart == {
        "auc": 1.0,
        "advantage": 1.0,
        "balanced_accuracy": 1.0,
        "tpr_at_1pct_fpr": 1.0,
        "tpr_at_10pct_fpr": 1.0,
    }
    assert membership_inference([1.0, 1.0], [1.0, 1.0])["auc"] == 0.5  # Ties count half.
    s_in, s_out = rng.integers(0, 5, 60).astype(float), rng.integers(0, 4, 70).astype(float)
    pairs = s_in[:, None] - s_out[None, :]
    brute = np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0)
    result = membership_inference(s_in, s_out)
    assert result["auc"] == pytest.approx(brute)
    tpr = [np.mean(s_in >= t) for t in range(6)]
    fpr = [np.mean(s_out >= t) for t in range(6)]
    assert result["advantage"] == pytest.approx(max(a - b for a, b in zip(tpr, fpr, strict=True)))
