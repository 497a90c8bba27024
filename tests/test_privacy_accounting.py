"""Tests of fedjax_llm.privacy.accounting against dp_accounting on published settings."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_llm.config import ConfigError
from fedjax_llm.privacy import accounting as acc
from fedjax_llm.privacy.accounting import (
    PrivacyAccountant,
    SamplingPlan,
    adaptive_clipping_noise,
    compute_epsilon,
    default_delta,
    make_accountant,
    make_dp_event,
    noise_multiplier_for_epsilon,
    plan_for_sampler,
    sample_level_epsilon,
    validate_delta,
)

# DP-SGD on MNIST (Abadi et al. 2016): batch 256 of 60000, sigma 1.1, 60 epochs, delta 1e-5.
MNIST_PLAN = SamplingPlan("poisson", 60000, 256.0)
MNIST_STEPS = 60 * 60000 // 256  # 14062
MNIST_DELTA = 1e-5

# Cross-device DP-FedAvg in the style of McMahan et al. 2018: 1e6 clients, 1000 per round.
XDEV_PLAN = SamplingPlan("poisson", 1_000_000, 1000.0)
XDEV_ROUNDS = 2000
XDEV_DELTA = default_delta(1_000_000)

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def test_mnist_dp_sgd_rdp_matches_dp_accounting():
    event = dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1))
    direct = rdp.RdpAccountant().compose(event, 14062).get_epsilon(1e-5)
    eps = compute_epsilon(1.1, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA, "rdp")
    assert eps == pytest.approx(direct, rel=1e-12)
    assert 2.0 < eps < 3.5  # About 3 with the original moments accountant, 2.6 with RDP.


def test_mnist_dp_sgd_pld_matches_dp_accounting():
    event = dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1))
    direct = pld.PLDAccountant().compose(event, 14062).get_epsilon(1e-5)
    eps = compute_epsilon(1.1, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA, "pld")
    assert eps == pytest.approx(direct, rel=1e-12)
    assert eps < compute_epsilon(1.1, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA, "rdp")


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_cross_device_matches_dp_accounting(name):
    event = dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(1.0))
    fresh = rdp.RdpAccountant() if name == "rdp" else pld.PLDAccountant()
    direct = fresh.compose(event, XDEV_ROUNDS).get_epsilon(XDEV_DELTA)
    eps = compute_epsilon(1.0, XDEV_PLAN, XDEV_ROUNDS, XDEV_DELTA, name)
    assert eps == pytest.approx(direct, rel=1e-12)
    assert 0 < eps < 2


def test_fixed_size_sampling_uses_replace_one_and_half_the_multiplier():
    plan = SamplingPlan("fixed", 1000, 50)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 50, dp_accounting.GaussianDpEvent(2.0 / 2)
    )
    direct = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE).compose(event, 100)
    eps = compute_epsilon(2.0, plan, 100, 1e-4, "rdp")
    assert eps == pytest.approx(direct.get_epsilon(1e-4), rel=1e-12)
    accountant = make_accountant("rdp", plan)
    assert accountant.neighboring_relation == REPLACE_ONE
    assert make_accountant("rdp", MNIST_PLAN).neighboring_relation == ADD_REMOVE


def test_make_dp_event():
    assert make_dp_event(1.3, MNIST_PLAN) == dp_accounting.PoissonSampledDpEvent(
        256 / 60000, dp_accounting.GaussianDpEvent(1.3)
    )
    assert make_dp_event(1.3, SamplingPlan("fixed", 100, 10)) == (
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.65))
    )
    assert make_dp_event(0.0, MNIST_PLAN) == dp_accounting.NonPrivateDpEvent()
    assert compute_epsilon(0.0, MNIST_PLAN, 10, MNIST_DELTA) == math.inf
    assert compute_epsilon(0.0, MNIST_PLAN, 10, MNIST_DELTA, "pld") == math.inf
    assert compute_epsilon(1.0, MNIST_PLAN, 0, MNIST_DELTA) == 0.0
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        make_dp_event(-1.0, MNIST_PLAN)


def test_epsilon_monotone_in_noise_rounds_and_rate():
    plan = SamplingPlan("poisson", 10_000, 100.0)
    delta = 1e-5
    for name in ["rdp", "pld"]:
        by_noise = [compute_epsilon(z, plan, 200, delta, name) for z in (1.5, 2.0, 3.0, 4.0)]
        assert np.all(np.diff(by_noise) < 0), (name, by_noise)
    by_rounds = [compute_epsilon(1.0, plan, n, delta) for n in (10, 100, 1000, 5000)]
    assert np.all(np.diff(by_rounds) > 0)
    by_rate = [
        compute_epsilon(1.0, SamplingPlan("poisson", 10_000, m), 200, delta)
        for m in (10.0, 100.0, 1000.0, 10_000.0)
    ]
    assert np.all(np.diff(by_rate) > 0)
    small, large = (SamplingPlan("fixed", 10_000, m) for m in (10, 100))
    assert compute_epsilon(2.0, small, 200, delta) < compute_epsilon(2.0, large, 200, delta)


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_noise_multiplier_for_epsilon_round_trips_rdp(target):
    z = noise_multiplier_for_epsilon(target, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA)
    eps = compute_epsilon(z, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA)
    assert eps <= target
    # Within the 1e-3 relative tolerance of z: a slightly smaller z misses the target.
    assert compute_epsilon(z / 1.002, MNIST_PLAN, MNIST_STEPS, MNIST_DELTA) > target
    assert eps == pytest.approx(target, rel=0.01)


def test_noise_multiplier_for_epsilon_round_trips_pld_and_fixed():
    plan = SamplingPlan("poisson", 10_000, 100.0)
    z = noise_multiplier_for_epsilon(0.3, plan, 200, 1e-5, "pld")
    assert compute_epsilon(z, plan, 200, 1e-5, "pld") <= 0.3
    assert compute_epsilon(z / 1.002, plan, 200, 1e-5, "pld") > 0.3
    assert z < noise_multiplier_for_epsilon(0.3, plan, 200, 1e-5, "rdp")  # PLD is tighter.
    fixed = SamplingPlan("fixed", 10_000, 100)
    z = noise_multiplier_for_epsilon(3.0, fixed, 200, 1e-5)
    assert compute_epsilon(z, fixed, 200, 1e-5) <= 3.0
    assert compute_epsilon(z / 1.002, fixed, 200, 1e-5) > 3.0


def test_unreachable_target_raises():
    plan = SamplingPlan("poisson", 100, 50.0)
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon=1e-05 cannot be reached"):
        noise_multiplier_for_epsilon(1e-5, plan, 100_000, 1e-3)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        noise_multiplier_for_epsilon(-1.0, plan, 10, 1e-3)
    with pytest.raises(ConfigError, match="run.num_rounds"):
        noise_multiplier_for_epsilon(1.0, plan, 0, 1e-3)


def test_sampling_kinds_and_accountants_refused():
    fixed = SamplingPlan("fixed", 1000, 10)
    with pytest.raises(ConfigError, match="privacy.accountant=rdp.*sampling.kind=poisson"):
        make_accountant("pld", fixed)
    with pytest.raises(ConfigError, match="pld"):
        compute_epsilon(1.0, fixed, 10, 1e-4, "pld")
    with pytest.raises(ConfigError, match="pld"):
        PrivacyAccountant("pld", fixed, 1e-4)
    with pytest.raises(ConfigError, match="privacy.accountant='moments'"):
        make_accountant("moments", fixed)
    with pytest.raises(ConfigError, match="'fixed'"):
        SamplingPlan("uniform", 1000, 10)
    with pytest.raises(ConfigError, match="sampling.kind='availability'"):
        SamplingPlan("availability", 1000, 10)
    with pytest.raises(ConfigError, match="sampling.kind"):
        plan_for_sampler("availability", 1000, 10)
    assert plan_for_sampler("uniform", 1000, 10) == fixed
    assert plan_for_sampler("poisson", 1000, 10).sampling_rate == 0.01
    with pytest.raises(ConfigError, match="whole number"):
        SamplingPlan("fixed", 1000, 10.5)
    with pytest.raises(ConfigError, match="run.num_clients_per_round"):
        SamplingPlan("poisson", 1000, 2000.0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        SamplingPlan("poisson", 0, 1.0)


def test_delta_validation():
    validate_delta(1e-3, 1000)
    for bad in [0.0, -1e-3, 1.0, 2e-3]:
        with pytest.raises(ConfigError, match="privacy.delta"):
            validate_delta(bad, 1000)
    with pytest.raises(ConfigError, match="outright"):
        compute_epsilon(1.0, MNIST_PLAN, 10, 1e-3)
    assert default_delta(1000) == pytest.approx(1000**-1.1)
    validate_delta(default_delta(1000), 1000)


def test_adaptive_clipping_noise_closed_form():
    for z, sigma_b in [(1.0, 10.0), (0.5, 0.3), (2.0, 1.2)]:
        z_delta = adaptive_clipping_noise(z, sigma_b)
        assert z_delta == pytest.approx(float(np.power(z**-2.0 - (2.0 * sigma_b) ** -2.0, -0.5)))
        assert z_delta > z
        # The two releases compose to one Gaussian with multiplier z (exactly, in RDP).
        two = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z_delta))
        two.compose(dp_accounting.GaussianDpEvent(2 * sigma_b))
        one = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z))
        assert two.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert adaptive_clipping_noise(0.0, 1.0) == 0.0
    with pytest.raises(ConfigError, match=r"clipped_count_stddev=0\.5 must be > .* = 0\.5"):
        adaptive_clipping_noise(1.0, 0.5)


def test_sample_level_epsilon():
    direct = rdp.RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 40)
    )
    assert sample_level_epsilon(1.5, 40, 1e-5) == pytest.approx(direct.get_epsilon(1e-5))
    # One step with PLD is the exact Gaussian mechanism.
    exact = dp_accounting.get_epsilon_gaussian(2.0, 1e-5)
    assert sample_level_epsilon(2.0, 1, 1e-5, "pld") == pytest.approx(exact, rel=1e-3)
    assert sample_level_epsilon(2.0, 4, 1e-5, "pld") > sample_level_epsilon(2.0, 1, 1e-5, "pld")
    assert sample_level_epsilon(1.0, 0, 1e-5) == 0.0
    assert sample_level_epsilon(0.0, 3, 1e-5) == math.inf


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_privacy_accountant_state_round_trip(name):
    plan = SamplingPlan("poisson", 10_000, 100.0)
    ledger = PrivacyAccountant(name, plan, 1e-5)
    assert ledger.epsilon() == 0.0 and ledger.rounds == 0
    for _ in range(5):
        ledger.compose(2.0, 20)
    assert ledger.state()["records"] == [[2.0, 100]]
    assert ledger.epsilon() == pytest.approx(compute_epsilon(2.0, plan, 100, 1e-5, name), rel=1e-12)
    ledger.compose(1.5)
    ledger.compose(1.5, 9)
    ledger.compose(2.0, 0)
    assert ledger.state()["records"] == [[2.0, 100], [1.5, 10]]
    assert ledger.rounds == 110
    restored = PrivacyAccountant.from_state(json.loads(json.dumps(ledger.state())))
    assert restored.epsilon() == ledger.epsilon()
    assert restored.state() == ledger.state()
    assert restored.rounds == 110


def test_epsilon_after_does_not_mutate():
    plan = SamplingPlan("poisson", 10_000, 100.0)
    ledger = PrivacyAccountant("rdp", plan, 1e-5)
    ledger.compose(1.5, 50)
    before, state = ledger.epsilon(), ledger.state()
    after = ledger.epsilon_after(1.5, 25)
    assert after == pytest.approx(compute_epsilon(1.5, plan, 75, 1e-5), rel=1e-12)
    assert after > before
    assert ledger.epsilon() == before and ledger.state() == state and ledger.rounds == 50
    assert ledger.epsilon_after(1.5, 0) == before


def test_from_state_rejects_garbage():
    with pytest.raises(ValueError, match="privacy accountant state"):
        PrivacyAccountant.from_state({"version": 1})
    good = PrivacyAccountant("rdp", MNIST_PLAN, 1e-5).state()
    with pytest.raises(ValueError, match="ledger record"):
        PrivacyAccountant.from_state({**good, "records": [[-1.0, 3]]})
    with pytest.raises(ValueError, match="version"):
        PrivacyAccountant.from_state({**good, "version": 99})


def test_accounting_module_does_not_import_jax_itself():
    source = open(acc.__file__).read()
    assert "import jax" not in source and "from jax" not in source
