"""Default rounds reproduce recorded outputs bit for bit.

``tests/data/round_reference.npz`` holds the outputs of `compute_case` and `compute_simulation`
as recorded by ``python tests/data/record_round_reference.py``. Every comparison here is exact
(parameters, optimizer and client states, per-client losses and weights): a change to the
engine (a refactor, chunk-wise state write-back) must not change a single bit of a default
round. The fixture was first recorded with the engine of commit 96b37a7 (weighted mean
hard-wired into the round) and re-recorded once when batch drawing changed from a top-k shuffle
to a swap-or-not permutation (a deliberate change of which examples each step sees), and
once when the output projection was fused with the cross entropy (changes of 1 ulp after SGD
rounds, up to 1e-3 relative after three AdamW rounds, which amplify them) and
the tests began compiling with XLA's fast-compile settings (tests/conftest.py), and once when
attention's products moved to a head-major layout (again ulps after SGD rounds, up to 1.7e-3
relative after the AdamW rounds), and once when attention divided by the softmax's row sums
after the product with the values (up to 1.1e-6 relative after SGD rounds; after the AdamW
simulation a median of 3e-6 and at most 6e-3 relative to the largest parameter, on a few
elements whose tiny gradients Adam normalizes; its losses unchanged to 1.4e-6).
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


def compute_case(name: str) -> dict:
    """Two rounds of `CASES[name]` on the recorded data; returns the arrays the fixture holds."""
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
    arrays = {
        f"{name}/params/{i}": np.asarray(leaf)
        for i, leaf in enumerate(jax.tree.leaves(state.server.params))
    }
    if name == "scaffold":
        for i, leaf in enumerate(jax.tree.leaves(state.clients.algorithm)):
            arrays[f"{name}/store/{i}"] = np.asarray(leaf)
    arrays[f"{name}/client_loss"] = np.asarray(out.client_loss)
    arrays[f"{name}/train_loss"] = np.asarray(out.train_loss)
    arrays[f"{name}/weights"] = np.asarray(out.weights)
    return arrays


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_pipeline_round_is_bit_identical_to_recorded(name):
    got = compute_case(name)
    for key, value in got.items():
        if key.endswith("train_loss"):
            # The reported mean loss sums the (bit-identical) per-client sums over clients;
            # XLA picks that 4-term reduction's order per fusion, so it may differ in the last
            # bit (1 ulp).
            np.testing.assert_allclose(value, REFERENCE[key], rtol=2e-7, atol=0)
        else:
            np.testing.assert_array_equal(value, REFERENCE[key], err_msg=key)


SIMULATIONS = {
    "sim_fedavg": {},
    "sim_scaffold_lora": {
        "algorithm": {"type": "scaffold"},
        "trainable": {"mode": "lora"},
        "client": {"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 4},
    },
}


def compute_simulation(name: str, config) -> dict:
    """A whole default simulation of `SIMULATIONS[name]`; returns the fixture's arrays."""
    sim = fedjax_llm.Simulation(config, verbose=False)
    history = sim.run()
    arrays = {
        f"{name}/params/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(sim.params))
    }
    arrays[f"{name}/eval_loss"] = np.asarray([h["eval/loss"] for h in history if "eval/loss" in h])
    arrays[f"{name}/train_loss"] = np.asarray(
        [h["train_loss"] for h in history if "train_loss" in h]
    )
    return arrays


@pytest.mark.parametrize("name", sorted(SIMULATIONS))
def test_default_simulation_is_bit_identical_to_recorded(name, make_config):
    got = compute_simulation(name, make_config(**SIMULATIONS[name]))
    for key, value in got.items():
        if key.endswith("train_loss"):
            # As above: the mean over clients of bit-identical per-client sums, to 1 ulp.
            np.testing.assert_allclose(value, REFERENCE[key], rtol=2e-7, atol=0)
        else:
            np.testing.assert_array_equal(value, REFERENCE[key], err_msg=key)
