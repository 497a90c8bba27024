"""DiLoCo: the Nesterov outer step worked by hand in numpy, the inner AdamW state a client
keeps across rounds, and a run from its config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm import Simulation, make_diloco
from fedjax_llm.algorithms import ClientOutput, HyperParams, RoundInfo
from fedjax_llm.config import ServerConfig
from fedjax_llm.optimizers import make_server_optimizer


def _adamw(lr=0.01):
    return optax.inject_hyperparams(optax.adamw)(learning_rate=lr)


def test_the_outer_step_is_nesterov_momentum_on_the_pseudo_gradient():
    lr, mu = 0.7, 0.9  # DiLoCo's outer learning rate and momentum
    outer = make_server_optimizer(ServerConfig(lr=lr, momentum=mu), "nesterov")
    algorithm = make_diloco(_adamw(), outer)
    p0 = np.asarray([1.0, -2.0, 0.5])
    deltas = [np.asarray([0.1, 0.2, -0.3]), np.asarray([-0.05, 0.4, 0.1])]
    state = algorithm.server_init(jnp.asarray(p0, jnp.float32))
    info = RoundInfo(jnp.asarray(4), 8, HyperParams(jnp.asarray(0.01), jnp.asarray(lr)))
    for delta in deltas:
        state = algorithm.server_update(state, ClientOutput(jnp.asarray(delta)), info, None)
    # By hand (PyTorch's SGD with nesterov=True, as DiLoCo runs it): g = -mean(delta),
    # v <- mu v + g, p <- p - lr (g + mu v).
    p, v = p0.copy(), np.zeros(3)
    for delta in deltas:
        g = -delta
        v = mu * v + g
        p = p - lr * (g + mu * v)
    np.testing.assert_allclose(algorithm.server_params(state), p, rtol=1e-6)


def test_a_client_keeps_its_inner_adamw_state_across_rounds():
    algorithm = make_diloco(_adamw(), optax.sgd(1.0), keep_inner_state=True)
    params = {"w": jnp.asarray([1.0, 2.0])}
    grads = {"w": jnp.asarray([0.5, -1.0])}
    loss_fn = lambda p, batch, key: (jnp.sum(grads["w"] * p["w"]), {})  # noqa: E731
    broadcast = algorithm.broadcast(algorithm.server_init(params))
    client_state = algorithm.client_state_init(params)
    hparams = HyperParams(jnp.asarray(0.05))
    for round_num in range(2):
        train = algorithm.client_init(broadcast, client_state, hparams)
        for _ in range(3):
            train, _ = algorithm.client_step(
                broadcast, client_state, train, {}, None, loss_fn, hparams
            )
        _, client_state = algorithm.client_final(broadcast, train, client_state, hparams)
        # AdamW's step count runs on across rounds (3, then 6), and its first moment is the
        # one 3 or 6 steps of the same gradient give.
        adam = client_state.inner_state[0]
        assert int(adam.count) == 3 * (round_num + 1)
        np.testing.assert_allclose(
            adam.mu["w"], (1 - 0.9 ** (3 * (round_num + 1))) * grads["w"], rtol=1e-5
        )
    # Without it (the default): a fresh optimizer every round, and no client state.
    fresh = make_diloco(_adamw(), optax.sgd(1.0))
    assert fresh.client_state_init(params) == ()


def test_diloco_runs_from_its_config_and_differs_from_a_fresh_inner_optimizer(make_config):
    def run(keep):
        config = make_config(
            algorithm={"type": "diloco", "keep_inner_state": keep},
            client={"optimizer": "adamw", "lr": 0.01, "local_steps": 3},
            server={"lr": 0.7, "momentum": 0.9},
            run={"num_rounds": 3, "num_clients_per_round": 8, "save_checkpoints": False},
        )
        sim = Simulation(config, verbose=False)
        history = [h for h in sim.run() if "train_loss" in h]
        return sim, [h["train_loss"] for h in history]

    kept, kept_losses = run(True)
    fresh, fresh_losses = run(False)
    assert all(np.isfinite(kept_losses)) and kept_losses[-1] < kept_losses[0]
    # Round 1 is the same (every inner state starts at zero); later rounds differ.
    np.testing.assert_allclose(kept_losses[0], fresh_losses[0], rtol=1e-6)
    assert kept_losses[2] != fresh_losses[2]
    # The outer optimizer of `diloco` is momentum (Nesterov's, see the numpy check above): the
    # server holds a non-zero momentum trace after the rounds.
    assert kept.config.server.optimizer is None
    traces = [
        s
        for s in jax.tree.leaves(
            kept.state.server.opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    ]
    assert len(traces) == 1
    assert max(float(jnp.abs(t).max()) for t in jax.tree.leaves(traces[0].trace)) > 0
