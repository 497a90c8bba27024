"""A run's differential-privacy plan: the config resolved against the population, the sampler
and the local-training shape, checked before anything is compiled.

The plan fixes the noise multiplier (given, or solved from ``privacy.target_epsilon``), the
delta, the accountant and the sampling event it is told about, and builds the pieces of the
round (`fedjax_llm.privacy.mechanisms`). During the run, `RunPrivacy` composes the rounds that
actually ran and reports epsilon after each; its state goes into the checkpoint, so a resumed
run reports the same epsilon as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from fedjax_llm.config import ConfigError, ExperimentConfig
from fedjax_llm.privacy.accounting import (
    PrivacyAccountant,
    SamplingPlan,
    adaptive_clipping_noise,
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
    sample_level_epsilon,
    validate_delta,
)


class PrivacyPlan(NamedTuple):
    """What a private run does and how it is accounted.

    Attributes:
      level: ``client`` or ``sample``.
      clip_norm: C (the initial one with adaptive clipping).
      noise_multiplier: z, the multiplier the accountant is told about.
      update_noise_multiplier: the multiplier of the noise on the update sum (z, or the larger
        one adaptive clipping needs so that both of its releases together cost z).
      delta: the delta of the reported epsilon.
      accountant: ``rdp`` or ``pld``.
      sampling: the client `SamplingPlan` (client level).
      max_epsilon: the budget; a round that would exceed it does not run (None: none).
      clipped_count_stddev: adaptive clipping's count noise (None without it).
      exposure: sample level: ``[population]`` int, for each client the number of Gaussian
        compositions (sum over steps of the squared times an example is used in the step) one
        of its examples undergoes in a round the client trains in (worst example).
    """

    level: str
    clip_norm: float
    noise_multiplier: float
    update_noise_multiplier: float
    delta: float
    accountant: str
    sampling: SamplingPlan | None
    max_epsilon: float | None
    clipped_count_stddev: float | None
    exposure: np.ndarray | None

    def describe(self) -> str:
        """One line for the run's header."""
        what = {
            "client": "client-level DP (every delivered client weighs 1)",
            "sample": "sample-level DP-SGD",
        }[self.level]
        extra = (
            f", adaptive clip (count noise {self.clipped_count_stddev:g})"
            if self.clipped_count_stddev is not None
            else ""
        )
        budget = f", budget epsilon {self.max_epsilon:g}" if self.max_epsilon else ""
        sampled = (
            f", {self.sampling.kind} sampling q={self.sampling.sampling_rate:.4g}"
            if self.sampling is not None
            else ""
        )
        return (
            f"privacy: {what}, clip {self.clip_norm:g}, noise multiplier "
            f"{self.noise_multiplier:.4g}{extra}, delta {self.delta:.3g}, {self.accountant} "
            f"accountant{sampled}{budget}"
        )


def example_exposure(
    count: int,
    local_steps: int,
    batch_size: int,
    local_epochs: float | None,
    max_client_examples: int,
) -> int:
    """The worst example's number of unit Gaussian compositions in one round of a client.

    Mirrors the round's batch drawing (`fedjax_llm.round.client_batch_indices`): the client's
    examples (at most ``min(K B, max_client_examples)`` of them) are streamed in a cycle of
    length ``L`` over the ``budget`` positions of the round, ``B`` per step. An example used
    ``k`` times in one step changes that step's sum by ``k C``, a Gaussian mechanism worth
    ``k^2`` compositions of the unit one, so the exposure is ``sum_steps k^2``, maximised over
    the examples.

    Args:
      count: the client's number of examples.
      local_steps: K.
      batch_size: B.
      local_epochs: the epoch budget, if any (``ceil(local_epochs * count)`` positions).
      max_client_examples: the largest client's size (bounds the cycle, as in the round).

    Returns:
      The exposure (an int >= 1).
    """
    positions = local_steps * batch_size
    budget = positions
    if local_epochs is not None:
        budget = min(math.ceil(local_epochs * count), positions)
    cycle = min(count, min(positions, max_client_examples))
    if cycle >= budget:
        return 1
    worst = 0
    for j in range(cycle):
        steps = np.arange(j, budget, cycle) // batch_size
        worst = max(worst, int(np.sum(np.bincount(steps) ** 2)))
    return worst


def make_privacy_plan(
    config: ExperimentConfig,
    sampler: Any,
    population: int,
    client_counts: np.ndarray,
    max_client_examples: int,
) -> PrivacyPlan | None:
    """Resolves ``config.privacy`` for a population and sampler; None without privacy.

    Raises:
      ConfigError: for a sampler or combination that cannot be accounted, a delta out of range,
        a target epsilon that cannot be reached in ``run.num_rounds`` rounds, or adaptive
        clipping whose count noise leaves nothing for the update.
    """
    from fedjax_llm.sampling import PoissonSampler, UniformSampler

    p, rounds = config.privacy, config.run.num_rounds
    if p.level == "none":
        return None
    max_epsilon = p.max_epsilon if p.max_epsilon is not None else p.target_epsilon
    if p.level == "sample":
        largest = int(np.max(client_counts))
        delta = p.delta if p.delta is not None else default_delta(largest)
        try:
            validate_delta(delta, largest)
        except ConfigError as err:
            raise ConfigError(
                f"{err} At sample level the records are one client's examples; its largest "
                f"client has {largest}."
            ) from None
        c = config.client
        exposure = np.array(
            [
                example_exposure(
                    int(n), c.local_steps, c.batch_size, c.local_epochs, max_client_examples
                )
                for n in client_counts
            ],
            np.int64,
        )
        z = p.noise_multiplier
        if z is None:
            # The worst client if it trained in every round: solve its epsilon for the target.
            z = _solve_sample_level(p.target_epsilon, int(exposure.max()) * rounds, delta, p)
        return PrivacyPlan(
            "sample", p.clip_norm, z, z, delta, p.accountant, None, max_epsilon, None, exposure
        )
    if isinstance(sampler, PoissonSampler):
        sampling = SamplingPlan("poisson", population, sampler.expected_cohort)
    elif isinstance(sampler, UniformSampler):
        sampling = SamplingPlan("fixed", population, sampler.expected_cohort)
    else:
        raise ConfigError(
            f"privacy.level=client: the sampler {type(sampler).__name__} is not one the "
            "accountant models; use sampling.kind=poisson or uniform."
        )
    delta = p.delta if p.delta is not None else default_delta(population)
    validate_delta(delta, population)
    z = p.noise_multiplier
    if z is None:
        z = noise_multiplier_for_epsilon(p.target_epsilon, sampling, rounds, delta, p.accountant)
    count_stddev = None
    update_z = z
    if p.adaptive_clipping:
        count_stddev = p.clipped_count_stddev or sampling.expected_cohort / 20
        update_z = adaptive_clipping_noise(z, count_stddev)
    if max_epsilon is not None:
        first = compute_epsilon(z, sampling, 1, delta, p.accountant)
        if first > max_epsilon:
            raise ConfigError(
                f"privacy.max_epsilon / target_epsilon {max_epsilon:g} is exceeded by a single "
                f"round (epsilon {first:.3g} at noise multiplier {z:.4g}); raise "
                "privacy.noise_multiplier or the budget."
            )
    return PrivacyPlan(
        "client",
        p.clip_norm,
        z,
        update_z,
        delta,
        p.accountant,
        sampling,
        max_epsilon,
        count_stddev,
        None,
    )


def _solve_sample_level(target: float, compositions: int, delta: float, p: Any) -> float:
    """The smallest z (relative 1e-3, rounded up) whose sample-level epsilon meets target."""

    def epsilon(z: float) -> float:
        return sample_level_epsilon(z, compositions, delta, p.accountant)

    low, high = 1e-2, 1e4
    if epsilon(high) > target:
        raise ConfigError(
            f"privacy.target_epsilon={target:g} cannot be reached at sample level in "
            f"run.num_rounds rounds even with noise multiplier {high:g}; raise it or train "
            "fewer steps."
        )
    if epsilon(low) <= target:
        return low
    while high / low > 1 + 1e-3:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if epsilon(mid) <= target else (mid, high)
    return high


class RunPrivacy:
    """The accountant of a running simulation.

    Client level: a `PrivacyAccountant` composed once per completed round. Sample level: how
    many rounds each client trained in; epsilon is that of the worst client's worst example.

    Args:
      plan: the run's `PrivacyPlan`.
    """

    def __init__(self, plan: PrivacyPlan):
        self.plan = plan
        if plan.level == "client":
            self.accountant = PrivacyAccountant(plan.accountant, plan.sampling, plan.delta)
        else:
            self.participations = np.zeros(len(plan.exposure), np.int64)
            self._compositions = 0

    def epsilon(self) -> float:
        """Epsilon of everything released so far (0 before the first round)."""
        if self.plan.level == "client":
            return self.accountant.epsilon()
        return self._sample_epsilon(self._compositions)

    def _sample_epsilon(self, compositions: int) -> float:
        if compositions == 0:
            return 0.0
        p = self.plan
        return sample_level_epsilon(p.noise_multiplier, compositions, p.delta, p.accountant)

    def epsilon_after(self, client_ids: np.ndarray) -> float:
        """Epsilon once one more round with these sampled clients has run (no change)."""
        if self.plan.level == "client":
            return self.accountant.epsilon_after(self.plan.noise_multiplier, 1)
        return self._sample_epsilon(self._compositions_after(client_ids))

    def _compositions_after(self, client_ids: np.ndarray) -> int:
        ids = np.asarray(client_ids, np.int64)
        after = self._compositions
        if len(ids):
            counts = (self.participations[ids] + 1) * self.plan.exposure[ids]
            after = max(after, int(counts.max()))
        return after

    def record_round(self, client_ids: np.ndarray) -> None:
        """Composes one completed round whose sampled (training) clients are ``client_ids``."""
        if self.plan.level == "client":
            self.accountant.compose(self.plan.noise_multiplier, 1)
            return
        self._compositions = self._compositions_after(client_ids)
        self.participations[np.asarray(client_ids, np.int64)] += 1

    def state(self) -> dict:
        """A JSON-serializable state (`load_state` restores it)."""
        if self.plan.level == "client":
            return {"level": "client", "accountant": self.accountant.state()}
        nonzero = np.flatnonzero(self.participations)
        return {
            "level": "sample",
            "clients": nonzero.tolist(),
            "participations": self.participations[nonzero].tolist(),
        }

    def load_state(self, state: dict) -> None:
        """Restores what `state` wrote (from a checkpoint of the same run).

        Raises:
          ConfigError: if the checkpoint's privacy state is of another level.
        """
        if state.get("level") != self.plan.level:
            raise ConfigError(
                f"the checkpoint's privacy state is for level {state.get('level')!r}, this run "
                f"is privacy.level={self.plan.level}; resume with the original config."
            )
        if self.plan.level == "client":
            self.accountant = PrivacyAccountant.from_state(state["accountant"])
            return
        self.participations[:] = 0
        clients = np.asarray(state["clients"], np.int64)
        self.participations[clients] = np.asarray(state["participations"], np.int64)
        touched = self.participations * self.plan.exposure
        self._compositions = int(touched.max()) if len(touched) else 0
