"""Byzantine clients and robust aggregation in the round (`fedjax_llm.robustness`): the attack
wrapper, the run's fixed malicious set, and an attack that breaks FedAvg but not the robust
aggregators, on linear regression where the truth is known."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_pipeline import OBJECTIVE

from fedjax_llm import ConfigError, Simulation
from fedjax_llm.algorithms import make_fedavg
from fedjax_llm.pipeline import (
    AggregationPipeline,
    coordinate_median_aggregator,
    identity,
    weighted_mean,
)
from fedjax_llm.robustness import (
    centered_clipping_aggregator,
    geometric_median_aggregator,
    krum_aggregator,
    malicious_clients,
    norm_bounding_aggregator,
    trimmed_mean_aggregator,
    with_attack,
)
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import make_cohort

NUM_CLIENTS, PER_CLIENT, D = 10, 8, 3
ALGORITHM = make_fedavg(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), optax.sgd(1.0))
SCHEDULE = LocalSchedule(local_steps=4, batch_size=4, max_client_examples=PER_CLIENT)
SETTINGS = types.SimpleNamespace(scale=10.0, noise_stddev=1.0, alie_z=None, ipm_epsilon=5.0)
TRUTH = np.asarray([1.0, -2.0, 0.5], np.float32)


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_CLIENTS * PER_CLIENT, D)).astype(np.float32)
    y = (x @ TRUTH + 0.3).astype(np.float32)
    data = ClientData(
        {"x": jnp.asarray(x), "y": jnp.asarray(y)},
        jnp.arange(0, NUM_CLIENTS * PER_CLIENT, PER_CLIENT, dtype=jnp.int32),
        jnp.full((NUM_CLIENTS,), PER_CLIENT, jnp.int32),
    )
    return data, {"w": jnp.zeros(D), "b": jnp.float32(0.0)}


def train(aggregator, attack: str, rounds: int = 15) -> float:
    """Distance of the trained model to the truth after rounds of all 10 clients, 3 malicious."""
    table = np.zeros(NUM_CLIENTS, bool)
    table[[1, 4, 7]] = True
    if attack != "none":
        aggregator = with_attack(aggregator, table, attack, SETTINGS)
    pipeline = AggregationPipeline(identity(), aggregator)
    data, params = problem()
    state = init_round_state(ALGORITHM, params, NUM_CLIENTS, pipeline)
    fn = jax.jit(
        make_round_fn(
            ALGORITHM,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=NUM_CLIENTS,
            clients_per_chunk=5,
            pipeline=pipeline,
        )
    )
    cohort = jax.tree.map(jnp.asarray, make_cohort(np.arange(NUM_CLIENTS), NUM_CLIENTS))
    hparams = round_hparams(1.0, values=pipeline.hyperparams)
    for r in range(rounds):
        state, out = fn({}, state, data, cohort, jax.random.key(r), hparams)
    w = np.asarray(state.server.params["w"])
    return float(np.linalg.norm(w - TRUTH) + abs(float(state.server.params["b"]) - 0.3))


ROBUST = {
    "median": coordinate_median_aggregator(),
    "trimmed_mean": trimmed_mean_aggregator(0.4),
    "krum": krum_aggregator(3),
    "multi_krum": krum_aggregator(3, 5),
    "geometric_median": geometric_median_aggregator(20),
    "centered_clipping": centered_clipping_aggregator(0.5, 3),
    "norm_bounding": norm_bounding_aggregator(0.2),
}


def test_clean_training_converges_with_every_aggregator():
    assert train(weighted_mean(), "none") < 0.05
    for name, aggregator in ROBUST.items():
        assert train(aggregator, "none") < 0.3, name


@pytest.mark.parametrize("attack", ["sign_flip", "ipm"])
def test_an_attack_that_breaks_fedavg_does_not_break_robust_aggregators(attack):
    broken = train(weighted_mean(), attack)
    assert broken > 2.0  # FedAvg is led far away (or diverges)
    for name in ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median"):
        assert train(ROBUST[name], attack) < 0.3, (attack, name)


def test_malicious_clients_are_a_fixed_seeded_fraction():
    table = malicious_clients(1000, 0.1, seed=3)
    assert table.sum() == 100
    np.testing.assert_array_equal(table, malicious_clients(1000, 0.1, seed=3))
    assert not np.array_equal(table, malicious_clients(1000, 0.1, seed=4))
    assert malicious_clients(10, 0.0, seed=3).sum() == 0


def test_a_run_with_an_attack_reports_its_malicious_clients(make_config):
    config = make_config(
        byzantine={"fraction": 0.25, "attack": "sign_flip"},
        aggregation={"aggregator": "krum"},
        data={"num_clients": 16},
        run={"num_rounds": 2, "num_clients_per_round": 8},
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    table = malicious_clients(16, 0.25, config.run.seed)
    for r, record in enumerate(h for h in history if "train_loss" in h):
        ids = sim.sampler.sample(r)
        assert record["pipeline/byzantine/malicious"] == table[ids].sum()
        assert record["pipeline/krum/selected"] == 1


def test_a_backdoor_run_reports_its_success_rate_next_to_clean_accuracy(make_config):
    config = make_config(
        byzantine={"fraction": 0.25, "attack": "backdoor"},
        run={"num_rounds": 1},
        eval={"every": 1, "max_new_tokens": 8},
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    assert sim.data.stats["poisoned_examples"] > 0
    after = history[-1]
    assert 0.0 <= after["eval/backdoor_success"] <= 1.0
    assert "eval/exact_match/copy" in after
    # The poisoned clients are the run's malicious ones; uploads are not attacked on top.
    assert "pipeline/byzantine/malicious" not in after


def test_a_backdoor_target_longer_than_generation_is_refused(make_config):
    config = make_config(
        byzantine={"fraction": 0.25, "attack": "backdoor", "target": "A LONG TARGET"},
        eval={"max_new_tokens": 4},
    )
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        Simulation(config, verbose=False)
