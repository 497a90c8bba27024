"""System heterogeneity as masks: capability tiers, a round deadline, FedNova, availability.

The round runs linear least squares (the problem of tests/test_algorithms.py) so every
client's local steps can be recomputed in float64 numpy from the papers' formulas.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algorithms import (
    ATOL,
    BATCH,
    OBJECTIVE,
    RTOL,
    SCHEDULE,
    SIZES,
    STEPS,
    M,
    client_sgd,
    cohort,
    flat,
    make_problem,
    np_data,
)

from fedjax_llm import simulate
from fedjax_llm.algorithms import make_fedavg, make_fednova
from fedjax_llm.algorithms.fednova import effective_steps
from fedjax_llm.client_profiles import (
    DEADLINE,
    MAX_LOCAL_STEPS,
    STEP_TIME,
    assign_tiers,
    build_client_profile,
    local_step_limit,
)
from fedjax_llm.config import ConfigError, ServerConfig, SystemConfig, load_config
from fedjax_llm.optimizers import make_server_optimizer
from fedjax_llm.round import init_round_state, make_round_fn, round_hparams
from fedjax_llm.sampling import AvailabilitySampler


def np_local(theta, client, lr, steps):
    """``steps`` local SGD steps of a client in stored order (its first ``steps`` batches)."""
    features, targets, _ = np_data()
    start = sum(SIZES[:client])
    indices = start + np.arange(STEPS * BATCH).reshape(STEPS, BATCH) % SIZES[client]
    local = theta.copy()
    for idx in indices[:steps]:
        a, y = features[idx], targets[idx]
        local = local - lr * a.T @ (a @ local - y) / BATCH
    return local


def run_round(algorithm, profile, ids, values=None, lr=0.1):
    data, params = make_problem()
    data = data._replace(
        client_profile={k: jnp.asarray(v, jnp.float32) for k, v in profile.items()}
    )
    round_fn = jax.jit(
        make_round_fn(algorithm, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=None)
    )
    state = init_round_state(algorithm, params, M)
    hparams = round_hparams(lr, 1.0, values or {})
    return round_fn(None, state, data, cohort(ids), jax.random.key(0), hparams)


def sgd_server():
    return make_server_optimizer(ServerConfig(), "sgd")


# ------------------------------------------------------------------------------------ tiers
def test_assign_tiers_sizes_follow_fractions_and_are_seeded():
    tiers = assign_tiers(10, (0.25, 0.25, 0.5), seed=3)
    # 2.5, 2.5, 5 -> largest remainder gives the first .5 remainder to tier 0.
    assert np.bincount(tiers, minlength=3).tolist() == [3, 2, 5]
    np.testing.assert_array_equal(tiers, assign_tiers(10, (0.25, 0.25, 0.5), seed=3))
    assert not np.array_equal(tiers, assign_tiers(10, (0.25, 0.25, 0.5), seed=4))


def test_profile_gives_each_client_its_tiers_values():
    system = SystemConfig(tier_fractions=(0.5, 0.5), tier_local_steps=(1, 3))
    profile = build_client_profile(system, 8, seed=0)
    tiers = assign_tiers(8, (0.5, 0.5), seed=0)
    np.testing.assert_array_equal(profile[MAX_LOCAL_STEPS], np.array([1, 3])[tiers])
    assert build_client_profile(SystemConfig(), 8, seed=0) == {}


def test_local_step_limit_is_the_smallest_limit():
    assert local_step_limit({}) is None
    assert local_step_limit({STEP_TIME: jnp.float32(0.3)}) is None  # no deadline: no limit
    limit = local_step_limit(
        {MAX_LOCAL_STEPS: jnp.float32(3), STEP_TIME: jnp.float32(0.3), DEADLINE: jnp.float32(0.7)}
    )
    assert float(limit) == 2.0  # floor(0.7 / 0.3) = 2 < 3


# ------------------------------------------------------------------------ round: step masks
def test_compute_tiers_cut_local_steps_exactly():
    """Clients with budgets (1, 3, 2, 3) train exactly that many SGD steps; the FedAvg mean
    uses their example counts."""
    budgets = np.array([1, 3, 2, 3], np.float32)
    ids = (0, 1, 2)
    state, out = run_round(make_fedavg(client_sgd(), sgd_server()), {MAX_LOCAL_STEPS: budgets}, ids)
    *_, theta = np_data()
    deltas = np.stack([np_local(theta, i, 0.1, int(budgets[i])) - theta for i in ids])
    weights = np.array([SIZES[i] for i in ids], np.float64)
    expected = theta + weights / weights.sum() @ deltas
    np.testing.assert_allclose(flat(state.server.params), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out.metrics["steps"]), budgets[list(ids)].sum())


def test_deadline_cuts_stragglers_and_changing_it_never_recompiles():
    step_time = np.array([0.1, 0.25, 0.5, 1.0], np.float32)
    algorithm = make_fedavg(client_sgd(), sgd_server())
    data, params = make_problem()
    data = data._replace(client_profile={STEP_TIME: jnp.asarray(step_time)})
    traces = []

    def counted(*args):
        traces.append(1)
        return make_round_fn(
            algorithm, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=2
        )(*args)

    round_fn = jax.jit(counted)
    state = init_round_state(algorithm, params, M)
    steps = {}
    for deadline in (0.5, 1.0, 2.9):
        _, out = round_fn(
            None,
            state,
            data,
            cohort((0, 1, 2, 3), (1, 1, 1, 1)),
            jax.random.key(0),
            round_hparams(0.1, 1.0, {DEADLINE: deadline}),
        )
        steps[deadline] = float(out.metrics["steps"])
    assert len(traces) == 1
    # min(K=3, floor(deadline / step_time)) per client.
    for deadline, total in steps.items():
        expected = sum(min(STEPS, int(np.floor(deadline / t + 1e-6))) for t in step_time)
        assert total == expected, (deadline, total, expected)


# ------------------------------------------------------------------------------- FedNova
def test_fednova_equals_fedavg_when_every_client_takes_the_same_steps():
    ids = (3, 1, 0)
    nova, _ = run_round(make_fednova(client_sgd(), sgd_server()), {}, ids)
    avg, _ = run_round(make_fedavg(client_sgd(), sgd_server()), {}, ids)
    chex.assert_trees_all_close(nova.server.params, avg.server.params, rtol=1e-6, atol=1e-7)


def test_fednova_normalized_averaging_by_hand():
    """Wang et al. 2020: x + tau_eff sum_i p_i (y_i - x) / tau_i, tau_eff = sum_i p_i tau_i."""
    budgets = np.array([1, 3, 2, 3], np.float32)
    ids = (0, 1, 2)
    state, out = run_round(
        make_fednova(client_sgd(), sgd_server()), {MAX_LOCAL_STEPS: budgets}, ids
    )
    *_, theta = np_data()
    p = np.array([SIZES[i] for i in ids], np.float64)
    p /= p.sum()
    taus = budgets[list(ids)].astype(np.float64)
    normalized = np.stack(
        [(np_local(theta, i, 0.1, int(t)) - theta) / t for i, t in zip(ids, taus, strict=True)]
    )
    tau_eff = p @ taus
    expected = theta + tau_eff * (p @ normalized)
    np.testing.assert_allclose(flat(state.server.params), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(out.pipeline["fednova/tau_eff"]), tau_eff, rtol=1e-6)
    # FedAvg on the same round gives a different (inconsistent) update.
    avg, _ = run_round(make_fedavg(client_sgd(), sgd_server()), {MAX_LOCAL_STEPS: budgets}, ids)
    assert not np.allclose(flat(avg.server.params), expected, rtol=1e-3)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_effective_steps_sum_momentum_coefficients(rho):
    """a_i is the total weight heavy-ball momentum gives the gradients of tau steps: with unit
    gradients, m_t = 1 + rho m_{t-1} and a = sum_t m_t."""
    for tau in (1, 2, 5):
        m, total = 0.0, 0.0
        for _ in range(tau):
            m = 1.0 + rho * m
            total += m
        np.testing.assert_allclose(float(effective_steps(tau, rho)), total, rtol=1e-6)


def test_fednova_refuses_adaptive_local_optimizers():
    with pytest.raises(ConfigError, match="fednova"):
        load_config(None, ["--algorithm.type", "fednova", "--client.optimizer", "adamw"])


# --------------------------------------------------------------------------- availability
def test_availability_cycle_follows_groups_and_rounds():
    sampler = AvailabilitySampler(0, 1000, 10, 0.5, groups=2, period=8, amplitude=1.0)
    at0 = sampler.availability_at(0)
    # Two groups half a period apart: one at 0.5 * 2 = 1, the other at 0.5 * 0 = 0.
    assert sorted(np.unique(np.round(at0, 6)).tolist()) == [0.0, 1.0]
    at4 = sampler.availability_at(4)
    np.testing.assert_allclose(at4, 1.0 - at0, atol=1e-9)
    # Sampled clients come from the online group only.
    online = set(np.flatnonzero(at0 > 0.5).tolist())
    assert set(sampler.sample(0).tolist()) <= online
    constant = AvailabilitySampler(0, 1000, 10, 0.5)
    np.testing.assert_array_equal(constant.availability_at(3), np.full(1000, 0.5))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["--system.tier_fractions", "[0.5,0.6]"], "system.tier_fractions"),
        (
            ["--system.tier_fractions", "[0.5,0.5]", "--system.tier_local_steps", "[2]"],
            "system.tier_local_steps",
        ),
        (["--system.tier_local_steps", "[9]"], "system.tier_local_steps"),
        (
            ["--system.tier_step_time_s", "[0.3]", "--system.deadline_s", "0.1"],
            "shorter than one local step",
        ),
        (["--system.deadline_s", "1.0"], "needs system.tier_step_time_s"),
        (
            ["--trainable.mode", "lora", "--system.tier_lora_ranks", "[9]"],
            "system.tier_lora_ranks",
        ),
        (
            ["--trainable.mode", "lora", "--system.tier_lora_ranks", "[0]"],
            "system.tier_lora_ranks",
        ),
        (["--sampling.availability_period", "8"], "sampling.kind=availability"),
    ],
)
def test_bad_system_settings_fail_at_load(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


# ----------------------------------------------------------------------------- end to end
def test_tiers_deadline_and_fednova_run_end_to_end(make_config):
    """Two tiers (1 and 4 local steps at 0.2 s and 0.5 s a step), a 1.0 s deadline (the slow
    tier stops at 2 steps) and a day/night availability cycle: FedNova learns and reports the
    effective steps."""
    config = make_config(
        client={"optimizer": "sgd", "lr": 0.5, "local_steps": 4},
        algorithm={"type": "fednova"},
        system={
            "tier_fractions": (0.5, 0.5),
            "tier_local_steps": (1, 4),
            "tier_step_time_s": (0.2, 0.5),
            "deadline_s": 1.0,
        },
        sampling={
            "kind": "availability",
            "availability": 0.8,
            "availability_groups": 2,
            "availability_period": 4,
            "availability_amplitude": 0.25,
        },
        run={"num_rounds": 4},
    )
    history = simulate(config, verbose=False)
    rounds = [h for h in history if "train_loss" in h]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    for h in rounds:
        # Each client takes 1 (fast tier: budget 1) or 2 (slow tier: deadline) steps.
        assert h["participants"] <= h["local_steps"] <= 2 * h["participants"]
        assert 1.0 <= h["pipeline/fednova/tau_eff"] <= 2.0


def test_a_client_stopped_before_its_first_step_keeps_its_state():
    """A top-k error-feedback residual built in round 1 survives a round where the client's
    budget is 0 steps (its weight is 0: whatever it would send is not aggregated)."""
    from fedjax_llm.compression import compress_upload, topk_compressor
    from fedjax_llm.pipeline import AggregationPipeline, weighted_mean

    algorithm = make_fedavg(client_sgd(), sgd_server())
    pipeline = AggregationPipeline(compress_upload(topk_compressor(0.25)), weighted_mean())
    data, params = make_problem()
    round_fn = jax.jit(
        make_round_fn(
            algorithm,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=M,
            clients_per_chunk=None,
            pipeline=pipeline,
        )
    )
    state = init_round_state(algorithm, params, M, pipeline=pipeline)
    ids, hparams = cohort((0, 1, 2)), round_hparams(0.1)
    budgets = {MAX_LOCAL_STEPS: jnp.asarray([3, 3, 3, 3], jnp.float32)}
    state, _ = round_fn(
        None, state, data._replace(client_profile=budgets), ids, jax.random.key(0), hparams
    )
    before = jax.tree.map(lambda x: np.asarray(x[0]), state.clients.transform)
    assert any(np.any(x != 0) for x in jax.tree.leaves(before))
    budgets = {MAX_LOCAL_STEPS: jnp.asarray([0, 3, 3, 3], jnp.float32)}
    state, out = round_fn(
        None, state, data._replace(client_profile=budgets), ids, jax.random.key(1), hparams
    )
    assert float(out.weights[0]) == 0.0
    after = jax.tree.map(lambda x: np.asarray(x[0]), state.clients.transform)
    chex.assert_trees_all_equal(after, before)
