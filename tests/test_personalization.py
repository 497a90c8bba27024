"""Personalization: FedSA-LoRA, FedPer and Ditto against hand computations, their configs, the
personalized evaluation and resuming personal states.

The algorithm tests run the public round (`make_round_fn`, under `jax.jit`) on a LoRA-shaped
linear model, ``pred(x) = sum_l (x @ a[l]) @ b[l]`` with ``{"q": {"a": [L, D, R], "b": [L, R]}}``
and the squared loss, so every local gradient is a line of numpy. Batches are drawn in stored
order (``shuffle=False``), which makes every step's examples known.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import ConfigError, Simulation
from fedjax_llm.algorithms import (
    build_algorithm,
    make_ditto,
    make_fedavg,
    make_fedper,
    make_fedsa_lora,
    make_partially_personal,
)
from fedjax_llm.algorithms.personalized import PersonalClientState, fedper_personal, leaf_paths
from fedjax_llm.config import ClientConfig, ServerConfig, load_config
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective
from fedjax_llm.optimizers import make_client_optimizer, make_server_optimizer
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
    upload_shape,
)
from fedjax_llm.sampling import Cohort

SIZES = (2, 3, 5, 4)
M, L, D, R = len(SIZES), 2, 3, 2
STEPS, BATCH = 3, 2
SCHEDULE = LocalSchedule(
    local_steps=STEPS, batch_size=BATCH, max_client_examples=max(SIZES), shuffle=False
)
RTOL, ATOL = 1e-5, 1e-6
ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def lora_loss(frozen, params, batch, key):
    """Weighted mean of ``0.5 * (sum_l x a_l b_l - y)^2``."""
    del frozen, key
    a, b = params["q"]["a"], params["q"]["b"]
    # Elementwise products and sums, no matmul (a GPU's float32 matmul may use TF32).
    hidden = jnp.sum(batch["x"][:, None, :, None] * a[None], axis=2)  # [B, L, R]
    pred = jnp.sum(hidden * b[None], axis=(1, 2))
    weight = batch["example_weight"]
    loss_sum = jnp.sum(weight * 0.5 * (pred - batch["y"]) ** 2)
    loss_weight = jnp.sum(weight)
    return loss_sum / jnp.maximum(loss_weight, 1.0), {LOSS_SUM: loss_sum, LOSS_WEIGHT: loss_weight}


OBJECTIVE = Objective(lora_loss, fields=("x", "y"))


def make_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(SIZES), D)).astype(np.float32)
    # Each client its own target function (strongly non-IID).
    y = np.concatenate(
        [x[sum(SIZES[:i]) : sum(SIZES[: i + 1])] @ rng.normal(size=D) for i in range(M)]
    ).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]]).astype(np.int32)
    data = ClientData(
        examples={"x": jnp.asarray(x), "y": jnp.asarray(y)},
        client_start=jnp.asarray(starts),
        client_count=jnp.asarray(np.asarray(SIZES, np.int32)),
    )
    params = {
        "q": {
            "a": jnp.asarray(rng.normal(size=(L, D, R)).astype(np.float32) * 0.5),
            "b": jnp.asarray(rng.normal(size=(L, R)).astype(np.float32) * 0.5),
        }
    }
    return data, params


def sgd():
    return make_client_optimizer(ClientConfig(optimizer="sgd", lr=99.0))  # lr set per round


def server_sgd():
    return make_server_optimizer(ServerConfig(lr=1.0), "sgd")


def cohort(ids) -> Cohort:
    ones = jnp.ones(len(ids), bool)
    return Cohort(jnp.asarray(ids, jnp.int32), ones, ones)


def run_rounds(algorithm, rounds, state=None, schedule=SCHEDULE):
    """Runs ``rounds`` = [(client ids, client lr, values)] under jit; returns every state."""
    data, params = make_problem()
    round_fn = jax.jit(
        make_round_fn(algorithm, OBJECTIVE, schedule, num_clients_total=M, clients_per_chunk=None)
    )
    state = init_round_state(algorithm, params, M) if state is None else state
    states = [state]
    for r, (ids, lr, values) in enumerate(rounds):
        hparams = round_hparams(lr, 1.0, {**algorithm.hyperparams, **(values or {})})
        state, _ = round_fn(None, state, data, cohort(ids), jax.random.key(r), hparams)
        states.append(state)
    return states


# ------------------------------------------------------------------------ numpy reference
def np_grads(a, b, client, step, schedule=SCHEDULE):
    """The gradient of client's batch at ``step`` (stored order, cycling over its examples)."""
    data, _ = make_problem()
    start, n = sum(SIZES[:client]), SIZES[client]
    idx = start + (step * schedule.batch_size + np.arange(schedule.batch_size)) % n
    x = np.asarray(data.examples["x"], np.float64)[idx]
    y = np.asarray(data.examples["y"], np.float64)[idx]
    hidden = np.einsum("bd,ldr->blr", x, a)
    err = np.einsum("blr,lr->b", hidden, b) - y
    grad_a = np.einsum("b,bd,lr->ldr", err, x, b) / len(idx)
    grad_b = np.einsum("b,blr->lr", err, hidden) / len(idx)
    return grad_a, grad_b


def np_local_sgd(a, b, client, lr):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    for step in range(STEPS):
        grad_a, grad_b = np_grads(a, b, client, step)
        a, b = a - lr * grad_a, b - lr * grad_b
    return a, b


def np_weighted_mean(ids, values):
    weights = np.asarray([SIZES[i] for i in ids], np.float64)
    return np.tensordot(weights / weights.sum(), np.stack(values), axes=1)


def as_np(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_lora_averages_a_and_keeps_each_clients_b():
    algorithm = make_fedsa_lora(sgd(), server_sgd())
    _, params = make_problem()
    a0, b0 = as_np(params["q"]["a"]), as_np(params["q"]["b"])
    rounds = [((0, 1, 2), 0.1, None), ((3, 1, 0), 0.05, None)]
    states = run_rounds(algorithm, rounds)

    # Round 1: every client starts from (a0, b0).
    trained = {i: np_local_sgd(a0, b0, i, 0.1) for i in (0, 1, 2)}
    a1 = a0 + np_weighted_mean((0, 1, 2), [trained[i][0] - a0 for i in (0, 1, 2)])
    server = states[1].server.params["q"]
    np.testing.assert_array_equal(server["b"], params["q"]["b"])  # the global B never moves
    np.testing.assert_allclose(server["a"], a1, rtol=RTOL, atol=ATOL)  # FedAvg of A
    store = states[1].clients.algorithm
    assert isinstance(store, PersonalClientState) and len(store.personal) == 1  # only b
    for i in (0, 1, 2):
        np.testing.assert_allclose(store.personal[0][i], trained[i][1], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(store.personal[0][3], params["q"]["b"])  # never sampled

    # Round 2: each client starts from the global A and its own B.
    own_b = {0: trained[0][1], 1: trained[1][1], 3: b0}
    trained2 = {i: np_local_sgd(a1, own_b[i], i, 0.05) for i in (3, 1, 0)}
    a2 = a1 + np_weighted_mean((3, 1, 0), [trained2[i][0] - a1 for i in (3, 1, 0)])
    np.testing.assert_allclose(states[2].server.params["q"]["a"], a2, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(states[2].server.params["q"]["b"], params["q"]["b"])
    store = states[2].clients.algorithm.personal[0]
    for i in (3, 1, 0):
        np.testing.assert_allclose(store[i], trained2[i][1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(store[2], trained[2][1], rtol=RTOL, atol=ATOL)  # sat out


def test_the_personal_part_is_not_uploaded():
    _, params = make_problem()
    for algorithm, sent in [
        (make_fedsa_lora(sgd(), server_sgd()), [(L, D, R)]),  # a only
        (make_fedper(sgd(), server_sgd(), "lora", 1), [(L - 1, D, R), (L - 1, R)]),  # layer 0
    ]:
        state = init_round_state(algorithm, params, M)
        one = jax.tree.map(lambda s: s[0], state.clients.algorithm)
        like = upload_shape(algorithm, None, state.server, one, round_hparams(0.1))
        assert [x.shape for x in jax.tree.leaves(like.delta)] == sent


# -------------------------------------------------------------------------------- FedPer
def test_fedper_keeps_the_last_layer_per_client_and_averages_the_rest():
    algorithm = make_fedper(sgd(), server_sgd(), "lora", personal_layers=1)
    _, params = make_problem()
    a0, b0 = as_np(params["q"]["a"]), as_np(params["q"]["b"])
    ids = (0, 2, 3)
    states = run_rounds(algorithm, [(ids, 0.1, None)])
    trained = {i: np_local_sgd(a0, b0, i, 0.1) for i in ids}
    server = states[1].server.params["q"]
    # The personal slices (layer 1) are unchanged on the server, bit for bit ...
    np.testing.assert_array_equal(server["a"][1], params["q"]["a"][1])
    np.testing.assert_array_equal(server["b"][1], params["q"]["b"][1])
    # ... and the shared layer 0 is FedAvg's.
    for leaf, k in (("a", 0), ("b", 1)):
        want = as_np(params["q"][leaf][0]) + np_weighted_mean(
            ids, [trained[i][k][0] - as_np(params["q"][leaf][0]) for i in ids]
        )
        np.testing.assert_allclose(server[leaf][0], want, rtol=RTOL, atol=ATOL)
    personal_a, personal_b = states[1].clients.algorithm.personal
    assert personal_a.shape == (M, 1, D, R) and personal_b.shape == (M, 1, R)
    for i in ids:
        np.testing.assert_allclose(personal_a[i, 0], trained[i][0][1], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(personal_b[i, 0], trained[i][1][1], rtol=RTOL, atol=ATOL)
    # A client's personal params: the global layer 0 and its own layer 1.
    one = jax.tree.map(lambda s: s[2], states[1].clients.algorithm)
    own = algorithm.personal_params(states[1].server.params, one)
    np.testing.assert_array_equal(own["q"]["a"][0], server["a"][0])
    np.testing.assert_array_equal(own["q"]["a"][1], personal_a[2, 0])


def test_selections_that_name_no_parameter_are_config_errors():
    _, params = make_problem()
    assert leaf_paths(params) == ["q/a", "q/b"]
    fedavg = make_fedavg(sgd(), server_sgd())
    with pytest.raises(ConfigError, match=r"\['lm_head'\] names no parameter.*'q/a', 'q/b'"):
        init_round_state(make_partially_personal(fedavg, ["lm_head"]), params, M)
    with pytest.raises(ConfigError, match=r"personal_layers=3 must be from 1 to the model's 2"):
        init_round_state(make_fedper(sgd(), server_sgd(), "lora", 3), params, M)
    with pytest.raises(ConfigError, match=r"\['lm_head'\] names no parameter"):
        init_round_state(make_fedper(sgd(), server_sgd(), "lora", 1, ["lm_head"]), params, M)
    with pytest.raises(ConfigError, match="soft_prompt has no per-layer"):
        fedper_personal("soft_prompt", 1)
    # A pattern selects what lies under it; a selection may mix patterns and functions.
    algorithm = make_partially_personal(fedavg, ["q/b", lambda path, leaf: False])
    state = init_round_state(algorithm, params, M)
    assert [x.shape for x in state.clients.algorithm.personal] == [(M, L, R)]
    # A mask keeping the first layer personal: the personal slices go back in their place.
    algorithm = make_partially_personal(fedavg, lambda path, leaf: np.arange(L) == 0)
    state = init_round_state(algorithm, params, M)
    one = jax.tree.map(lambda s: s[0] + 1.0, state.clients.algorithm)
    own = jax.jit(algorithm.personal_params)(params, one)
    for leaf in ("a", "b"):
        np.testing.assert_array_equal(own["q"][leaf][0], params["q"][leaf][0] + 1.0)
        np.testing.assert_array_equal(own["q"][leaf][1], params["q"][leaf][1])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--algorithm.type", "fedsa_lora"], "fedsa_lora .*needs trainable.mode=lora"),
        (
            ["--algorithm.type", "fedper", "--algorithm.personal_layers", "3"],
            r"algorithm\.personal_layers=3 must be from 1 to model\.num_layers=2",
        ),
        (
            ["--algorithm.type", "fedper", "--algorithm.personal_layers", "0"],
            r"algorithm\.personal_layers=0 must be",
        ),
        (
            ["--algorithm.type", "fedper", "--trainable.mode", "soft_prompt"],
            "soft_prompt has no per-layer",
        ),
        (["--algorithm.type", "ditto", "--algorithm.lam", "-1"], r"algorithm\.lam=-1"),
        (
            ["--algorithm.type", "fedsa_lora", "--trainable.mode", "lora"]
            + ["--privacy.level", "client", "--privacy.noise_multiplier", "1"]
            + ["--sampling.kind", "poisson", "--privacy.audit_canaries", "8"],
            "audit_canaries needs the whole model uploaded",
        ),
    ],
)
def test_bad_personalization_configs_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_personalization_configs_build():
    for overrides in (
        ["--algorithm.type", "fedsa_lora", "--trainable.mode", "lora"],
        ["--algorithm.type", "fedper", "--algorithm.personal_modules", "[lm_head]"],
        ["--algorithm.type", "ditto", "--algorithm.lam", "0.5", "--algorithm.proximal", "true"],
    ):
        algorithm = build_algorithm(load_config(None, overrides))
        assert algorithm.personal_params is not None
    config = load_config(os.path.join(ROOT, "configs", "personalization_fedsa_lora.yaml"))
    assert config.algorithm.name == "fedsa_lora" and config.data.partitioner == "pathological"


# --------------------------------------------------------------------------------- Ditto
@pytest.mark.parametrize("proximal", [False, True])
def test_ditto_one_step_matches_hand_computation(proximal):
    """One client, one local step: the global copy takes FedAvg's step, the personal model
    ``v <- v - lr (grad(v) + lam (v - w))`` (or its proximal form)."""
    lam, lr = 0.7, 0.1
    algorithm = make_ditto(sgd(), server_sgd(), lam, proximal=proximal)
    _, params = make_problem()
    state = init_round_state(algorithm, params, M)
    # Client 1's personal model differs from the global one (as after earlier rounds).
    v0 = jax.tree.map(lambda p: p + 0.3, params)
    store = jax.tree.map(lambda s, v: s.at[1].set(v), state.clients.algorithm, v0)
    state = state._replace(clients=state.clients._replace(algorithm=store))
    one_step = SCHEDULE._replace(local_steps=1)
    states = run_rounds(algorithm, [((1,), lr, None)], state=state, schedule=one_step)

    w, v = (as_np(params["q"][k]) for k in "ab"), (as_np(v0["q"][k]) for k in "ab")
    (wa, wb), (va, vb) = w, v
    ga, gb = np_grads(wa, wb, 1, 0, one_step)
    ha, hb = np_grads(va, vb, 1, 0, one_step)
    if proximal:
        c = lr * lam
        va_new = (va - lr * ha + c * wa) / (1 + c)
        vb_new = (vb - lr * hb + c * wb) / (1 + c)
    else:
        va_new = va - lr * (ha + lam * (va - wa))
        vb_new = vb - lr * (hb + lam * (vb - wb))
    server = states[1].server.params["q"]
    np.testing.assert_allclose(server["a"], wa - lr * ga, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(server["b"], wb - lr * gb, rtol=RTOL, atol=ATOL)
    stored = states[1].clients.algorithm["q"]
    np.testing.assert_allclose(stored["a"][1], va_new, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stored["b"][1], vb_new, rtol=RTOL, atol=ATOL)
    for i in (0, 2, 3):  # not sampled: still the global init
        chex.assert_trees_all_equal(jax.tree.map(lambda s, i=i: s[i], stored), params["q"])


def test_ditto_uploads_fedavgs_delta_and_a_huge_lambda_keeps_v_at_the_global_model():
    rounds = [((0, 1, 2), 0.1, None), ((3, 1, 0), 0.05, None)]
    ditto = make_ditto(sgd(), server_sgd(), 1e9, proximal=True)
    states = run_rounds(ditto, rounds)
    fedavg_states = run_rounds(make_fedavg(sgd(), server_sgd()), rounds)
    for ours, theirs in zip(states, fedavg_states, strict=True):
        chex.assert_trees_all_close(ours.server.params, theirs.server.params, rtol=RTOL)
    # Each client's personal model is the global model it was last broadcast.
    store = states[2].clients.algorithm
    for client, last_round in ((0, 1), (1, 1), (2, 0), (3, 1)):
        chex.assert_trees_all_close(
            jax.tree.map(lambda s, c=client: s[c], store),
            states[last_round].server.params,
            rtol=RTOL,
            atol=ATOL,
        )


def test_ditto_lambda_changes_without_retracing():
    algorithm = make_ditto(sgd(), server_sgd(), 0.1)
    data, params = make_problem()
    round_fn = make_round_fn(
        algorithm, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=None
    )
    chex.clear_trace_counter()
    traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
    state = init_round_state(algorithm, params, M)
    for r, lam in enumerate((0.1, 1.0, 0.0)):
        hparams = round_hparams(0.1, 1.0, {"ditto_lambda": lam})
        state, _ = traced(None, state, data, cohort((0, 1, 2)), jax.random.key(r), hparams)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


# ---------------------------------------------------------------- end to end and resume
def test_personalized_evaluation_and_resume(make_config):
    """FedSA-LoRA on a pathological split (one task family per client): every client's own B
    beats the global model (the base: the global B stays zero) on its own held-out data;
    clients never sampled are evaluated too, with the global model; resuming restores every
    client's B."""
    sections = {
        "algorithm": {"type": "fedsa_lora"},
        "trainable": {"mode": "lora", "lora_rank": 4},
        "data": {"partitioner": "pathological", "classes_per_client": 1},
        "client": {"lr": 0.02},
        "eval": {"max_new_tokens": 0},
    }
    first = make_config(run={"num_rounds": 3}, **sections)
    sim = Simulation(first, verbose=False)
    after = sim.run()[-1]
    assert after["client/personal/loss_mean"] < after["client/loss_mean"]
    assert after["client/personal/loss_worst10"] <= after["client/loss_worst10"]
    b = np.abs(np.asarray(sim.client_store.algorithm.personal[0]))
    b = b.reshape(len(b), -1)
    trained = b.max(axis=1) > 0
    assert 0 < trained.sum() < len(trained)  # some clients sampled, some not
    for row, was_trained in zip(sim.client_results, trained, strict=True):
        if was_trained:
            assert row["personal_loss"] < row["loss"]
        else:  # never sampled: zero B, the global model exactly
            assert row["personal_loss"] == pytest.approx(row["loss"], rel=1e-6)

    resumed_config = make_config(
        run={"num_rounds": 4, "resume": True, "output_dir": first.run.output_dir}, **sections
    )
    resumed = Simulation(resumed_config, verbose=False)
    record = resumed.run()[-1]
    assert record["round"] == 4 and "client/personal/loss_mean" in record
    c = resumed.cohort(3)
    sampled = np.asarray(c.client_ids)[np.asarray(c.participating)]
    before = np.asarray(sim.client_store.algorithm.personal[0])
    now = np.asarray(resumed.client_store.algorithm.personal[0])
    for client in range(len(before)):
        if client in sampled:
            assert not np.array_equal(now[client], before[client])
        else:
            np.testing.assert_array_equal(now[client], before[client])


# ------------------------------------------------- a personal soft prompt on a shared LoRA
def test_personal_soft_prompt_on_a_shared_lora(make_config):
    """``personal_prompt``: the LoRA factors are averaged, each client's soft prompt stays in
    its state (the server's copy never moves, nothing of it is uploaded), and the personalized
    evaluation runs each client with its own prompt."""
    config = make_config(
        algorithm={"type": "personal_prompt"},
        trainable={"mode": "lora", "lora_rank": 4, "lora_soft_prompt": 3},
        data={"partitioner": "pathological", "classes_per_client": 1},
        client={"lr": 0.02},
        eval={"max_new_tokens": 0},
        run={"num_rounds": 3},
    )
    sim = Simulation(config, verbose=False)
    init = jax.device_get(sim.params)
    history = sim.run()
    final = jax.device_get(sim.params)
    # The global prompt is the init; the factors moved.
    np.testing.assert_array_equal(final["prompt"], init["prompt"])
    assert not np.array_equal(final["q"]["b"], init["q"]["b"])
    # Uploads are the factors only.
    factor_bytes = sum(
        x.size * x.dtype.itemsize for k, f in init.items() if k != "prompt" for x in f.values()
    )
    rounds = [h for h in history if "bytes_up" in h]
    assert all(h["bytes_up"] == factor_bytes * h["participants"] for h in rounds)
    # Sampled clients hold their own trained prompts; the others still hold the init.
    prompts = np.asarray(sim.client_store.algorithm.personal[0])
    assert prompts.shape == (config.data.num_clients, 3, config.model.hidden_size)
    moved = [not np.array_equal(p, init["prompt"]) for p in prompts]
    assert 0 < sum(moved) < len(moved)
    trained = [p for p, m in zip(prompts, moved, strict=True) if m]
    assert not np.array_equal(trained[0], trained[1])
    last = history[-1]
    assert np.isfinite(last["client/personal/loss_mean"])
    for row, was_trained in zip(sim.client_results, moved, strict=True):
        if not was_trained:  # never sampled: the global model exactly
            assert row["personal_loss"] == pytest.approx(row["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--algorithm.type", "personal_prompt", "--trainable.mode", "lora"], "lora_soft_prompt"),
        (
            ["--trainable.mode", "soft_prompt", "--trainable.lora_soft_prompt", "4"],
            "needs trainable.mode=lora",
        ),
        (
            ["--algorithm.type", "flexlora", "--trainable.mode", "lora"]
            + ["--trainable.lora_soft_prompt", "4", "--system.tier_fractions", "[1.0]"]
            + ["--system.tier_lora_ranks", "[8]"],
            "takes no soft prompt",
        ),
    ],
)
def test_bad_personal_prompt_configs_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
