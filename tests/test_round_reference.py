"""The default pipeline reproduces the engine's outputs recorded before the pipeline existed.

``tests/data/round_reference.npz`` was written by ``tests/data/record_round_reference.py``
with the engine of commit 96b37a7 (weighted mean hard-wired into the round). Every comparison
here is exact (parameters, optimizer and client states, per-client losses and weights): the
refactor must not change a single bit of a default round.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_llm
from fedjax_llm.algorithms import make_fedavg, make_fedprox, make_scaffold
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import Cohort

REFERENCE = np.load(os.path.join(os.path.dirname(__file__), "data", "round_reference.npz"))


def sgd(lr=0.1):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


CASES = {
    "fedavg": (lambda: make_fedavg(sgd(), optax.sgd(1.0)), 2, None, 0.0),
    "fedavg_epochs": (lambda: make_fedavg(sgd(), optax.sgd(1.0)), 2, 1.0, 0.0),
    "fedadam": (lambda: make_fedavg(sgd(), optax.adam(0.01, eps=1e-3)), None, 1.0, 0.0),
    "fedprox": (lambda: make_fedprox(sgd(), optax.sgd(1.0), mu=0.5), 1, None, 0.5),
    "scaffold": (lambda: make_scaffold(sgd(), optax.sgd(1.0)), 2, 1.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_pipeline_round_is_bit_identical_to_recorded(name):
    make_alg, chunk, epochs, mu = CASES[name]
    alg = make_alg()
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
    )
    trainable = make_trainable(cfg, "lora", lora_rank=4, lora_targets=("q", "v", "down"))
    base = init_params(cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05, trainable.init(jax.random.key(1), base))
    sizes = REFERENCE["sizes"]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    data = ClientData(
        {
            "tokens": jnp.asarray(REFERENCE["tokens"]),
            "loss_mask": jnp.asarray(REFERENCE["loss_mask"]),
        },
        jnp.asarray(starts),
        jnp.asarray(sizes.astype(np.int32)),
    )
    schedule = LocalSchedule(3, 2, int(sizes.max()), local_epochs=epochs)
    state = init_round_state(alg, lora, 8)
    if name == "scaffold":
        store = jax.tree.map(
            lambda x: x + 0.01 * jnp.arange(8).reshape((-1,) + (1,) * (x.ndim - 1)),
            state.clients.algorithm,
        )
        state = state._replace(clients=state.clients._replace(algorithm=store))
    fn = jax.jit(
        make_round_fn(
            alg,
            next_token_loss(trainable.apply, 0),
            schedule,
            num_clients_total=8,
            clients_per_chunk=chunk,
        )
    )
    ids = jnp.asarray([5, 0, 3, 6], jnp.int32)
    values = {"prox_mu": mu} if name == "fedprox" else {}
    for r in range(2):
        cohort = Cohort(jnp.roll(ids, r), jnp.ones(4, bool), jnp.ones(4, bool))
        state, out = fn(
            trainable.frozen(base),
            state,
            data,
            cohort,
            jax.random.fold_in(jax.random.key(7), r),
            round_hparams(0.1, values=values),
        )
    for i, leaf in enumerate(jax.tree.leaves(state.server.params)):
        np.testing.assert_array_equal(np.asarray(leaf), REFERENCE[f"{name}/params/{i}"])
    if name == "scaffold":
        for i, leaf in enumerate(jax.tree.leaves(state.clients.algorithm)):
            np.testing.assert_array_equal(np.asarray(leaf), REFERENCE[f"{name}/store/{i}"])
    np.testing.assert_array_equal(np.asarray(out.client_loss), REFERENCE[f"{name}/client_loss"])
    # The reported mean loss sums the (bit-identical) per-client sums over clients; XLA picks
    # that 4-term reduction's order per fusion, so it may differ in the last bit (1 ulp).
    np.testing.assert_allclose(
        np.asarray(out.train_loss), REFERENCE[f"{name}/train_loss"], rtol=2e-7, atol=0
    )
    np.testing.assert_array_equal(np.asarray(out.weights), REFERENCE[f"{name}/weights"])


SIMULATIONS = {
    "sim_fedavg": {},
    "sim_scaffold_lora": {
        "algorithm": {"type": "scaffold"},
        "trainable": {"mode": "lora"},
        "client": {"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 4},
    },
}


@pytest.mark.parametrize("name", sorted(SIMULATIONS))
def test_default_simulation_is_bit_identical_to_recorded(name, make_config):
    sim = fedjax_llm.Simulation(make_config(**SIMULATIONS[name]), verbose=False)
    history = sim.run()
    for i, leaf in enumerate(jax.tree.leaves(sim.params)):
        np.testing.assert_array_equal(np.asarray(leaf), REFERENCE[f"{name}/params/{i}"])
    eval_loss = [h["eval/loss"] for h in history if "eval/loss" in h]
    np.testing.assert_array_equal(eval_loss, REFERENCE[f"{name}/eval_loss"])
    train_loss = [h["train_loss"] for h in history if "train_loss" in h]
    # As above: the mean over clients of bit-identical per-client sums, to 1 ulp.
    np.testing.assert_allclose(train_loss, REFERENCE[f"{name}/train_loss"], rtol=2e-7, atol=0)
