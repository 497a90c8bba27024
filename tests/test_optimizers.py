"""Tests of fedjax_llm/optimizers.py: learning-rate schedules over rounds, the server optimizer
with a per-round learning rate and the client optimizer's gradient clipping."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms.base import set_learning_rate
from fedjax_llm.config import ClientConfig, ConfigError, ServerConfig
from fedjax_llm.optimizers import (
    client_learning_rate,
    make_client_optimizer,
    make_server_optimizer,
    scheduled_value,
    server_learning_rate,
)

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


def expected_schedule(schedule: str, peak: float, r: int, n: int, warmup: int) -> float:
    """The schedules written out from their definitions."""
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * (1 + math.cos(math.pi * r / n)) / 2
    if schedule == "linear":
        return peak * (n - r) / n
    assert schedule == "warmup_cosine"
    if r < warmup:
        return peak * (r + 1) / warmup
    return peak * (1 + math.cos(math.pi * (r - warmup) / (n - warmup))) / 2


@pytest.mark.parametrize(
    "schedule, round_num, expected",
    [
        ("constant", 0, 0.4),
        ("constant", 9, 0.4),
        ("cosine", 0, 0.4),
        ("cosine", 5, 0.2),  # half way: cos(pi/2) = 0
        ("cosine", 10, 0.0),
        ("linear", 0, 0.4),
        ("linear", 5, 0.2),
        ("linear", 8, 0.4 * 0.2),
        ("warmup_cosine", 0, 0.1),  # warmup 4: (r + 1) / 4 of the peak
        ("warmup_cosine", 1, 0.2),
        ("warmup_cosine", 3, 0.4),
        ("warmup_cosine", 4, 0.4),  # cosine starts at the peak after warmup
        ("warmup_cosine", 7, 0.2),  # (7 - 4) / (10 - 4) = half way
        ("warmup_cosine", 10, 0.0),
    ],
)
def test_scheduled_value_closed_forms(schedule, round_num, expected):
    value = scheduled_value(schedule, 0.4, round_num, 10, 4, "x.schedule")
    assert isinstance(value, float)
    assert value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "warmup_cosine"])
def test_client_and_server_learning_rates_follow_their_sections(schedule):
    client = ClientConfig(lr=0.3, schedule=schedule, warmup_steps=3)
    server = ServerConfig(lr=2.0, schedule=schedule, warmup_rounds=5)
    n = 12
    for r in range(n):
        assert client_learning_rate(client, r, n) == pytest.approx(
            expected_schedule(schedule, 0.3, r, n, 3), abs=1e-12
        )
        assert server_learning_rate(server, r, n) == pytest.approx(
            expected_schedule(schedule, 2.0, r, n, 5), abs=1e-12
        )
    values = [server_learning_rate(server, r, n) for r in range(n)]
    assert max(values) == pytest.approx(2.0)
    if schedule != "constant":
        # Never increasing after warmup.
        start = 5 if schedule == "warmup_cosine" else 0
        assert all(a >= b for a, b in zip(values[start:], values[start + 1 :], strict=False))


def test_an_unknown_schedule_raises_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"server\.schedule='step'.*warmup_cosine"):
        server_learning_rate(ServerConfig(schedule="step"), 0, 10)
    with pytest.raises(ConfigError, match=r"client\.schedule='step'"):
        client_learning_rate(ClientConfig(schedule="step"), 0, 10)


def test_an_unknown_server_optimizer_raises_a_config_error():
    with pytest.raises(ConfigError, match=r"server\.optimizer='lamb'.*adagrad"):
        make_server_optimizer(ServerConfig(), "lamb")


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_update_scales_with_the_learning_rate_set_per_round(name):
    """Every server optimizer is linear in its learning rate for a given state, so setting the
    round's rate into the injected hyperparameters scales the update by exactly that factor."""
    optimizer = make_server_optimizer(ServerConfig(lr=1.0), name)
    params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.25)}
    grad = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(-0.4)}
    state = optimizer.init(params)
    assert "learning_rate" in state.hyperparams

    @jax.jit
    def update(state, learning_rate):
        state = set_learning_rate(state, learning_rate)
        return optimizer.update(grad, state, params)

    base, _ = update(state, 1.0)
    for lr in (0.5, 0.03):
        updates, new_state = update(state, lr)
        np.testing.assert_allclose(new_state.hyperparams["learning_rate"], lr, rtol=1e-7)
        chex.assert_trees_all_close(updates, jax.tree.map(lambda u, lr=lr: lr * u, base), rtol=1e-6)
    if name == "sgd":
        chex.assert_trees_all_close(base, jax.tree.map(jnp.negative, grad))


def test_set_learning_rate_none_leaves_the_configured_rate():
    optimizer = make_server_optimizer(ServerConfig(lr=0.7), "sgd")
    state = optimizer.init({"w": jnp.zeros(2)})
    assert set_learning_rate(state, None) is state
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.7, rtol=1e-7)


def test_client_optimizer_clips_each_gradient_by_global_norm():
    config = ClientConfig(optimizer="sgd", lr=0.5, grad_clip_norm=1.0)
    optimizer = make_client_optimizer(config)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    big = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}  # global norm 5
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array(0.4)}  # global norm 0.5
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)

    updates, _ = update(big, state, params)
    chex.assert_trees_all_close(updates, {"a": jnp.array([-0.3, 0.0]), "b": jnp.array(-0.4)})
    updates, _ = update(small, state, params)
    chex.assert_trees_all_close(updates, {"a": jnp.array([-0.15, 0.0]), "b": jnp.array(-0.2)})

    unclipped = make_client_optimizer(ClientConfig(optimizer="sgd", lr=0.5))
    updates, _ = jax.jit(unclipped.update)(big, unclipped.init(params), params)
    chex.assert_trees_all_close(updates, {"a": jnp.array([-1.5, 0.0]), "b": jnp.array(-2.0)})


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw"])
def test_client_optimizer_learning_rate_is_injectable(name):
    optimizer = make_client_optimizer(ClientConfig(optimizer=name, lr=0.1, grad_clip_norm=10.0))
    params = {"w": jnp.array([1.0, -2.0])}
    grad = {"w": jnp.array([0.5, 0.25])}
    state = optimizer.init(params)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1, rtol=1e-7)

    @jax.jit
    def step(learning_rate):
        return optimizer.update(grad, set_learning_rate(state, learning_rate), params)[0]

    chex.assert_trees_all_close(step(0.2), jax.tree.map(lambda u: 2.0 * u, step(0.1)), rtol=1e-6)


def test_client_optimizer_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"client\.optimizer='lion'"):
        make_client_optimizer(ClientConfig(optimizer="lion"))
    with pytest.raises(ConfigError, match=r"client\.grad_clip_norm=0"):
        make_client_optimizer(ClientConfig(grad_clip_norm=0.0))


def test_client_momentum_matches_optax_heavy_ball():
    optimizer = make_client_optimizer(ClientConfig(optimizer="momentum", lr=0.1, momentum=0.8))
    reference = optax.sgd(0.1, momentum=0.8)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [{"w": jnp.array([0.5, 0.25])}, {"w": jnp.array([-0.1, 0.3])}]
    state, ref_state = optimizer.init(params), reference.init(params)
    for g in grads:
        updates, state = optimizer.update(g, state, params)
        ref_updates, ref_state = reference.update(g, ref_state, params)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)
