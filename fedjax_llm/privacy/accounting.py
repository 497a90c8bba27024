"""Client-level privacy accounting for DP federated averaging, on top of `dp_accounting`.

Each round of DP-FedAvg samples a cohort of clients, clips every client's model update to L2
norm ``C`` (``privacy.clip_norm``), sums the clipped updates and adds Gaussian noise of
standard deviation ``z * C`` (``z`` = ``privacy.noise_multiplier``). The round is a subsampled
Gaussian mechanism over clients, and a run of ``R`` rounds is its ``R``-fold adaptive
composition. This module turns such a plan into a `dp_accounting` `DpEvent`, computes the
run's epsilon at a given delta with the RDP or the PLD accountant, calibrates the noise
multiplier for a target epsilon, and keeps the run's ledger (`PrivacyAccountant`) in a form
that a checkpoint can store as JSON.

Two sampling schemes can be accounted:

* ``poisson``: every client joins a round independently with probability ``q``. The neighbouring
  relation is add-or-remove-one client; adding a client changes the noised sum by at most
  ``C``, so the Gaussian's multiplier relative to the sensitivity is ``z``.
* ``fixed``: exactly ``m`` of the ``N`` clients, uniformly without replacement (the
  ``uniform`` sampler of `fedjax_llm.sampling`). Amplification by sampling without replacement
  needs the replace-one relation (``N`` is public), under which the sum of clipped updates has
  L2 sensitivity ``2C``: the multiplier relative to the sensitivity, which is what
  `dp_accounting` expects, is ``z / 2``. Its epsilon is one of replace-one privacy, which
  is not the same guarantee as the add-or-remove epsilon of Poisson sampling.

The module itself uses only `dp_accounting` (numpy, scipy), no JAX, so a user can check a
plan before a run without compiling anything.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD, moments accountant).
  McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
  Models" (client-level DP-FedAvg; delta = 1 / N**1.1).
  Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism".
  Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential Privacy and Analytical
  Moments Accountant" (sampling without replacement, replace-one).
  Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
  Clipping".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

from fedjax_llm.config import ConfigError


class _DropExcludedOrders(logging.Filter):
    """Drops dp_accounting's warning that an RDP order whose series did not converge is left
    out: leaving orders out only makes the reported epsilon an (equally valid) upper bound over
    fewer orders, and at large sampling rates it floods every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order from the epsilon computation" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropExcludedOrders())

ACCOUNTANTS = ("rdp", "pld")
SAMPLING_KINDS = ("poisson", "fixed")

# The search range of `noise_multiplier_for_epsilon`.
MAX_NOISE_MULTIPLIER = 1e4
MIN_NOISE_MULTIPLIER = 1e-2
_CALIBRATION_RTOL = 1e-3

_STATE_VERSION = 1

NeighborRel = dp_accounting.NeighboringRelation


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_noise_multiplier(noise_multiplier: float, key: str = "privacy.noise_multiplier") -> None:
    if not _is_real(noise_multiplier) or not math.isfinite(noise_multiplier):
        raise ConfigError(f"{key}={noise_multiplier!r} must be a finite number >= 0.")
    if noise_multiplier < 0:
        raise ConfigError(f"{key}={noise_multiplier!r} must be >= 0 (0: no noise, not private).")


def _check_count(count: int, key: str = "run.num_rounds") -> None:
    if not _is_int(count) or count < 0:
        raise ConfigError(f"{key}={count!r} must be an integer >= 0.")


def _check_accountant_name(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={name!r} is not one of: {', '.join(ACCOUNTANTS)}.")


def _check_delta_range(delta: float) -> None:
    if not _is_real(delta) or not 0.0 < delta < 1.0:
        raise ConfigError(f"privacy.delta={delta!r} must be in (0, 1).")


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """How clients are sampled into rounds, as far as privacy accounting is concerned.

    Attributes:
      kind: ``"poisson"`` (each client independently with probability ``q``) or ``"fixed"``
        (exactly ``m`` clients uniformly without replacement; the ``uniform`` sampler).
      population: ``N``, the number of clients (``data.num_clients``).
      expected_cohort: ``q * N`` for ``poisson``; the cohort size ``m`` (a whole number) for
        ``fixed`` (``run.num_clients_per_round`` in both cases).

    Raises:
      ConfigError: for another kind, a population below 1 or a cohort outside ``(0, N]``.
    """

    kind: str
    population: int
    expected_cohort: float

    def __post_init__(self) -> None:
        if self.kind == "uniform":
            raise ConfigError(
                "sampling.kind='uniform' must be accounted as SamplingPlan(kind='fixed', ...) "
                "(m clients without replacement); the accountant takes 'poisson' or 'fixed'."
            )
        if self.kind == "availability":
            raise ConfigError(
                "sampling.kind='availability' cannot be privacy-accounted (who is online is "
                "not a known random sample); use sampling.kind=poisson or uniform with privacy."
            )
        if self.kind not in SAMPLING_KINDS:
            raise ConfigError(
                f"sampling.kind={self.kind!r} cannot be privacy-accounted; valid: poisson, "
                "uniform (accounted as 'fixed')."
            )
        if not _is_int(self.population) or self.population < 1:
            raise ConfigError(f"data.num_clients={self.population!r} must be an integer >= 1.")
        m = self.expected_cohort
        if not _is_real(m) or not math.isfinite(m) or not 0 < m <= self.population:
            raise ConfigError(
                f"run.num_clients_per_round={m!r} must be in (0, {self.population}] "
                "(data.num_clients)."
            )
        if self.kind == "fixed" and float(m) != int(m):
            raise ConfigError(
                f"run.num_clients_per_round={m!r} must be a whole number with fixed-size "
                "(uniform) sampling."
            )

    @property
    def sampling_rate(self) -> float:
        """``q = expected_cohort / population``, the chance that a given client is in a round."""
        return float(self.expected_cohort) / self.population

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (`from_dict` reverses it)."""
        kind, population, cohort = self.kind, int(self.population), float(self.expected_cohort)
        return {"kind": kind, "population": population, "expected_cohort": cohort}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingPlan:
        """The plan that `to_dict` wrote."""
        return cls(str(d["kind"]), int(d["population"]), float(d["expected_cohort"]))


def plan_for_sampler(kind: str, num_clients: int, num_clients_per_round: float) -> SamplingPlan:
    """The `SamplingPlan` of one of the package's samplers (``sampling.kind``).

    Args:
      kind: ``"poisson"`` or ``"uniform"`` (accounted as ``"fixed"``); ``"availability"``
        cannot be accounted.
      num_clients: the population ``N``.
      num_clients_per_round: the (expected) cohort size.

    Returns:
      The plan.

    Raises:
      ConfigError: for a kind that cannot be accounted or values out of range.
    """
    return SamplingPlan("fixed" if kind == "uniform" else kind, num_clients, num_clients_per_round)


def make_dp_event(noise_multiplier: float, plan: SamplingPlan) -> dp_accounting.DpEvent:
    """The `DpEvent` of one round of DP federated averaging.

    Poisson sampling gives ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (add-or-remove-one
    client, sensitivity ``C``). Fixed-size sampling gives
    ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``: it is accounted under
    the replace-one relation, where replacing one client's clipped update moves the sum by up
    to ``2C``, and `dp_accounting`'s noise multiplier is the noise standard deviation over the
    sensitivity, ``z * C / (2C)``. A noise multiplier of 0 is a `NonPrivateDpEvent`.

    Args:
      noise_multiplier: ``z``, the noise standard deviation over the clip norm.
      plan: the sampling plan.

    Returns:
      The event of one round.

    Raises:
      ConfigError: if the noise multiplier is negative or not finite.
    """
    _check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    z = float(noise_multiplier)
    if plan.kind == "poisson":
        gaussian = dp_accounting.GaussianDpEvent(z)
        return dp_accounting.PoissonSampledDpEvent(plan.sampling_rate, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        plan.population, int(plan.expected_cohort), dp_accounting.GaussianDpEvent(z / 2)
    )


def make_accountant(name: str, plan: SamplingPlan) -> dp_accounting.PrivacyAccountant:
    """A fresh `dp_accounting` accountant for a sampling plan.

    Args:
      name: ``"rdp"`` (Renyi DP; add-or-remove-one for Poisson sampling, replace-one for
        fixed-size sampling) or ``"pld"`` (privacy loss distributions; Poisson sampling only).
      plan: the sampling plan.

    Returns:
      The accountant, with nothing composed.

    Raises:
      ConfigError: for an unknown name, or the PLD accountant with fixed-size sampling.
    """
    _check_accountant_name(name)
    if name == "rdp":
        poisson = plan.kind == "poisson"
        relation = NeighborRel.ADD_OR_REMOVE_ONE if poisson else NeighborRel.REPLACE_ONE
        return rdp.RdpAccountant(neighboring_relation=relation)
    if plan.kind != "poisson":
        raise ConfigError(
            "privacy.accountant=pld models Poisson sampling only; with fixed-size (uniform) "
            "sampling use privacy.accountant=rdp, or sampling.kind=poisson."
        )
    return pld.PLDAccountant(neighboring_relation=NeighborRel.ADD_OR_REMOVE_ONE)


def _epsilon(
    accountant: str, plan: SamplingPlan, runs: Iterable[tuple[float, int]], delta: float
) -> float:
    """Epsilon at ``delta`` of the rounds ``runs`` (``(noise_multiplier, count)`` pairs)."""
    runs = [(z, n) for z, n in runs if n > 0]
    if not runs:
        return 0.0
    acc = make_accountant(accountant, plan)
    for z, n in runs:
        acc.compose(make_dp_event(z, plan), n)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    noise_multiplier: float,
    plan: SamplingPlan,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The client-level epsilon of ``rounds`` rounds of DP federated averaging.

    With adaptive clipping pass the run's overall ``privacy.noise_multiplier`` ``z``, not the
    update-sum multiplier of `adaptive_clipping_noise`: the two noised releases of a round
    together are accounted as one Gaussian with multiplier ``z``.

    Args:
      noise_multiplier: ``z``, the noise standard deviation over the clip norm (0: no noise).
      plan: the sampling plan.
      rounds: the number of rounds (``run.num_rounds``).
      delta: the target delta (``privacy.delta``), ``0 < delta <= 1 / N``.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      Epsilon at ``delta``; 0.0 for 0 rounds, ``inf`` without noise.

    Raises:
      ConfigError: for a value out of range (the message names the key).
    """
    _check_noise_multiplier(noise_multiplier)
    _check_count(rounds)
    validate_delta(delta, plan.population)
    make_accountant(accountant, plan)  # Checks the name and the plan before any work.
    return _epsilon(accountant, plan, [(float(noise_multiplier), int(rounds))], delta)


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    plan: SamplingPlan,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (to relative tolerance 1e-3) that meets a target epsilon.

    A bracketed search on ``log z`` (regula falsi, Illinois): the bracket's upper end always
    meets the target, and that end is returned once the bracket is narrower than a factor
    ``1 + 1e-3``, so the result is rounded up and ``compute_epsilon(result, ...) <=
    target_epsilon``. The search covers ``[1e-2, 1e4]``; a target met even at ``1e-2`` returns
    ``1e-2``. The PLD search starts from the RDP solution (RDP's epsilon is the larger), which
    keeps it away from small multipliers, where PLD composition is slow.

    Args:
      target_epsilon: the epsilon to meet (``privacy.target_epsilon``), > 0.
      plan: the sampling plan.
      rounds: the number of rounds (``run.num_rounds``), >= 1.
      delta: the target delta (``privacy.delta``).
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      The noise multiplier ``z``.

    Raises:
      ConfigError: for a value out of range, or a target that even a multiplier of 1e4 does
        not meet (the message gives the smallest reachable epsilon).
    """
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"privacy.target_epsilon={target_epsilon!r} must be a finite number > 0.")
    _check_count(rounds)
    if rounds == 0:
        raise ConfigError("run.num_rounds=0: there is nothing to calibrate; it must be >= 1.")
    validate_delta(delta, plan.population)
    make_accountant(accountant, plan)

    cache: dict[float, float] = {}

    def eps(z: float) -> float:
        if z not in cache:
            cache[z] = _epsilon(accountant, plan, [(z, rounds)], delta)
        return cache[z]

    def meets(z: float) -> bool:
        return eps(z) <= target_epsilon

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi).
    start = 1.0
    if accountant == "pld":
        start = noise_multiplier_for_epsilon(target_epsilon, plan, rounds, delta, "rdp")
        if start <= MIN_NOISE_MULTIPLIER:  # PLD composition would crawl there; RDP's holds.
            return MIN_NOISE_MULTIPLIER
    if meets(start):
        hi = start
        while True:
            if hi <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            # PLD's epsilon is close to RDP's: try just below the RDP solution first.
            lo = max(
                hi * (0.85 if accountant == "pld" and hi == start else 0.5), MIN_NOISE_MULTIPLIER
            )
            if not meets(lo):
                break
            hi = lo
    else:
        if not meets(MAX_NOISE_MULTIPLIER):
            eps_max = eps(MAX_NOISE_MULTIPLIER)
            raise ConfigError(
                f"privacy.target_epsilon={target_epsilon:g} cannot be reached: even "
                f"privacy.noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives epsilon={eps_max:.4g} "
                f"here; set privacy.target_epsilon >= {eps_max:.4g}, or fewer run.num_rounds or "
                "clients per round."
            )
        lo = start
        hi = min(4 * lo, MAX_NOISE_MULTIPLIER)
        while not meets(hi):
            lo, hi = hi, min(4 * hi, MAX_NOISE_MULTIPLIER)

    # Epsilon is close to a power of z: the log-log gap is nearly linear, and its sign is that of
    # eps(z) - target (the floor keeps an epsilon of 0 finite).
    def gap(z: float) -> float:
        return math.log(max(eps(z), 1e-9 * target_epsilon) / target_epsilon)

    return _shrink_bracket(gap, lo, hi, _CALIBRATION_RTOL)


def _shrink_bracket(gap: Callable[[float], float], lo: float, hi: float, rtol: float) -> float:
    """Shrinks ``[lo, hi]`` (``gap(lo) > 0 >= gap(hi)``) to ``hi / lo <= 1 + rtol``; returns hi.

    Regula falsi in ``log z`` with the Illinois modification (superlinear, so a few
    evaluations instead of bisection's ten), each step kept at least a quarter of the
    tolerance inside the bracket. Only a point with ``gap <= 0`` becomes ``hi``.
    """
    a, b = math.log(lo), math.log(hi)
    g_a, g_b = gap(lo), gap(hi)
    min_step = math.log1p(rtol) / 4
    side = 0
    while hi / lo > 1 + rtol:
        x = (a * g_b - b * g_a) / (g_b - g_a)
        x = min(max(x, a + min_step), b - min_step)
        z = math.exp(x)
        g = gap(z)
        if g <= 0:
            b, g_b, hi = x, g, z
            if side == -1:
                g_a /= 2
            side = -1
        else:
            a, g_a, lo = x, g, z
            if side == 1:
                g_b /= 2
            side = 1
    return hi


def adaptive_clipping_noise(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update-sum noise multiplier that keeps adaptive clipping at a total multiplier ``z``.

    Adaptive clipping releases, each round, the noised sum of clipped updates (multiplier
    ``z_delta``) and the noised count of clients whose update norm is within the clip norm
    (noise standard deviation ``sigma_b``, in clients). Two Gaussian releases with multipliers
    ``z_delta`` and ``2 sigma_b`` are exactly as private as one with multiplier ``z`` where
    ``z**-2 = z_delta**-2 + (2 sigma_b)**-2`` (Andrew et al. 2021, Section 3.1 / Theorem 1), so

        z_delta = (z**-2 - (2 sigma_b)**-2) ** -0.5.

    Account the run with ``z`` (`compute_epsilon`, `PrivacyAccountant.compose`); add noise of
    standard deviation ``z_delta * C`` to the update sum.

    The count's multiplier is ``2 sigma_b`` because its sensitivity is 1/2 relative to the
    update sum's: under add-or-remove-one (Poisson sampling) the count must be released
    centred, ``sum_i (b_i - 1/2) + N(0, sigma_b**2) + m/2`` with the expected cohort ``m``
    (sensitivity 1/2 against ``C`` for the updates), as in the paper; an uncentred
    ``sum_i b_i`` has sensitivity 1 and this formula would understate the privacy loss. Under
    replace-one (fixed-size sampling) the count has sensitivity 1 against ``2C`` for the
    updates, the same ratio, centred or not.

    Args:
      noise_multiplier: ``z``, the run's overall noise multiplier (``privacy.noise_multiplier``).
      clipped_count_stddev: ``sigma_b``, the noise standard deviation of the clipped count
        (``privacy.clipped_count_stddev``), in clients.

    Returns:
      ``z_delta`` (>= ``z``); 0.0 when ``z`` is 0 (no noise at all).

    Raises:
      ConfigError: if ``2 * sigma_b <= z``: the count alone would then use up the budget.

    References:
      Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
      Clipping", NeurIPS.
    """
    _check_noise_multiplier(noise_multiplier)
    sigma_b = clipped_count_stddev
    if not _is_real(sigma_b) or not math.isfinite(sigma_b) or sigma_b < 0:
        raise ConfigError(f"privacy.clipped_count_stddev={sigma_b!r} must be a finite number > 0.")
    z = float(noise_multiplier)
    if z == 0:
        return 0.0
    if 2 * sigma_b <= z:
        raise ConfigError(
            f"privacy.clipped_count_stddev={sigma_b:g} must be > privacy.noise_multiplier / 2 = "
            f"{z / 2:g} (else the count alone spends the whole budget); the paper uses "
            "run.num_clients_per_round / 20."
        )
    return (z**-2 - (2 * float(sigma_b)) ** -2) ** -0.5


def sample_level_epsilon(
    noise_multiplier: float,
    steps_with_example: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Example-level epsilon of DP-SGD inside a client with shuffled batches.

    The batches are a shuffle (each example in a fixed set of steps), not a Poisson sample, so
    no amplification by subsampling is claimed: an example's privacy loss is the composition
    of the ``steps_with_example`` Gaussian mechanisms of the steps whose batch holds it, each
    adding noise ``z * C`` to a sum of per-example gradients clipped to ``C`` (sensitivity
    ``C`` under add-or-remove-one example).

    Args:
      noise_multiplier: ``z``, the per-step noise standard deviation over the clip norm.
      steps_with_example: how many steps see the example (e.g. local epochs times the rounds
        its client joins).
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      Epsilon at ``delta``; 0.0 for 0 steps, ``inf`` without noise.

    Raises:
      ConfigError: for a value out of range.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_count(steps_with_example, key="steps_with_example")
    _check_delta_range(delta)
    _check_accountant_name(accountant)
    if steps_with_example == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(float(noise_multiplier)), int(steps_with_example)
    )
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    return float(acc.compose(event).get_epsilon(delta))


def validate_delta(delta: float, population: int) -> None:
    """Checks that ``0 < delta < 1`` and ``delta <= 1 / population``.

    A delta above ``1/N`` admits mechanisms that publish one client's data outright (pick a
    client at random and release its data: that is ``(0, 1/N)``-DP), so it promises nothing.

    Args:
      delta: ``privacy.delta``.
      population: ``N``, the number of clients.

    Raises:
      ConfigError: if delta is out of range.
    """
    _check_delta_range(delta)
    if delta > 1.0 / population:
        raise ConfigError(
            f"privacy.delta={delta:g} must be <= 1/data.num_clients = {1.0 / population:.3g} "
            "(a larger delta allows releasing one client's data outright); default "
            f"1/N**1.1 = {default_delta(population):.3g}."
        )


def default_delta(population: int) -> float:
    """``1 / N**1.1``, the delta of McMahan et al. 2018 for ``N`` clients.

    Args:
      population: ``N``, the number of clients.

    Returns:
      The delta.

    References:
      McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
      Models", ICLR.
    """
    return 1.0 / float(population) ** 1.1


class PrivacyAccountant:
    """The privacy ledger of a run: the rounds composed so far and their epsilon.

    The ledger is a compact list of ``[noise_multiplier, count]`` runs (consecutive rounds with
    the same multiplier merged). `epsilon` recomputes from the ledger with a fresh
    `dp_accounting` accountant (and caches the result), so a ledger restored by `from_state`
    reports exactly the same epsilon.

    Args:
      accountant_name: ``"rdp"`` or ``"pld"`` (``privacy.accountant``).
      plan: the sampling plan.
      delta: the target delta (``privacy.delta``).

    Raises:
      ConfigError: for an unknown accountant, PLD with fixed-size sampling or a bad delta.
    """

    def __init__(self, accountant_name: str, plan: SamplingPlan, delta: float):
        make_accountant(accountant_name, plan)
        validate_delta(delta, plan.population)
        self.accountant_name = accountant_name
        self.plan = plan
        self.delta = float(delta)
        self._records: list[list[float | int]] = []
        self._epsilon: float | None = None

    @property
    def rounds(self) -> int:
        """The number of rounds composed."""
        return sum(int(n) for _, n in self._records)

    @property
    def records(self) -> list[tuple[float, int]]:
        """The ledger: ``(noise_multiplier, count)`` runs, in order."""
        return [(float(z), int(n)) for z, n in self._records]

    def compose(self, noise_multiplier: float, count: int = 1) -> None:
        """Records ``count`` rounds with noise multiplier ``noise_multiplier``.

        Args:
          noise_multiplier: ``z`` of these rounds (the overall multiplier with adaptive
            clipping, see `adaptive_clipping_noise`).
          count: the number of rounds, >= 0.

        Raises:
          ConfigError: for a negative multiplier or count.
        """
        _check_noise_multiplier(noise_multiplier)
        _check_count(count, key="count")
        if count == 0:
            return
        self._records = _append_run(self._records, float(noise_multiplier), int(count))
        self._epsilon = None

    def epsilon(self) -> float:
        """The epsilon at ``delta`` of the rounds composed so far (0.0 before any)."""
        if self._epsilon is None:
            self._epsilon = _epsilon(self.accountant_name, self.plan, self.records, self.delta)
        return self._epsilon

    def epsilon_after(self, noise_multiplier: float, extra_rounds: int = 1) -> float:
        """The epsilon there would be after ``extra_rounds`` more rounds, without recording them.

        Args:
          noise_multiplier: ``z`` of the extra rounds.
          extra_rounds: how many, >= 0.

        Returns:
          The epsilon at ``delta``.

        Raises:
          ConfigError: for a negative multiplier or count.
        """
        _check_noise_multiplier(noise_multiplier)
        _check_count(extra_rounds, key="extra_rounds")
        if extra_rounds == 0:
            return self.epsilon()
        runs = _append_run(self._records, float(noise_multiplier), int(extra_rounds))
        return _epsilon(self.accountant_name, self.plan, runs, self.delta)

    def state(self) -> dict[str, Any]:
        """The ledger as a JSON-serializable dict (`from_state` restores it)."""
        return {
            "version": _STATE_VERSION,
            "accountant": self.accountant_name,
            "plan": self.plan.to_dict(),
            "delta": self.delta,
            "records": [[float(z), int(n)] for z, n in self._records],
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PrivacyAccountant:
        """The accountant that `state` saved.

        Args:
          d: a dict from `state` (possibly through JSON).

        Returns:
          The accountant, reporting the same epsilon as the one saved.

        Raises:
          ValueError: if ``d`` is not a saved accountant state.
        """
        try:
            version = d["version"]
            if version != _STATE_VERSION:
                raise ValueError(f"unsupported privacy accountant state version {version!r}")
            acc = cls(str(d["accountant"]), SamplingPlan.from_dict(d["plan"]), float(d["delta"]))
            records = _parse_records(d["records"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a privacy accountant state: {e!r}") from e
        acc._records = [[z, n] for z, n in records]  # Verbatim: the same ledger, the same epsilon.
        return acc


def _append_run(records: list[list[Any]], z: float, count: int) -> list[list[Any]]:
    """A copy of the ledger ``records`` with ``count`` more rounds at ``z`` (merged if equal)."""
    out = [list(r) for r in records]
    if out and out[-1][0] == z:
        out[-1][1] += count
    else:
        out.append([z, count])
    return out


def _parse_records(records: Sequence[Any]) -> list[tuple[float, int]]:
    out = []
    for rec in records:
        z, n = rec
        if not (_is_real(z) and math.isfinite(z) and z >= 0 and _is_int(n) and n >= 0):
            raise ValueError(f"bad privacy ledger record {rec!r}")
        out.append((float(z), int(n)))
    return out
