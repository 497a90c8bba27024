"""The federated algorithms against results computed by hand in numpy.

Every algorithm runs on linear least squares (not a language model), plugged into the public
round API as an `Objective`, so that each local gradient is one line of numpy. Local batches
are drawn in stored order (``shuffle=False``), which makes every step's examples known; the
numpy references below re-derive the whole computation (local steps, weighting, aggregation,
server optimizer, SCAFFOLD controls) from the papers' formulas in float64, never from the
project's own loop. The round itself runs in float32 under `jax.jit`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.algorithms import make_fedavg, make_fedprox, make_scaffold
from fedjax_llm.config import ClientConfig, ServerConfig
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective
from fedjax_llm.optimizers import make_client_optimizer, make_server_optimizer
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import Cohort

SIZES = (2, 3, 5, 4)
"""Examples of each client: a population of M = 4 clients of different sizes."""
M = len(SIZES)
D = 3
"""Feature dimension; the params are ``{"w": [D], "b": []}``."""
STEPS, BATCH = 3, 2
SCHEDULE = LocalSchedule(
    local_steps=STEPS, batch_size=BATCH, max_client_examples=max(SIZES), shuffle=False
)
SERVER_CONFIG = ServerConfig(lr=1.0, momentum=0.9, b2=0.99, eps=1e-3)
"""The server optimizers' constants. Its ``lr`` (1.0) is never a round's server learning rate
below, so a round that ignored ``HyperParams.server_lr`` would not match the references."""

# Three rounds, three cohort slots each; cohorts differ so that clients sit out rounds.
COHORTS = ((0, 1, 2), (3, 1, 0), (2, 3, 1))
CLIENT_LRS = (0.1, 0.05, 0.08)
SERVER_LRS = (0.7, 0.4, 0.25)

# The reference is float64 and the round float32: 1e-5 relative is a few float32 ulps grown
# over 3 rounds of 3 local steps; atol covers entries that cancel to near zero.
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- the problem
def least_squares_loss(frozen, params, batch, key):
    """Weighted mean of ``0.5 * (x . w + b - y)^2``; padding examples have weight 0."""
    del frozen, key
    weight = batch["example_weight"]
    # An elementwise product, not a matmul: a GPU's default float32 matmul may use TF32.
    residual = jnp.sum(batch["x"] * params["w"], axis=-1) + params["b"] - batch["y"]
    loss_sum = jnp.sum(weight * 0.5 * residual**2)
    loss_weight = jnp.sum(weight)
    return loss_sum / jnp.maximum(loss_weight, 1.0), {LOSS_SUM: loss_sum, LOSS_WEIGHT: loss_weight}


OBJECTIVE = Objective(least_squares_loss, fields=("x", "y"))


def make_problem(seed: int = 0):
    """Client data (heterogeneous: each client its own true model) and initial params."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sum(SIZES), D)).astype(np.float32)
    truth = np.repeat(rng.normal(size=(M, D + 1)), SIZES, axis=0)
    y = (np.sum(x * truth[:, :D], axis=1) + truth[:, D]).astype(np.float32)
    y += 0.1 * rng.normal(size=y.shape).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]]).astype(np.int32)
    data = ClientData(
        examples={"x": jnp.asarray(x), "y": jnp.asarray(y)},
        client_start=jnp.asarray(starts),
        client_count=jnp.asarray(np.asarray(SIZES, np.int32)),
    )
    params = {
        "w": jnp.asarray(rng.normal(size=D).astype(np.float32)),
        "b": jnp.asarray(np.float32(0.3)),
    }
    return data, params


def flat(params) -> np.ndarray:
    """``{"w": [..., D], "b": [...]}`` -> ``[..., D + 1]`` float64 (the numpy theta)."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    return np.concatenate([w, b[..., None]], axis=-1)


def cohort(ids, participating=(1, 1, 1), delivered=None) -> Cohort:
    delivered = participating if delivered is None else delivered
    return Cohort(
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(participating, bool),
        jnp.asarray(delivered, bool),
    )


def client_sgd():
    # Plain SGD; its lr (99) is overwritten every round by HyperParams.client_lr.
    return make_client_optimizer(ClientConfig(optimizer="sgd", lr=99.0))


def run_rounds(algorithm, rounds, *, uniform_weighting=False, clients_per_chunk=None):
    """Runs ``rounds`` = [(Cohort, HyperParams)] under jit; returns the states after each."""
    data, params = make_problem()
    round_fn = jax.jit(
        make_round_fn(
            algorithm,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=M,
            clients_per_chunk=clients_per_chunk,
            uniform_weighting=uniform_weighting,
        )
    )
    state = init_round_state(algorithm, params, M)
    key = jax.random.key(0)
    states, outputs = [state], []
    for r, (round_cohort, hparams) in enumerate(rounds):
        state, output = round_fn(
            None, state, data, round_cohort, jax.random.fold_in(key, r), hparams
        )
        states.append(state)
        outputs.append(output)
    return states, outputs


# ------------------------------------------------------------------------ numpy references
@functools.cache
def np_data():
    """The problem in float64 (read-only, shared): features ``[x, 1]``, targets, theta0."""
    data, params = make_problem()
    x = np.asarray(data.examples["x"], np.float64)
    features = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # theta = [w, b]
    arrays = (features, np.asarray(data.examples["y"], np.float64), flat(params))
    for array in arrays:
        array.setflags(write=False)
    return arrays


def np_step_indices(client: int) -> np.ndarray:
    """``[STEPS, BATCH]`` example indices of client's local steps.

    With ``shuffle=False`` and no ``local_epochs``, position p of the round's K * B draws is
    the client's example ``p mod n_i`` (stored order, cycling), as `client_batch_indices`
    documents.
    """
    start = sum(SIZES[:client])
    return start + np.arange(STEPS * BATCH).reshape(STEPS, BATCH) % SIZES[client]


def np_local_sgd(theta, client, lr, mu=0.0, correction=0.0):
    """K local SGD steps on the client's batches from the global ``theta``.

    The gradient of the mean of ``0.5 * (a . theta - y)^2`` over a batch is ``A^T r / B``;
    FedProx adds ``mu * (theta_local - theta)`` (Li et al. 2020, the gradient of the
    proximal term), SCAFFOLD adds ``c - c_i`` (Karimireddy et al. 2020, eq. 3).
    """
    features, targets, _ = np_data()
    local = theta.copy()
    for idx in np_step_indices(client):
        a, y = features[idx], targets[idx]
        grad = a.T @ (a @ local - y) / BATCH + mu * (local - theta) + correction
        local = local - lr * grad
    return local


def np_weights(ids, uniform):
    weights = np.array([1.0 if uniform else SIZES[i] for i in ids])
    return weights / weights.sum()


class NpServerOptimizer:
    """The server optimizers on the pseudo-gradient ``g = -mean(delta)``, in numpy.

    Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2) write, with
    ``Delta = -g``: ``m = b1 m + (1 - b1) Delta``; ``v = b2 v + (1 - b2) Delta^2`` (FedAdam),
    ``v = v - (1 - b2) Delta^2 sign(v - Delta^2)`` (FedYogi), ``v = v + Delta^2`` (FedAdagrad);
    ``x = x + lr m / (sqrt(v) + tau)``. The library builds them from optax, whose documented
    updates differ in details: adam and yogi bias-correct both moments (``m / (1 - b1^t)``,
    ``v / (1 - b2^t)``), yogi starts both moments at 1e-6, and adagrad has no first moment and
    puts its eps inside the square root (``g / sqrt(sum g^2 + eps)``). The references follow
    optax's updates exactly, so these tests check our plumbing (sign of the pseudo-gradient,
    client weighting, the round's server lr, optimizer state carried across rounds), with
    ``tau = ServerConfig.eps``. FedAvgM is heavy-ball momentum as ``optax.sgd(lr, momentum)``:
    ``m = g + beta m``, ``x = x - lr m`` (Hsu et al. 2019).
    """

    def __init__(self, name: str, size: int):
        self.name, self.t = name, 0
        start = 1e-6 if name == "yogi" else 0.0
        self.m, self.v = np.full(size, start), np.full(size, start)

    def step(self, theta, mean_delta, lr):
        c = SERVER_CONFIG
        g = -mean_delta
        self.t += 1
        if self.name == "sgd":
            return theta - lr * g
        if self.name == "momentum":
            self.m = g + c.momentum * self.m
            return theta - lr * self.m
        if self.name == "adagrad":
            self.v = self.v + g**2
            return theta - lr * np.where(self.v > 0, g / np.sqrt(self.v + c.eps), 0.0)
        self.m = c.momentum * self.m + (1 - c.momentum) * g
        if self.name == "adam":
            self.v = c.b2 * self.v + (1 - c.b2) * g**2
        else:  # yogi
            self.v = self.v - (1 - c.b2) * np.sign(self.v - g**2) * g**2
        m_hat = self.m / (1 - c.momentum**self.t)
        v_hat = self.v / (1 - c.b2**self.t)
        return theta - lr * m_hat / (np.sqrt(v_hat) + c.eps)


def np_fedopt(server_name, rounds, uniform=False, prox_mus=None):
    """FedAvg/FedOpt (and FedProx) by hand: params after each round.

    ``rounds`` = [(delivered ids, client lr, server lr)].
    """
    *_, theta = np_data()
    server = NpServerOptimizer(server_name, theta.size)
    history = [theta]
    for r, (ids, client_lr, server_lr) in enumerate(rounds):
        mu = 0.0 if prox_mus is None else prox_mus[r]
        deltas = [np_local_sgd(theta, i, client_lr, mu=mu) - theta for i in ids]
        mean_delta = np_weights(ids, uniform) @ np.stack(deltas)
        theta = server.step(theta, mean_delta, server_lr)
        history.append(theta)
    return history


def np_scaffold(rounds, uniform):
    """SCAFFOLD by hand (Karimireddy et al. 2020, Algorithm 1, option II, global step lr).

    For each client i in S: ``y_i <- y_i - lr (g_i(y_i) + c - c_i)`` K times from x;
    ``c_i+ = c_i - c + (x - y_i) / (K lr)``. Then ``x <- x + server_lr * mean(y_i - x)`` and
    ``c <- c + (|S| / N) * mean(c_i+ - c_i)``, both means with the same weights (uniform is
    the paper). Returns (params, server control, client controls) after each round.
    """
    *_, theta = np_data()
    control, controls = np.zeros_like(theta), np.zeros((M, theta.size))
    history = []
    for ids, client_lr, server_lr in rounds:
        deltas, control_deltas = [], []
        for i in ids:
            local = np_local_sgd(theta, i, client_lr, correction=control - controls[i])
            new_control = controls[i] - control + (theta - local) / (STEPS * client_lr)
            deltas.append(local - theta)
            control_deltas.append(new_control - controls[i])
            controls[i] = new_control
        weights = np_weights(ids, uniform)
        theta = theta + server_lr * (weights @ np.stack(deltas))
        control = control + len(ids) / M * (weights @ np.stack(control_deltas))
        history.append((theta, control, controls.copy()))
    return history


def default_rounds(values=None):
    """The three rounds of `COHORTS` as round inputs and as the reference's input."""
    rounds = [
        (cohort(ids), round_hparams(lr, slr, values[r] if values else None))
        for r, (ids, lr, slr) in enumerate(zip(COHORTS, CLIENT_LRS, SERVER_LRS, strict=True))
    ]
    reference = list(zip(COHORTS, CLIENT_LRS, SERVER_LRS, strict=True))
    return rounds, reference


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("server_name", "uniform"),
    [(name, False) for name in ("sgd", "momentum", "adam", "yogi", "adagrad")]
    + [("sgd", True), ("adam", True)],
    ids=lambda v: {False: "by_examples", True: "uniform"}.get(v, v),
)
def test_fedopt_matches_hand_computation(server_name, uniform):
    """FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad over three rounds of changing cohorts
    and learning rates; clients weighted by example count (default) or uniformly."""
    algorithm = make_fedavg(client_sgd(), make_server_optimizer(SERVER_CONFIG, server_name))
    rounds, reference = default_rounds()
    states, outputs = run_rounds(algorithm, rounds, uniform_weighting=uniform)
    expected = np_fedopt(server_name, reference, uniform=uniform)
    for r in range(len(rounds) + 1):
        np.testing.assert_allclose(
            flat(states[r].server.params), expected[r], rtol=RTOL, atol=ATOL, err_msg=f"round {r}"
        )
    for output, ids in zip(outputs, COHORTS, strict=True):
        want = [1.0] * len(ids) if uniform else [SIZES[i] for i in ids]
        np.testing.assert_array_equal(np.asarray(output.weights), want)


def test_weighting_changes_the_result():
    """Sizes differ, so weighting by examples and uniformly must give different params (else
    the parametrized test above could not tell them apart)."""
    by_examples = np_fedopt("sgd", default_rounds()[1], uniform=False)[-1]
    uniform = np_fedopt("sgd", default_rounds()[1], uniform=True)[-1]
    assert np.max(np.abs(by_examples - uniform)) > 1e-2


@pytest.mark.parametrize("server_name", ["sgd", "adam"])
def test_fedprox_matches_proximal_gradient(server_name):
    """FedProx with mu > 0 (changing every round, read from ``hparams.values``) is SGD on
    ``F_i(w) + mu/2 ||w - w_global||^2``, by hand."""
    mus = (0.5, 2.0, 1.0)
    algorithm = make_fedprox(
        client_sgd(), make_server_optimizer(SERVER_CONFIG, server_name), mu=123.0
    )
    rounds, reference = default_rounds([{"prox_mu": mu} for mu in mus])
    states, _ = run_rounds(algorithm, rounds)
    expected = np_fedopt(server_name, reference, prox_mus=mus)
    plain = np_fedopt(server_name, reference)
    for r in range(1, len(rounds) + 1):
        np.testing.assert_allclose(
            flat(states[r].server.params), expected[r], rtol=RTOL, atol=ATOL, err_msg=f"round {r}"
        )
    # The proximal term matters here: FedAvg's result is far from FedProx's.
    assert np.max(np.abs(plain[-1] - expected[-1])) > 1e-2


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_paper", "by_examples"])
def test_scaffold_matches_hand_computation(uniform):
    """SCAFFOLD option II: params, the server control and every client's control after each
    of three rounds in which different clients sit out."""
    algorithm = make_scaffold(client_sgd(), make_server_optimizer(SERVER_CONFIG, "sgd"))
    rounds, reference = default_rounds()
    states, _ = run_rounds(algorithm, rounds, uniform_weighting=uniform)
    expected = np_scaffold(reference, uniform)
    for r, (theta, control, controls) in enumerate(expected, start=1):
        server = states[r].server
        np.testing.assert_allclose(flat(server.params), theta, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(flat(server.control), control, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            flat(states[r].clients.algorithm), controls, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("clients_per_chunk", [None, 1])
@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_masked_clients_contribute_nothing(name, clients_per_chunk):
    """A padding slot (participating 0, holding a real client's id) and a dropped client
    (participating 1, delivered 0) change neither the aggregate nor their stored state; the
    result is the hand computation over the delivered clients only."""
    server_opt = make_server_optimizer(SERVER_CONFIG, "sgd")
    if name == "fedavg":
        algorithm = make_fedavg(client_sgd(), server_opt)
    else:
        algorithm = make_scaffold(client_sgd(), server_opt)
    # Round 0: everyone but client 3 takes part, so clients 0, 1, 2 hold non-zero controls.
    # Round 1: slot 0 = client 2 delivers, slot 1 = client 1 drops out, slot 2 is padding
    # holding client 0's id.
    rounds = [
        (cohort((0, 1, 2)), round_hparams(0.1, 0.7)),
        (cohort((2, 1, 0), participating=(1, 1, 0), delivered=(1, 0, 0)), round_hparams(0.05, 0.4)),
    ]
    reference = [((0, 1, 2), 0.1, 0.7), ((2,), 0.05, 0.4)]
    states, outputs = run_rounds(algorithm, rounds, clients_per_chunk=clients_per_chunk)
    np.testing.assert_array_equal(np.asarray(outputs[1].weights), [SIZES[2], 0.0, 0.0])
    if name == "fedavg":
        expected = np_fedopt("sgd", reference)[-1]
        np.testing.assert_allclose(flat(states[2].server.params), expected, rtol=RTOL, atol=ATOL)
        return
    theta, control, controls = np_scaffold(reference, uniform=False)[-1]
    np.testing.assert_allclose(flat(states[2].server.params), theta, rtol=RTOL, atol=ATOL)
    # |S| = 1 delivered client: c moves by 1/4 of its control delta, not 2/4 or 3/4.
    np.testing.assert_allclose(flat(states[2].server.control), control, rtol=RTOL, atol=ATOL)
    stored = flat(states[2].clients.algorithm)
    np.testing.assert_allclose(stored, controls, rtol=RTOL, atol=ATOL)
    before = flat(states[1].clients.algorithm)
    assert np.all(np.abs(before[:3]) > 0)  # so "unchanged" below is not trivially zeros
    # The dropped client 1, the padded client 0 and the absent client 3: bit for bit.
    np.testing.assert_array_equal(stored[[0, 1, 3]], before[[0, 1, 3]])
    assert not np.array_equal(stored[2], before[2])


@pytest.mark.parametrize("name", ["fedadam", "fedprox", "scaffold"])
def test_changing_hyperparameters_does_not_retrace(name):
    """client_lr, server_lr and prox_mu change every round without a new trace of the round."""
    server_name = "adam" if name == "fedadam" else "sgd"
    server_opt = make_server_optimizer(SERVER_CONFIG, server_name)
    if name == "fedadam":
        algorithm = make_fedavg(client_sgd(), server_opt)
    elif name == "fedprox":
        algorithm = make_fedprox(client_sgd(), server_opt, mu=0.1)
    else:
        algorithm = make_scaffold(client_sgd(), server_opt)
    data, params = make_problem()
    round_fn = make_round_fn(
        algorithm, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=None
    )
    # The counter is keyed by the wrapped function's source, shared by the parametrizations.
    chex.clear_trace_counter()
    traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
    state = init_round_state(algorithm, params, M)
    values = [dict(algorithm.hyperparams, prox_mu=mu) for mu in (0.1, 0.7, 0.3)]
    values = values if name == "fedprox" else [dict(algorithm.hyperparams)] * 3
    finals = []
    for r, ids in enumerate(COHORTS):
        hparams = round_hparams(CLIENT_LRS[r], SERVER_LRS[r], values[r])
        state, _ = traced(None, state, data, cohort(ids), jax.random.key(r), hparams)
        finals.append(flat(state.server.params))
    assert np.all(np.isfinite(finals))
