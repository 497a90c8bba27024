"""Empirical privacy audits: one-run epsilon lower bounds and membership-inference summaries.

An accountant (`fedjax_llm.privacy.accounting`) gives an upper bound on epsilon that holds if
the implementation does what the analysis assumes. An audit gives a lower bound from what a
trained model reveals: if the lower bound exceeds the accountant's epsilon, the implementation
(or the analysis) is wrong.

`epsilon_lower_bound` and `canary_audit` implement the one-run audit of Steinke, Nasr and
Jagielski (2023): ``m`` canaries are each included in training independently with probability
1/2; after one run the auditor guesses "in" or "out" for ``r`` of them (abstaining on the
rest) and gets ``v`` right. An ``(eps, delta)``-DP run cannot make ``v`` much larger than
``Binomial(r, e^eps / (1 + e^eps))``; the largest eps that the observed ``v`` rejects at the
chosen confidence is a lower bound on the run's epsilon. `membership_inference` summarizes a
loss-based membership-inference attack (AUC, advantage, TPR at low FPR).

References:
  Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run", NeurIPS,
  arXiv:2305.08846.
  Carlini et al. 2022, "Membership Inference Attacks From First Principles" (TPR at low FPR).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import special, stats

_GRID_POINTS = 128  # Grid that locates the first crossing of the p-value when delta > 0.
_BISECTION_STEPS = 50


def _check_int(name: str, x: object, low: int = 0) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < low:
        raise ValueError(f"{name}={x!r} must be an integer >= {low}.")
    return int(x)


def one_run_p_value(
    num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0, num_canaries: int = 0
) -> float:
    """The p-value of ``num_correct`` right guesses if the run were ``(epsilon, delta)``-DP.

    With ``W ~ Binomial(r, q)``, ``q = e^eps / (1 + e^eps)`` (the accuracy of eps-DP randomized
    response), the p-value is ``P[W >= v] + 2 m delta max_{i=1..v} P[v - i <= W < v] / i``,
    clipped to 1 (Steinke et al. 2023, Theorem 3; the paper's Appendix D computes it as
    ``p_value_DP_audit``). For ``delta = 0`` it is ``P[W >= v]``.

    Args:
      num_guesses: ``r``, the guesses made (abstentions excluded).
      num_correct: ``v``, the right ones.
      epsilon: the hypothesized epsilon, >= 0.
      delta: the hypothesized delta, in [0, 1).
      num_canaries: ``m``, all canaries (guessed or not); needed when ``delta > 0``.

    Returns:
      The p-value in [0, 1].

    Raises:
      ValueError: for counts or parameters out of range.
    """
    r = _check_int("num_guesses", num_guesses)
    v = _check_int("num_correct", num_correct)
    m = _check_int("num_canaries", num_canaries)
    if v > r:
        raise ValueError(f"num_correct={v} exceeds num_guesses={r}.")
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0.")
    if not 0 <= delta < 1:
        raise ValueError(f"delta={delta!r} must be in [0, 1).")
    if delta > 0 and m < r:
        raise ValueError(f"num_canaries={m} must be >= num_guesses={r} when delta > 0.")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[W >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= W < v] = P[W >= v - i] - P[W >= v].
    window = stats.binom.sf(v - i - 1, r, q) - beta
    alpha = float(np.max(window / i))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    num_canaries: int | None = None,
) -> float:
    """The one-run audit's lower bound on epsilon (Steinke, Nasr, Jagielski 2023).

    The largest ``eps`` such that every ``eps' <= eps`` is rejected at the given confidence,
    i.e. ``one_run_p_value(r, v, eps', delta, m) < 1 - confidence`` (Theorem 3 of the paper,
    and its Appendix D's ``get_eps_audit``): with probability at least ``confidence`` over the
    canaries' inclusion, the run is not ``(eps', delta)``-DP for any ``eps' <= eps``. For
    ``delta = 0`` this is the largest eps with ``P[Binomial(r, e^eps / (1 + e^eps)) >= v] <=
    1 - confidence`` (the p-value is increasing in eps), found by bisection. For ``delta > 0``
    the first crossing is located on a grid of 128 points before the bisection, since the
    delta term is not known to be monotone in eps.

    Args:
      num_guesses: ``r``, the canaries guessed "in" or "out" (abstentions excluded).
      num_correct: ``v``, the right guesses, ``0 <= v <= r``.
      delta: the delta at which epsilon is audited, in [0, 1); 0 gives the pure-DP bound.
      confidence: the confidence level, in (0, 1).
      num_canaries: ``m``, all canaries including those abstained on (>= r); required when
        ``delta > 0`` (the delta term grows with m).

    Returns:
      The lower bound (>= 0, to about 1e-12; 0.0 when the guesses reject nothing).

    Raises:
      ValueError: for counts or levels out of range.

    References:
      Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run", NeurIPS.
    """
    r = _check_int("num_guesses", num_guesses)
    v = _check_int("num_correct", num_correct)
    if v > r:
        raise ValueError(f"num_correct={v} exceeds num_guesses={r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    if not 0 <= delta < 1:
        raise ValueError(f"delta={delta!r} must be in [0, 1).")
    if num_canaries is None:
        if delta > 0:
            raise ValueError("num_canaries (m, all canaries) is required when delta > 0.")
        m = r
    else:
        m = _check_int("num_canaries", num_canaries)
        if m < r:
            raise ValueError(f"num_canaries={m} is below num_guesses={r}.")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(r, v, eps, delta, m) < level

    if v == 0 or not rejected(0.0):
        return 0.0
    hi = 1.0
    while rejected(hi):
        hi *= 2
        if hi > 1e3:  # Unreachable for finite counts; a guard against a broken p-value.
            raise RuntimeError("the one-run p-value did not reach the level; report a bug.")
    lo = 0.0
    if delta > 0:
        # The first grid point that is not rejected bounds the first crossing from above.
        grid = np.linspace(0.0, hi, _GRID_POINTS + 1)
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            if not rejected(float(b)):
                lo, hi = float(a), float(b)
                break
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


class CanaryAudit(NamedTuple):
    """The outcome of `canary_audit`.

    Attributes:
      num_guesses: ``r``, canaries guessed (``2k``).
      num_correct: ``v``, right guesses.
      epsilon_lower_bound: the audited lower bound on epsilon.
      num_guesses_each_side: ``k``, the number guessed "in" (and "out") that was used.
    """

    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float
    num_guesses_each_side: int


def canary_audit(
    scores: np.ndarray,
    included: np.ndarray,
    num_guesses_each_side: int | Sequence[int],
    confidence: float = 0.95,
    delta: float = 0.0,
) -> CanaryAudit:
    """One-run audit from canary membership scores (Steinke et al. 2023).

    Guesses "in" for the ``k`` canaries with the highest scores and "out" for the ``k`` with
    the lowest, and abstains on the rest (ties broken by canary index). Each canary must have
    been included in training independently with probability 1/2, and the scores must be
    computed from the trained model (and public data) without looking at ``included``.

    A sequence of ``k`` values is a grid: each ``k`` is audited at confidence
    ``1 - (1 - confidence) / len(grid)`` and the largest bound is returned, which holds at
    ``confidence`` by a union bound over the grid. Choose ``k`` (or the grid) before looking at
    the results.

    Args:
      scores: ``[m]`` membership scores; higher means "more likely included" (e.g. minus the
        loss).
      included: ``[m]`` bool, whether each canary was included.
      num_guesses_each_side: ``k`` (``2k <= m``), or a grid of them.
      confidence: the confidence level, in (0, 1).
      delta: the delta at which epsilon is audited (0: pure DP).

    Returns:
      The guesses, right guesses and lower bound of the chosen ``k``.

    Raises:
      ValueError: for mismatched shapes, non-finite scores or a ``k`` out of range.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError(
            f"scores {scores.shape} and included {included.shape} must be 1-D of equal length."
        )
    if included.dtype != np.bool_:
        raise ValueError(f"included must be boolean, got dtype {included.dtype}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    m = scores.shape[0]
    grid = (
        [num_guesses_each_side]
        if isinstance(num_guesses_each_side, numbers.Integral)
        else list(num_guesses_each_side)
    )
    if not grid:
        raise ValueError("num_guesses_each_side is an empty grid.")
    for k in grid:
        _check_int("num_guesses_each_side", k)
        if 2 * k > m:
            raise ValueError(f"num_guesses_each_side={k}: 2k must be <= {m} (the canaries).")
    level = (1.0 - confidence) / len(grid)
    order = np.argsort(-scores, kind="stable")  # Highest first.
    ranked_in = included[order]
    best: CanaryAudit | None = None
    for k in grid:
        k = int(k)
        v = int(np.sum(ranked_in[:k])) + int(np.sum(~ranked_in[m - k :]))
        eps = epsilon_lower_bound(2 * k, v, delta, 1.0 - level, num_canaries=m)
        if best is None or eps > best.epsilon_lower_bound:
            best = CanaryAudit(2 * k, v, eps, k)
    assert best is not None
    return best


def membership_inference(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    """Summary of a threshold membership-inference attack.

    The attack predicts "member" when a score is at least a threshold; scores are higher for
    likelier members, so for a loss-based attack pass minus the loss.

    Args:
      scores_in: scores of members (examples trained on).
      scores_out: scores of non-members.

    Returns:
      ``auc``: the ROC AUC, ``P[s_in > s_out] + P[s_in = s_out] / 2`` (Mann-Whitney U);
      ``advantage``: ``max_t TPR - FPR`` (membership advantage, Yeom et al. 2018);
      ``balanced_accuracy``: ``(1 + advantage) / 2``, the best balanced accuracy;
      ``tpr_at_1pct_fpr`` and ``tpr_at_10pct_fpr``: the best TPR with FPR at most 1% / 10%.

    Raises:
      ValueError: for empty or non-finite scores.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("scores_in and scores_out must both be non-empty.")
    if not (np.all(np.isfinite(s_in)) and np.all(np.isfinite(s_out))):
        raise ValueError("scores must be finite.")
    n_in, n_out = s_in.size, s_out.size
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))  # Ties get the average rank.
    auc = (float(np.sum(ranks[:n_in])) - n_in * (n_in + 1) / 2) / (n_in * n_out)
    # ROC over every threshold (a score value) plus "nothing predicted member".
    thresholds = np.unique(np.concatenate([s_in, s_out]))
    tpr = (n_in - np.searchsorted(np.sort(s_in), thresholds, side="left")) / n_in
    fpr = (n_out - np.searchsorted(np.sort(s_out), thresholds, side="left")) / n_out
    tpr = np.concatenate([tpr, [0.0]])
    fpr = np.concatenate([fpr, [0.0]])
    advantage = float(np.max(tpr - fpr))

    def tpr_at(max_fpr: float) -> float:
        return float(np.max(tpr[fpr <= max_fpr + 1e-12]))

    return {
        "auc": float(auc),
        "advantage": advantage,
        "balanced_accuracy": 0.5 * (1.0 + advantage),
        "tpr_at_1pct_fpr": tpr_at(0.01),
        "tpr_at_10pct_fpr": tpr_at(0.10),
    }
