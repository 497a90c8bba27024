"""Client sampling (`fedjax_llm.sampling`): samplers as pure functions of (seed, round), the
Poisson cohort bound against the exact binomial tail, padded cohorts and dropout masks, config
errors, and the sampling columns of a run's history.

Statistical checks use many draws and bounds of 5 standard deviations (per check, a false
failure has probability below 1e-6, or 1e-4 after a union over every client), so they are loose
enough never to flake and tight enough to catch a wrong rate.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedjax_llm import ConfigError, Simulation, load_config
from fedjax_llm.sampling import (
    AvailabilitySampler,
    CohortOverflowError,
    PoissonSampler,
    ScheduledSampler,
    UniformSampler,
    cohort_slots,
    make_cohort,
    poisson_cohort_bound,
    sample_clients,
)

SIGMAS = 5.0


# --------------------------------------------------------------------------------- uniform
def test_uniform_sampler_equals_sample_clients_and_is_a_function_of_seed_and_round():
    sampler = UniformSampler(seed=3, num_clients=20, num_per_round=6)
    assert sampler.max_cohort == 6 and sampler.expected_cohort == 6.0
    rounds = [7, 0, 3, 0, 7, 11]  # out of order and repeated: no hidden sampler state
    draws = {r: sampler.sample(r) for r in rounds}
    for r in rounds:
        ids = sampler.sample(r)
        np.testing.assert_array_equal(ids, sample_clients(3, r, 20, 6))
        np.testing.assert_array_equal(ids, draws[r])
        np.testing.assert_array_equal(ids, UniformSampler(3, 20, 6).sample(r))  # a fresh one
        assert ids.dtype == np.int32 and len(set(ids.tolist())) == 6
        assert ids.min() >= 0 and ids.max() < 20
    assert len({tuple(sampler.sample(r)) for r in range(20)}) > 1  # rounds differ
    assert any(
        not np.array_equal(sampler.sample(r), UniformSampler(4, 20, 6).sample(r)) for r in range(5)
    )  # seeds differ
    for bad in (0, 21):
        with pytest.raises(ValueError, match="num_clients_per_round"):
            UniformSampler(0, 20, bad)
    with pytest.raises(ValueError, match="exceeds"):
        sample_clients(0, 0, 5, 6)


def test_uniform_sampler_is_uniform():
    # Each client is in a round with probability k / N = 0.25.
    sampler, rounds = UniformSampler(1, 40, 10), 4000
    counts = np.zeros(40)
    for r in range(rounds):
        counts[sampler.sample(r)] += 1
    q = 0.25
    np.testing.assert_array_less(
        np.abs(counts / rounds - q), SIGMAS * math.sqrt(q * (1 - q) / rounds)
    )


# ---------------------------------------------------------------------------- Poisson bound
def exact_tails(num_clients: int, rate: float) -> list[Fraction]:
    """``P(Binomial(N, q) > b)`` for b = 0..N, exactly (rational arithmetic; ``q`` is the float
    the library receives, converted exactly)."""
    q = Fraction(rate)
    pmf = [
        math.comb(num_clients, k) * q**k * (1 - q) ** (num_clients - k)
        for k in range(num_clients + 1)
    ]
    tails, above = [Fraction(0)] * (num_clients + 1), Fraction(0)
    for b in range(num_clients, -1, -1):
        tails[b] = above
        above += pmf[b]
    assert above == 1
    return tails


def smallest_bound(tails: list[Fraction], probability: float) -> int:
    return next(b for b, tail in enumerate(tails) if tail <= Fraction(probability))


@pytest.mark.parametrize("num_clients", [50, 200])
def test_poisson_cohort_bound_is_the_exact_binomial_quantile(num_clients):
    for rate in (0.01, 0.02, 0.1, 0.3, 0.5, 0.9, 0.99):
        tails = exact_tails(num_clients, rate)
        for probability in (1e-12, 1e-9, 1e-6, 1e-3, 0.05, 0.3, 0.5):
            bound = poisson_cohort_bound(num_clients, rate, probability)
            assert bound == smallest_bound(tails, probability), (rate, probability)
            assert tails[bound] <= Fraction(probability)
    assert poisson_cohort_bound(num_clients, 1.0, 1e-9) == num_clients


def test_poisson_cohort_bound_is_smallest_for_large_overflow_probabilities():
    for num_clients, rate in ((50, 0.3), (200, 0.1)):
        tails = exact_tails(num_clients, rate)
        bound = poisson_cohort_bound(num_clients, rate, 0.9)
        assert bound == smallest_bound(tails, 0.9), (num_clients, rate, bound)


def exact_tail_above(num_clients: int, numerator: int, denominator: int, bound: int) -> Fraction:
    """``P(Binomial(N, a/d) > bound)`` exactly, in integers (fast for thousands of clients)."""
    rest = denominator - numerator
    total, term = 0, numerator**num_clients  # k = N: comb(N, N) a^N rest^0
    for k in range(num_clients, bound, -1):
        total += term
        # comb(N, k-1) a^(k-1) rest^(N-k+1) from comb(N, k) a^k rest^(N-k).
        term = term * k * rest // ((num_clients - k + 1) * numerator)
    return Fraction(total, denominator**num_clients)


@pytest.mark.parametrize("num_clients,rate", [(2000, (1, 2)), (3200, (1, 2)), (5000, (1, 4))])
def test_poisson_cohort_bound_is_smallest_for_large_populations(num_clients, rate):
    """Thousands of clients, where a search in steps of a fraction of a standard deviation
    would overshoot. Rates are exact binary fractions, so the integer tails are exact."""
    a, d = rate
    assert exact_tail_above(10, 1, 4, 3) == Fraction(
        sum(math.comb(10, k) * 3 ** (10 - k) for k in range(4, 11)), 4**10
    )
    for probability in (1e-9, 1e-3):
        bound = poisson_cohort_bound(num_clients, a / d, probability)
        assert exact_tail_above(num_clients, a, d, bound) <= Fraction(probability)
        assert exact_tail_above(num_clients, a, d, bound - 1) > Fraction(probability), bound


# --------------------------------------------------------------------------------- Poisson
def test_poisson_sampler_includes_each_client_at_its_rate():
    num_clients, rate, rounds = 50, 0.2, 3000
    sampler = PoissonSampler(seed=2, num_clients=num_clients, rate=rate)
    assert sampler.expected_cohort == pytest.approx(10.0)
    assert sampler.max_cohort == poisson_cohort_bound(num_clients, rate, 1e-9)
    counts, sizes = np.zeros(num_clients), []
    for r in range(rounds):
        ids = sampler.sample(r)
        assert len(set(ids.tolist())) == len(ids) and np.all(np.diff(ids) > 0)
        counts[ids] += 1
        sizes.append(len(ids))
    np.testing.assert_array_equal(
        sampler.sample(17), PoissonSampler(2, num_clients, rate).sample(17)
    )
    # Each client's inclusion frequency: Binomial(rounds, q) / rounds.
    sd = math.sqrt(rate * (1 - rate) / rounds)
    np.testing.assert_array_less(np.abs(counts / rounds - rate), SIGMAS * sd)
    # The cohort size is random, Binomial(N, q): mean N q = 10, variance N q (1 - q) = 8.
    sizes = np.asarray(sizes)
    assert abs(sizes.mean() - 10.0) < SIGMAS * math.sqrt(8.0 / rounds)
    # The sample variance of n draws has relative sd ~ sqrt(2 / n) (binomial kurtosis ~ normal).
    assert abs(sizes.var(ddof=1) / 8.0 - 1) < SIGMAS * math.sqrt(2.0 / rounds)


def test_poisson_sampler_raises_on_overflow_and_never_truncates():
    unbounded = PoissonSampler(seed=0, num_clients=50, rate=0.2, max_cohort=50)
    bounded = PoissonSampler(seed=0, num_clients=50, rate=0.2, max_cohort=10)
    assert bounded.max_cohort == 10
    overflowed = 0
    for r in range(60):
        ids = unbounded.sample(r)
        if len(ids) > 10:
            overflowed += 1
            with pytest.raises(CohortOverflowError, match=f"round {r}"):
                bounded.sample(r)
        else:
            np.testing.assert_array_equal(bounded.sample(r), ids)
    assert 0 < overflowed < 60  # P(X > 10) ~ 0.42: both branches ran


def test_poisson_sampler_refuses_a_bound_below_the_expected_cohort():
    with pytest.raises(ValueError, match="max_cohort=9"):
        PoissonSampler(seed=0, num_clients=50, rate=0.2, max_cohort=9)
    assert PoissonSampler(0, 50, 0.2, max_cohort=10).max_cohort == 10
    assert PoissonSampler(0, 50, 0.2, max_cohort=80).max_cohort == 50  # at most the population
    for rate in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            PoissonSampler(0, 50, rate)


# ---------------------------------------------------------------------------- availability
def test_availability_sampler_only_returns_available_clients():
    availability = np.full(30, 0.6)
    offline = [0, 7, 8, 29]
    availability[offline] = 0.0
    sampler = AvailabilitySampler(
        seed=1, num_clients=30, num_per_round=30, availability=availability
    )
    counts, rounds = np.zeros(30), 2000
    for r in range(rounds):
        ids = sampler.sample(r)
        assert not set(ids.tolist()) & set(offline)
        assert np.all(np.diff(ids) > 0)
        counts[ids] += 1
    np.testing.assert_array_equal(sampler.sample(5), sampler.sample(5))
    # Nobody is turned away (30 per round): each client appears at its availability.
    online = np.setdiff1d(np.arange(30), offline)
    assert np.all(counts[offline] == 0)
    sd = math.sqrt(0.6 * 0.4 / rounds)
    np.testing.assert_array_less(np.abs(counts[online] / rounds - 0.6), SIGMAS * sd)


def test_availability_sampler_returns_fewer_when_few_are_online():
    # Exactly three clients are ever online: every round returns exactly them.
    always = np.zeros(20)
    always[[3, 11, 12]] = 1.0
    sampler = AvailabilitySampler(0, 20, 5, always)
    assert sampler.max_cohort == 5
    for r in range(10):
        np.testing.assert_array_equal(sampler.sample(r), [3, 11, 12])
    # Online with probability 0.1: ~Binomial(50, 0.1) = 5 online, fewer than 20 asked for.
    sparse = AvailabilitySampler(0, 50, 20, 0.1)
    sizes = [len(sparse.sample(r)) for r in range(200)]
    assert max(sizes) < 20 and np.mean(sizes) == pytest.approx(
        5.0, abs=SIGMAS * math.sqrt(4.5 / 200)
    )
    # Many online: exactly num_per_round are drawn.
    dense = AvailabilitySampler(0, 50, 20, 0.9)
    assert all(len(dense.sample(r)) == 20 for r in range(20))


@pytest.mark.parametrize(
    "availability", [-0.1, 1.5, 0.0, [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 2.0, 0.5]]
)
def test_availability_sampler_refuses_bad_probabilities(availability):
    with pytest.raises(ValueError, match="availability"):
        AvailabilitySampler(0, 4, 2, availability)


# ------------------------------------------------------------------------------- scheduled
def test_scheduled_sampler_cycles_and_validates():
    sampler = ScheduledSampler([[1, 2, 3], [0], []], num_clients=4)
    assert sampler.max_cohort == 3 and sampler.expected_cohort == pytest.approx(4 / 3)
    for r, want in enumerate([[1, 2, 3], [0], [], [1, 2, 3], [0]]):
        np.testing.assert_array_equal(sampler.sample(r), want)
    with pytest.raises(ValueError, match="at least one round"):
        ScheduledSampler([], 4)
    with pytest.raises(ValueError, match="round 1: ids must be distinct"):
        ScheduledSampler([[0, 1], [2, 2]], 4)
    with pytest.raises(ValueError, match=r"round 0: ids must be in \[0, 4\)"):
        ScheduledSampler([[0, 4]], 4)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        ScheduledSampler([[-1]], 4)
    with pytest.raises(ValueError, match="distinct"):
        ScheduledSampler([[[0, 1]]], 4)  # not one flat list of ids


# --------------------------------------------------------------------------------- cohorts
def test_cohort_slots_are_the_fewest_whole_chunks_per_device():
    for max_cohort in range(1, 26):
        for devices in (1, 2, 3, 4, 8):
            for chunk in (None, 1, 2, 3, 5, 8):
                slots = cohort_slots(max_cohort, chunk, devices)
                per_device = slots // devices
                assert slots % devices == 0 and slots >= max_cohort
                # Chunk None: one chunk per device, as many slots as the busiest device needs.
                unit = devices * (chunk or math.ceil(max_cohort / devices))
                assert slots % unit == 0, (max_cohort, chunk, devices, slots)
                assert slots - unit < max_cohort, (max_cohort, chunk, devices, slots)
                if chunk is not None:
                    assert per_device % chunk == 0


def test_make_cohort_pads_and_masks():
    cohort = make_cohort(np.asarray([5, 2, 9]), slots=6)
    np.testing.assert_array_equal(cohort.client_ids, [5, 2, 9, 0, 0, 0])
    np.testing.assert_array_equal(cohort.participating, [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(cohort.delivered, cohort.participating)
    assert cohort.client_ids.dtype == np.int32 and cohort.participating.dtype == bool
    empty = make_cohort(np.zeros(0, np.int32), slots=2)
    assert not empty.participating.any() and not empty.delivered.any()
    with pytest.raises(CohortOverflowError, match="4 sampled clients do not fit 3 slots"):
        make_cohort(np.arange(4), slots=3)


def test_make_cohort_dropout_rate_and_determinism():
    ids, rounds, rate = np.arange(10), 2000, 0.3
    delivered = np.zeros(10)
    for r in range(rounds):
        cohort = make_cohort(ids, 12, dropout=rate, seed=4, round_num=r)
        # Delivered implies participating; padding is never delivered.
        assert not np.any(cohort.delivered & ~cohort.participating)
        np.testing.assert_array_equal(cohort.participating, np.arange(12) < 10)
        again = make_cohort(ids, 12, dropout=rate, seed=4, round_num=r)
        np.testing.assert_array_equal(again.delivered, cohort.delivered)
        delivered += cohort.delivered[:10]
    lost = 1 - delivered.sum() / (rounds * 10)
    assert abs(lost - rate) < SIGMAS * math.sqrt(rate * (1 - rate) / (rounds * 10))
    # Every slot drops at the rate (no position is favoured).
    per_slot = 1 - delivered / rounds
    np.testing.assert_array_less(
        np.abs(per_slot - rate), SIGMAS * math.sqrt(rate * (1 - rate) / rounds)
    )
    # The draw depends on the round and the seed.
    masks = {tuple(make_cohort(ids, 10, 0.3, 4, r).delivered) for r in range(10)}
    assert len(masks) > 1
    assert any(
        not np.array_equal(
            make_cohort(ids, 10, 0.3, 4, r).delivered, make_cohort(ids, 10, 0.3, 5, r).delivered
        )
        for r in range(10)
    )


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["--sampling.kind", "poisson", "--sampling.max_cohort", "2"], "sampling.max_cohort"),
        (["--sampling.max_cohort", "32"], "sampling.max_cohort"),  # only for poisson
        (["--sampling.dropout", "1.0"], "sampling.dropout"),
        (["--sampling.dropout", "-0.1"], "sampling.dropout"),
        (["--sampling.availability", "0"], "sampling.availability"),
        (["--sampling.availability", "1.5"], "sampling.availability"),
        (["--sampling.overflow_probability", "0"], "sampling.overflow_probability"),
        (["--sampling.kind", "sometimes"], "sometimes"),
    ],
)
def test_bad_sampling_config_names_its_key(overrides, key):
    assert load_config(None, []).run.num_clients_per_round == 16
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_good_sampling_config_loads():
    config = load_config(
        None,
        ["--sampling.kind", "poisson", "--sampling.max_cohort", "24", "--sampling.dropout", "0.2"],
    )
    assert config.sampling.kind == "poisson" and config.sampling.max_cohort == 24
    assert config.sampling.dropout == 0.2


# ------------------------------------------------------------------------------ end to end
def fast_sections(**sections):
    """The tiny config without evaluation or files beyond the metrics, with plain SGD."""
    return {
        "client": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "batch_size": 4},
        "eval": {"every": 0},
        **sections,
    }


def sampling_run(make_config, sampling, num_rounds):
    config = make_config(
        **fast_sections(
            sampling=sampling,
            run={"num_rounds": num_rounds, "save_checkpoints": False, "partition_report": False},
        )
    )
    sim = Simulation(config, verbose=False)
    history = [h for h in sim.run() if "train_loss" in h]
    assert len(history) == num_rounds
    return sim, history


@pytest.mark.slow
def test_poisson_run_reports_its_cohorts(make_config):
    sim, history = sampling_run(make_config, {"kind": "poisson"}, num_rounds=4)
    assert isinstance(sim.sampler, PoissonSampler)
    assert sim.sampler.rate == pytest.approx(4 / 8)  # num_clients_per_round / population
    assert sim.slots == cohort_slots(sim.sampler.max_cohort, None, 1)
    for r, record in enumerate(history):
        drawn = len(sim.sampler.sample(r))
        assert record["sampled"] == drawn
        assert record["participants"] == drawn and record["dropped"] == 0
        assert record["padding_slots"] == sim.slots - drawn
        assert np.isfinite(record["train_loss"])
    assert len({h["sampled"] for h in history}) > 1  # the cohort size is random


@pytest.mark.slow
def test_dropout_run_reports_lost_uploads(make_config):
    sim, history = sampling_run(make_config, {"dropout": 0.5}, num_rounds=4)
    for r, record in enumerate(history):
        assert record["sampled"] == 4 and record["padding_slots"] == sim.slots - 4
        assert record["participants"] == record["sampled"] - record["dropped"]
        cohort = make_cohort(sim.sampler.sample(r), sim.slots, 0.5, sim.config.run.seed, r)
        assert record["dropped"] == int((cohort.participating & ~cohort.delivered).sum())
        # Only delivered uploads are counted (an upload is as large as the broadcast here).
        assert (
            record["bytes_up"] * record["sampled"] == record["bytes_down"] * record["participants"]
        )
    # P(no client of 4 rounds x 4 drops) = 2^-16; the draw is seeded, so this is deterministic.
    assert any(h["dropped"] > 0 for h in history)
