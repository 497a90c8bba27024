"""Seeded client sampling, and the padded, masked cohort the compiled round takes.

A sampler draws the clients of a round as a pure function of ``(seed, round)``, so a resumed
run reproduces the same sequence without sampler state. Its ``max_cohort`` is a static bound on
how many clients a round can have; the round is compiled once for that many slots (rounded up
to whole chunks on every device) and the slots a round does not fill are padding with mask 0.
A padded slot and a client whose upload is lost contribute exactly nothing, and their stored
client state is left unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from fedjax_llm.errors import UserError


class CohortOverflowError(UserError, RuntimeError):
    """A Poisson draw selected more clients than the static bound the round was compiled for."""


class Cohort(NamedTuple):
    """The clients of one round on a padded client axis of ``slots`` entries.

    Attributes:
      client_ids: ``[slots]`` int32; padding slots hold 0 (any valid id; they are masked).
      participating: ``[slots]`` bool, the sampled clients (they train).
      delivered: ``[slots]`` bool, the clients whose upload reaches the server (participating
        and not dropped out after training).
    """

    client_ids: np.ndarray
    participating: np.ndarray
    delivered: np.ndarray


class ClientSampler(Protocol):
    """Anything that draws a round's clients.

    Attributes:
      max_cohort: the most clients any round can have (static: the round's shape).
      expected_cohort: the mean number of clients per round (the denominator DP accounting and
        fixed-denominator aggregators assume).
    """

    max_cohort: int
    expected_cohort: float

    def sample(self, round_num: int) -> np.ndarray:
        """Returns the distinct client ids of a round (at most ``max_cohort``)."""
        ...


def sample_clients(seed: int, round_num: int, num_clients: int, num_per_round: int) -> np.ndarray:
    """Samples clients uniformly without replacement for one round.

    The draw is a pure function of ``(seed, round_num)``: resuming at any round reproduces
    the same sequence without storing sampler state, and sweeps that share a seed see the
    same clients.

    Args:
      seed: the run's seed.
      round_num: zero-based round index.
      num_clients: population size.
      num_per_round: clients per round (<= num_clients).

    Returns:
      ``[num_per_round]`` int32 client ids.

    Raises:
      ValueError: if more clients are requested than exist.
    """
    if num_per_round > num_clients:
        raise ValueError(
            f"num_clients_per_round={num_per_round} exceeds the {num_clients} clients."
        )
    rng = np.random.default_rng([seed, round_num, 0x5A3])
    return rng.choice(num_clients, size=num_per_round, replace=False).astype(np.int32)


class UniformSampler:
    """A fixed number of clients per round, uniformly without replacement.

    Args:
      seed: the run's seed.
      num_clients: population size.
      num_per_round: clients per round.
    """

    def __init__(self, seed: int, num_clients: int, num_per_round: int):
        if not 0 < num_per_round <= num_clients:
            raise ValueError(
                f"num_clients_per_round={num_per_round} must be in [1, {num_clients}] (the "
                "population size)."
            )
        self.seed, self.num_clients = seed, num_clients
        self.max_cohort = num_per_round
        self.expected_cohort = float(num_per_round)

    def sample(self, round_num: int) -> np.ndarray:
        return sample_clients(self.seed, round_num, self.num_clients, self.max_cohort)


def poisson_cohort_bound(num_clients: int, rate: float, overflow_probability: float) -> int:
    """The smallest bound B with ``P(Binomial(num_clients, rate) > B) <= overflow_probability``.

    Computed exactly from the binomial distribution (log-space pmf, summed upward from the
    mode), so the bound is tight: for 10,000 clients at rate 0.01 and 1e-9 it is 165, against
    an expected 100.

    Args:
      num_clients: population size N.
      rate: per-client inclusion probability q in (0, 1].
      overflow_probability: the acceptable chance that a round overflows.

    Returns:
      The bound, at most ``num_clients``.
    """
    if rate >= 1.0:
        return num_clients
    log_q, log_1q = math.log(rate), math.log1p(-rate)
    lgamma_n1 = math.lgamma(num_clients + 1)

    def log_pmf(k: int) -> float:
        return (
            lgamma_n1
            - math.lgamma(k + 1)
            - math.lgamma(num_clients - k + 1)
            + k * log_q
            + (num_clients - k) * log_1q
        )

    def tail(bound: int) -> float:
        # P(X > bound): the pmf summed upward from bound + 1 until its terms vanish (past the
        # mean they decay at least geometrically), so this costs O(sqrt(N q)) terms, not O(N).
        total, k = 0.0, bound + 1
        while k <= num_clients:
            term = math.exp(log_pmf(k))
            total += term
            if term <= total * 1e-17:
                break
            k += 1
        return total

    # Binary search for the smallest bound in [0, N] whose tail is small enough (the tail is
    # decreasing in the bound).
    low, high = 0, num_clients
    while low < high:
        mid = (low + high) // 2
        if tail(mid) <= overflow_probability:
            high = mid
        else:
            low = mid + 1
    return low


class PoissonSampler:
    """Each client joins a round independently with probability ``rate`` (Poisson sampling).

    The cohort size is random; the compiled round has a static bound ``max_cohort`` chosen so
    that a draw exceeds it with probability at most ``overflow_probability`` per round. A draw
    that still exceeds it raises `CohortOverflowError`: it is never silently truncated (which
    would break the sampling that privacy accounting assumes).

    Args:
      seed: the run's seed.
      num_clients: population size.
      rate: inclusion probability q.
      overflow_probability: per-round overflow chance that sets the bound.
      max_cohort: an explicit bound instead (must be at least the expected cohort).
    """

    def __init__(
        self,
        seed: int,
        num_clients: int,
        rate: float,
        overflow_probability: float = 1e-9,
        max_cohort: int | None = None,
    ):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"Poisson sampling rate {rate} must be in (0, 1].")
        self.seed, self.num_clients, self.rate = seed, num_clients, rate
        self.expected_cohort = num_clients * rate
        self.overflow_probability = overflow_probability
        if max_cohort is None:
            max_cohort = poisson_cohort_bound(num_clients, rate, overflow_probability)
        elif max_cohort < self.expected_cohort:
            raise ValueError(
                f"sampling.max_cohort={max_cohort} is below the expected cohort "
                f"{self.expected_cohort:g} of Poisson sampling; raise it or leave it null "
                "(computed from sampling.overflow_probability)."
            )
        self.max_cohort = min(max_cohort, num_clients)

    def sample(self, round_num: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, round_num, 0x9E3])
        ids = np.flatnonzero(rng.random(self.num_clients) < self.rate).astype(np.int32)
        if len(ids) > self.max_cohort:
            raise CohortOverflowError(
                f"round {round_num}: Poisson sampling drew {len(ids)} clients, more than the "
                f"bound of {self.max_cohort} the round was compiled for (chance per round "
                f"<= {self.overflow_probability:g}). Set sampling.max_cohort higher or "
                "sampling.overflow_probability lower and resume; nothing was truncated."
            )
        return ids


class AvailabilitySampler:
    """Clients are available with a per-client probability; a round samples among them.

    Each round, client i is available with probability ``availability[i]`` (independently);
    ``num_per_round`` of the available clients are drawn uniformly without replacement. When
    fewer are available the round runs with all of them (the rest of its slots are padding).

    Args:
      seed: the run's seed.
      num_clients: population size.
      num_per_round: clients per round (the bound).
      availability: one probability for all clients, or ``[num_clients]`` probabilities.
      groups: clients split into this many groups (time zones) by a seeded permutation.
      period: rounds of a day/night cycle (0: availability constant over rounds).
      amplitude: the cycle's relative swing in [0, 1]: in round r a client of group g is
        available with probability ``availability * (1 + amplitude * cos(2 pi (r / period +
        g / groups)))``, clipped to [0, 1].
    """

    def __init__(
        self,
        seed: int,
        num_clients: int,
        num_per_round: int,
        availability: float | Sequence[float] | np.ndarray,
        groups: int = 1,
        period: int = 0,
        amplitude: float = 0.0,
    ):
        probs = np.broadcast_to(np.asarray(availability, np.float64), (num_clients,))
        if np.any(probs < 0) or np.any(probs > 1) or not np.any(probs > 0):
            raise ValueError(
                "sampling.availability must be probabilities in [0, 1], not all 0; got "
                f"{np.asarray(availability).tolist() if np.ndim(availability) == 0 else '...'}."
            )
        if groups < 1 or period < 0 or not 0.0 <= amplitude <= 1.0:
            raise ValueError(
                f"availability cycle: groups={groups} must be >= 1, period={period} >= 0 and "
                f"amplitude={amplitude} in [0, 1]."
            )
        self.seed, self.num_clients, self.availability = seed, num_clients, probs
        self.period, self.amplitude = period, amplitude
        # Each group's phase in the cycle; group sizes differ by at most one client.
        order = np.random.default_rng([seed, 0x6A0]).permutation(num_clients)
        self.phase = np.empty(num_clients)
        self.phase[order] = (np.arange(num_clients) % groups) / groups
        self.max_cohort = num_per_round
        self.expected_cohort = float(num_per_round)  # an upper estimate when few are online

    def availability_at(self, round_num: int) -> np.ndarray:
        """``[num_clients]`` each client's probability of being online in a round."""
        if not self.period or not self.amplitude:
            return self.availability
        angle = 2 * np.pi * (round_num / self.period + self.phase)
        return np.clip(self.availability * (1 + self.amplitude * np.cos(angle)), 0.0, 1.0)

    def sample(self, round_num: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, round_num, 0xA7A])
        available = np.flatnonzero(rng.random(self.num_clients) < self.availability_at(round_num))
        take = min(self.max_cohort, len(available))
        return np.sort(rng.choice(available, size=take, replace=False)).astype(np.int32)


class ScheduledSampler:
    """A user-given client schedule: round r trains ``schedule[r % len(schedule)]``.

    Args:
      schedule: one sequence of distinct client ids per round.
      num_clients: population size (ids are checked against it).
    """

    def __init__(self, schedule: Sequence[Sequence[int]], num_clients: int):
        self.schedule = [np.asarray(ids, np.int32) for ids in schedule]
        if not self.schedule:
            raise ValueError("a client schedule needs at least one round.")
        for r, ids in enumerate(self.schedule):
            if ids.ndim != 1 or len(set(ids.tolist())) != len(ids):
                raise ValueError(f"client schedule round {r}: ids must be distinct, got {ids}.")
            if len(ids) and (ids.min() < 0 or ids.max() >= num_clients):
                raise ValueError(
                    f"client schedule round {r}: ids must be in [0, {num_clients}), got {ids}."
                )
        self.max_cohort = max(len(ids) for ids in self.schedule)
        self.expected_cohort = float(np.mean([len(ids) for ids in self.schedule]))

    def sample(self, round_num: int) -> np.ndarray:
        return self.schedule[round_num % len(self.schedule)]


def cohort_slots(max_cohort: int, clients_per_chunk: int | None, devices: int) -> int:
    """The padded client axis length: ``max_cohort`` rounded up to whole chunks per device.

    Args:
      max_cohort: the sampler's bound.
      clients_per_chunk: clients vmapped together (None: one chunk per device).
      devices: devices the clients are sharded over.

    Returns:
      The number of slots, a multiple of ``devices * chunk``.
    """
    per_device = math.ceil(max_cohort / devices)
    chunk = clients_per_chunk or per_device
    return devices * chunk * math.ceil(per_device / chunk)


def make_cohort(
    ids: np.ndarray, slots: int, dropout: float = 0.0, seed: int = 0, round_num: int = 0
) -> Cohort:
    """Places a round's sampled clients on the padded client axis.

    Args:
      ids: the sampled client ids (distinct, at most ``slots``).
      slots: the padded axis length.
      dropout: probability that a sampled client's upload is lost after it trained.
      seed: the run's seed (for the dropout draw).
      round_num: the round (for the dropout draw).

    Returns:
      The `Cohort`.
    """
    ids = np.asarray(ids, np.int32)
    if len(ids) > slots:
        raise CohortOverflowError(f"{len(ids)} sampled clients do not fit {slots} slots.")
    n = len(ids)
    client_ids = np.zeros(slots, np.int32)
    client_ids[:n] = ids
    participating = np.arange(slots) < n
    delivered = participating.copy()
    if dropout > 0:
        rng = np.random.default_rng([seed, round_num, 0xD80])
        delivered[:n] &= rng.random(n) >= dropout
    return Cohort(client_ids, participating, delivered)
