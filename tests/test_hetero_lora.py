"""Heterogeneous-rank LoRA: HetLoRA, FlexLoRA, FLoRA and FFA-LoRA against numpy.

The round-level tests train one LoRA-adapted linear map ``y = x (W + s a b)`` by least squares,
with the same parameter layout as the Llama adapters (``{"q": {"a": [L, d_in, R], "b": [L, R,
d_out]}}``), so every expectation is a few lines of numpy.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import ConfigError, Simulation
from fedjax_llm.algorithms import make_ffa_lora, make_flexlora, make_flora, make_hetlora
from fedjax_llm.algorithms.base import Broadcast, ClientOutput, RoundInfo
from fedjax_llm.algorithms.hetero_lora import (
    aggregation_error,
    error_diagnostics,
    holder_shares,
    merge_into_base,
    stack_lora,
    svd_factors,
    truncate,
)
from fedjax_llm.client_profiles import LORA_RANK
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import Cohort

L, D_IN, D_OUT, R = 1, 6, 5, 4
SCALING = 0.5
M, N_PER_CLIENT = 4, 6
SCHEDULE = LocalSchedule(local_steps=3, batch_size=3, shuffle=False)


def adapter_loss(frozen, params, batch, key):
    del key
    w = frozen["layers"]["attn"]["q_proj"]["kernel"][0]
    f = params["q"]
    pred = batch["x"] @ (w + SCALING * f["a"][0] @ f["b"][0])
    weight = batch["example_weight"]
    loss_sum = jnp.sum(weight * 0.5 * jnp.sum((pred - batch["y"]) ** 2, axis=-1))
    total = jnp.sum(weight)
    return loss_sum / jnp.maximum(total, 1.0), {LOSS_SUM: loss_sum, LOSS_WEIGHT: total}


OBJECTIVE = Objective(adapter_loss, fields=("x", "y"))


def problem(ranks=(1, 2, 4, 3)):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M * N_PER_CLIENT, D_IN)).astype(np.float32)
    targets = rng.normal(size=(M, D_IN, D_OUT)).astype(np.float32)
    y = np.einsum("ni,nio->no", x, np.repeat(targets, N_PER_CLIENT, axis=0))
    data = ClientData(
        examples={"x": jnp.asarray(x), "y": jnp.asarray(y)},
        client_start=jnp.arange(M, dtype=jnp.int32) * N_PER_CLIENT,
        client_count=jnp.full((M,), N_PER_CLIENT, jnp.int32),
        client_profile={LORA_RANK: jnp.asarray(ranks, jnp.float32)},
    )
    base = {
        "layers": {
            "attn": {
                "q_proj": {
                    "kernel": jnp.asarray(0.1 * rng.normal(size=(L, D_IN, D_OUT)), jnp.float32)
                }
            }
        }
    }
    params = {
        "q": {
            "a": jnp.asarray(rng.uniform(-0.4, 0.4, size=(L, D_IN, R)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(size=(L, R, D_OUT)), jnp.float32),
        }
    }
    return data, base, params


def run(algorithm, ids, ranks=(1, 2, 4, 3), lr=0.05, state=None):
    data, base, params = problem(ranks)
    round_fn = jax.jit(
        make_round_fn(algorithm, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=None)
    )
    if state is None:
        state = init_round_state(algorithm, params, M, frozen=base)
    cohort = Cohort(jnp.asarray(ids, jnp.int32), jnp.ones(len(ids), bool), jnp.ones(len(ids), bool))
    hparams = round_hparams(lr, values=dict(algorithm.hyperparams))
    return round_fn(base, state, data, cohort, jax.random.key(1), hparams)


def sgd():
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)


def np_product(f):
    return np.asarray(f["a"][0], np.float64) @ np.asarray(f["b"][0], np.float64)


# ------------------------------------------------------------------------------- kernels
def test_flexlora_svd_redistribution_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(1)
    product = rng.normal(size=(2, 7, 5)).astype(np.float32)
    factors = svd_factors({"q": jnp.asarray(product)}, rank=4)["q"]
    for r in (1, 2, 4):
        mine = truncate({"q": factors}, jnp.float32(r))["q"]
        approx = np.einsum("lir,lro->lio", np.asarray(mine["a"]), np.asarray(mine["b"]))
        for layer in range(2):
            u, s, vt = np.linalg.svd(product[layer].astype(np.float64), full_matrices=False)
            best = (u[:, :r] * s[:r]) @ vt[:r]
            np.testing.assert_allclose(approx[layer], best, rtol=1e-4, atol=1e-5)
            # Eckart-Young: the error is the discarded singular values.
            err = np.sum((product[layer] - approx[layer]) ** 2)
            np.testing.assert_allclose(err, np.sum(s[r:] ** 2), rtol=1e-4, atol=1e-6)


def test_flora_stacking_equals_the_weighted_product_average_exactly():
    rng = np.random.default_rng(2)
    factors, weights = [], np.array([0.2, 0.5, 0.3], np.float32)
    for r in (1, 3, 2):
        factors.append(
            {
                "q": {
                    "a": jnp.asarray(rng.normal(size=(L, D_IN, r)), jnp.float32),
                    "b": jnp.asarray(rng.normal(size=(L, r, D_OUT)), jnp.float32),
                }
            }
        )
    stacked = stack_lora(factors, jnp.asarray(weights))["q"]
    assert stacked["a"].shape == (L, D_IN, 6) and stacked["b"].shape == (L, 6, D_OUT)
    expected = sum(w * np_product(f["q"]) for w, f in zip(weights, factors, strict=True))
    np.testing.assert_allclose(np_product(stacked), expected, rtol=1e-5, atol=1e-6)


def test_aggregation_error_of_averaging_factors_by_hand():
    rng = np.random.default_rng(3)
    clients = [
        {"q": {"a": rng.normal(size=(L, D_IN, R)), "b": rng.normal(size=(L, R, D_OUT))}}
        for _ in range(3)
    ]
    w = np.array([0.5, 0.25, 0.25])
    diags = [error_diagnostics(jax.tree.map(jnp.float32, c)) for c in clients]
    mean = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs, strict=True)), *diags)
    mean_a = sum(wi * c["q"]["a"][0] for wi, c in zip(w, clients, strict=True))
    mean_b = sum(wi * c["q"]["b"][0] for wi, c in zip(w, clients, strict=True))
    mean_ab = sum(wi * c["q"]["a"][0] @ c["q"]["b"][0] for wi, c in zip(w, clients, strict=True))
    expected = np.linalg.norm(mean_a @ mean_b - mean_ab) / np.linalg.norm(mean_ab)
    np.testing.assert_allclose(float(aggregation_error(mean)), expected, rtol=1e-4)
    # One client alone: averaging factors is exact.
    np.testing.assert_allclose(float(aggregation_error(diags[0])), 0.0, atol=1e-6)


def test_merge_into_base_adds_the_scaled_product_to_the_kernel():
    _, base, params = problem()
    product = {"q": jnp.asarray(np_product(params["q"])[None], jnp.float32)}
    merged = merge_into_base(base, product, SCALING)
    np.testing.assert_allclose(
        merged["layers"]["attn"]["q_proj"]["kernel"],
        base["layers"]["attn"]["q_proj"]["kernel"] + SCALING * product["q"],
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------- round level
def test_clients_train_only_their_rank():
    """FFA-LoRA with one client of rank 2: b's rows from 2 on and all of a stay as they were."""
    algorithm = make_ffa_lora(sgd(), optax.sgd(1.0))
    _, _, params = problem()
    state, out = run(algorithm, (1,))
    new = state.server.params["q"]
    np.testing.assert_array_equal(new["a"], params["q"]["a"])
    np.testing.assert_array_equal(new["b"][:, 2:], params["q"]["b"][:, 2:])
    assert not np.allclose(new["b"][:, :2], params["q"]["b"][:, :2])
    # a is shared and frozen: averaging b is exact (up to float32 rounding).
    assert float(out.pipeline["lora/aggregation_error"]) < 1e-6


def test_ffa_lora_averages_each_component_of_b_over_the_clients_that_train_it():
    """Clients 0 (rank 1) and 2 (rank 4), equal sizes: row 0 of b is the mean of both clients'
    rows; rows 1-3 are client 2's alone."""
    algorithm = make_ffa_lora(sgd(), optax.sgd(1.0))
    singles = [np.asarray(run(algorithm, (i,))[0].server.params["q"]["b"]) for i in (0, 2)]
    both = run(algorithm, (0, 2))[0].server.params["q"]["b"]
    np.testing.assert_allclose(both[:, :1], (singles[0] + singles[1])[:, :1] / 2, rtol=1e-5)
    np.testing.assert_allclose(both[:, 1:], singles[1][:, 1:], rtol=1e-5, atol=1e-7)


def test_hetlora_zero_padded_sparsity_weighted_average_by_hand():
    """sum_i p_i s_i y_i / sum_i p_i s_i: y_i the client's zero-padded adapter, s_i its
    ||a_i b_i||_F (equal p_i here)."""
    algorithm = make_hetlora(sgd(), optax.sgd(1.0))
    singles = [run(algorithm, (i,))[0].server.params["q"] for i in (0, 2)]
    # A single client's round returns its own zero-padded adapter.
    np.testing.assert_allclose(singles[0]["a"][..., 1:], 0.0, atol=1e-6)
    s = [np.linalg.norm(np_product(y)) for y in singles]
    both = run(algorithm, (0, 2))[0].server.params["q"]
    for name in ("a", "b"):
        expected = (s[0] * np.asarray(singles[0][name]) + s[1] * np.asarray(singles[1][name])) / (
            s[0] + s[1]
        )
        np.testing.assert_allclose(both[name], expected, rtol=1e-5, atol=1e-6)


def test_hetlora_self_pruning_drops_a_weak_last_component():
    """With threshold 1 a client drops its last component iff that component's norm
    sqrt(sum ||a_j||^2 ||b_j||^2) is below the mean of its active components' (numpy)."""
    ranks = (1, 2, 4, 3)
    algorithm = make_hetlora(sgd(), optax.sgd(1.0), prune_lambda=0.1, prune_threshold=1.0)
    state, _ = run(algorithm, (2, 3), ranks=ranks)
    expected = [0.0, 0.0]
    for c in (2, 3):
        y = run(algorithm, (c,), ranks=ranks)[0].server.params["q"]  # the client's adapter
        a, b = np.asarray(y["a"][0], np.float64), np.asarray(y["b"][0], np.float64)
        norms = np.sqrt(np.sum(a**2, axis=0) * np.sum(b**2, axis=1))[: ranks[c]]
        expected.append(float(norms[-1] < norms.mean()))
    np.testing.assert_array_equal(state.clients.algorithm.pruned, expected)
    assert sum(expected) >= 1  # the case is not vacuous
    # A pruned client trains one component fewer next time.
    c = 2 + int(np.argmax(expected[2:]))
    again = run(algorithm, (c,), ranks=ranks, state=state)[0].server.params["q"]
    np.testing.assert_allclose(again["a"][..., ranks[c] - 1 :], 0.0, atol=1e-6)


def test_ffa_lora_with_fixed_holder_shares_sends_b_alone_and_divides_by_the_shares():
    """Clients 0 (rank 1) and 2 (rank 4), equal sizes: component 0 is held by both (share 1),
    components 1-3 by half (share 0.5), so dividing by these fixed shares gives the same
    adapter as dividing by the flags the clients send; the message has no flags."""
    shares = holder_shares(R, (1, 4), (0.5, 0.5))
    assert shares == (1.0, 0.5, 0.5, 0.5)
    fixed = make_ffa_lora(sgd(), optax.sgd(1.0), shares)
    flagged = make_ffa_lora(sgd(), optax.sgd(1.0))
    state, out = run(fixed, (0, 2))
    want = run(flagged, (0, 2))[0].server.params["q"]
    np.testing.assert_allclose(state.server.params["q"]["b"], want["b"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(state.server.params["q"]["a"], want["a"])
    assert float(out.pipeline["lora/aggregation_error"]) == 0.0
    # A component held by a quarter of the clients is scaled up fourfold.
    quarter = make_ffa_lora(sgd(), optax.sgd(1.0), (1.0, 0.5, 0.5, 0.25))
    b = run(quarter, (0, 2))[0].server.params["q"]["b"]
    _, _, params = problem()
    b0 = np.asarray(params["q"]["b"])
    np.testing.assert_allclose(b[:, 3] - b0[:, 3], 2 * (want["b"][:, 3] - b0[:, 3]), rtol=1e-5)


@pytest.mark.parametrize("name", ["hetlora", "ffa_lora"])
def test_params_delta_of_an_aggregate_is_the_servers_sgd_step(name):
    """What contribution scores step by: for one expanded upload, its own adapter change; for
    the weighted mean of uploads, exactly the change a plain SGD server makes."""
    algorithm = {"hetlora": make_hetlora, "ffa_lora": make_ffa_lora}[name](sgd(), optax.sgd(1.0))
    _, _, params = problem()
    rng = np.random.default_rng(3)
    changes = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)]
    changes.append(jax.tree.map(lambda x: 0.3 * x, changes[0]))
    changes.append(jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params))
    if name == "ffa_lora":  # its message: b's change and the flags (every component held)
        messages = [
            ClientOutput({t: {"b": f["b"]} for t, f in c.items()}, {"holds": jnp.ones(R)})
            for c in changes
        ]
        changes = [{t: {"a": 0 * f["a"], "b": f["b"]} for t, f in c.items()} for c in changes]
    else:
        messages = [ClientOutput(c) for c in changes]
    expand = algorithm.expand_upload or (lambda b, u: u)
    uploads = [expand(Broadcast(params), m) for m in messages]
    for upload, change in zip(uploads, changes, strict=True):
        chex.assert_trees_all_close(algorithm.params_delta(params, upload), change, rtol=1e-5)
    weights = np.array([1.0, 2.0, 3.0])
    mean = jax.tree.map(
        lambda *x: sum(w * v for w, v in zip(weights, x, strict=True)) / weights.sum(), *uploads
    )
    state = algorithm.server_init(params)
    info = RoundInfo(jnp.float32(3), M)
    new = algorithm.server_params(algorithm.server_update(state, mean, info, jax.random.key(0)))
    chex.assert_trees_all_close(
        algorithm.params_delta(params, mean),
        jax.tree.map(jnp.subtract, new, params),
        rtol=1e-4,
        atol=1e-6,
    )


def test_holder_shares_by_hand():
    assert holder_shares(3, (), ()) == (1.0, 1.0, 1.0)
    assert holder_shares(4, (2, 4, 1), (0.5, 0.25, 0.25)) == pytest.approx((1.0, 0.75, 0.25, 0.25))
    with pytest.raises(ValueError, match="components 2 to 3"):
        holder_shares(4, (1, 2), (0.5, 0.5))


@pytest.mark.parametrize("shares", [(1.0, 0.5, 0.0, 0.5), (1.0, 1.5, 1.0, 1.0)])
def test_ffa_lora_refuses_holder_shares_outside_zero_to_one(shares):
    with pytest.raises(ValueError, match=r"holder shares must be in \(0, 1\]"):
        make_ffa_lora(sgd(), optax.sgd(1.0), shares)


def test_ffa_lora_refuses_a_holder_share_count_other_than_the_rank():
    with pytest.raises(ValueError, match=f"3 holder shares for LoRA rank {R}"):
        run(make_ffa_lora(sgd(), optax.sgd(1.0), (1.0, 0.5, 0.5)), (0, 2))


def test_flexlora_global_adapter_is_the_rank_r_svd_of_the_clients_mean_product():
    """Server sgd(1.0): the new product is the best rank-R approximation of the clients'
    weighted mean product; each client's product comes from a single-client round (whose
    rank-r product the rank-R SVD keeps exactly)."""
    algorithm = make_flexlora(sgd(), optax.sgd(1.0))
    ids = (0, 2, 3)
    state, out = run(algorithm, ids)
    _, _, params = problem()
    old = np_product(params["q"])
    # Each client's upload is its product minus the old product; the weighted mean (equal
    # sizes) of (old + upload) is the mean product.
    uploads = []
    for c in ids:
        single, _ = run(algorithm, (c,))
        uploads.append(np_product(single.server.params["q"]))
    # A single client's product has rank <= its rank <= R, so the SVD keeps it exactly.
    mean_product = np.mean(uploads, axis=0)
    u, sv, vt = np.linalg.svd(mean_product)
    best = (u[:, :R] * sv[:R]) @ vt[:R]
    np.testing.assert_allclose(np_product(state.server.params["q"]), best, rtol=1e-4, atol=1e-5)
    assert not np.allclose(best, old)
    assert float(out.pipeline["lora/aggregation_error"]) > 0


def test_flora_merges_the_exact_mean_product_into_the_base_and_starts_a_fresh_adapter():
    algorithm = make_flora(sgd(), SCALING)
    _, base, params = problem()
    kernel = np.asarray(base["layers"]["attn"]["q_proj"]["kernel"], np.float64)

    def merged_change(ids):
        state, _ = run(algorithm, ids)
        return np.asarray(state.server.base["layers"]["attn"]["q_proj"]["kernel"]) - kernel, state

    singles = [merged_change((c,))[0] for c in (0, 2)]  # scaling * each client's product
    both, state = merged_change((0, 2))
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert np.abs(both).max() > 1e-3
    np.testing.assert_array_equal(state.server.params["q"]["b"], 0.0)
    assert not np.allclose(state.server.params["q"]["a"], params["q"]["a"])


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("algorithm", ["hetlora", "flexlora", "flora", "ffa_lora"])
def test_each_method_learns_with_rank_tiers(make_config, algorithm):
    extra = {"prune_lambda": 0.01, "prune_threshold": 0.05} if algorithm == "hetlora" else {}
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 4, "lora_targets": ("q", "v")},
        client={"optimizer": "adamw", "lr": 0.05},
        algorithm={"type": algorithm, **extra},
        system={"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (1, 4)},
        run={"num_rounds": 4},
    )
    sim = Simulation(config, verbose=False)
    values = sum(x.size for x in jax.tree.leaves(sim.params))
    history = sim.run()
    rounds = [h for h in history if "train_loss" in h]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    # Clients send their factors' change (FFA-LoRA: b's alone and R flags), never full-size
    # products.
    b_values = sum(f["b"].size for f in sim.params.values())
    per_client = 4 * values if algorithm != "ffa_lora" else 4 * b_values + 4 * 4
    assert all(h["bytes_up"] == per_client * h["participants"] for h in rounds)
    errors = [h["pipeline/lora/aggregation_error"] for h in rounds]
    assert all(np.isfinite(errors))
    if algorithm == "ffa_lora":
        assert max(errors) < 1e-5
    else:
        assert max(errors) > 1e-3


def test_rank_tiers_need_a_heterogeneous_rank_algorithm(make_config):
    with pytest.raises(ConfigError, match="tier_lora_ranks"):
        make_config(
            trainable={"mode": "lora", "lora_rank": 4},
            system={"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (1, 4)},
        ).validate()


@pytest.mark.parametrize(
    "overrides",
    [
        {"privacy": {"level": "client", "noise_multiplier": 1.0}},
        {"secure_aggregation": {"enabled": True}},
    ],
)
def test_rank_aggregations_refuse_client_dp_and_secure_aggregation(make_config, overrides):
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 4},
        algorithm={"type": "flexlora"},
        sampling={"kind": "poisson"},
        **overrides,
    )
    with pytest.raises(ConfigError, match="flexlora"):
        config.validate()


@pytest.mark.parametrize(
    "overrides",
    [
        {"privacy": {"level": "client", "noise_multiplier": 1.0, "clip_norm": 0.05}},
        {"secure_aggregation": {"enabled": True, "clip_norm": 1.0}},
    ],
)
def test_ffa_lora_runs_under_client_dp_and_secure_aggregation(make_config, overrides):
    """FFA-LoRA's upload is a plain average of b's change, so DP clips and noises it and secure
    aggregation masks it; a stays exactly at its init and the message has no flags."""
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 4, "lora_targets": ("q", "v")},
        algorithm={"type": "ffa_lora"},
        system={"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (2, 4)},
        sampling={"kind": "poisson"},
        run={"num_rounds": 2},
        eval={"every": 0},
        **overrides,
    )
    sim = Simulation(config, verbose=False)
    before = jax.tree.map(np.asarray, sim.params)
    b_values = sum(f["b"].size for f in sim.params.values())
    history = sim.run()
    rounds = [h for h in history if "train_loss" in h]
    for target, f in sim.params.items():
        np.testing.assert_array_equal(f["a"], before[target]["a"])
        assert not np.allclose(f["b"], before[target]["b"])
    if "privacy" in overrides:
        assert history[-1]["privacy/epsilon"] > 0
        assert all(h["pipeline/clip/clipped"] == h["participants"] for h in rounds)
        assert all(h["bytes_up"] == 4 * b_values * h["participants"] for h in rounds)
    else:
        assert all(h["pipeline/secagg/summed"] == h["participants"] for h in rounds)


def test_ffa_lora_under_dp_needs_every_rank_component_held(make_config):
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 4},
        algorithm={"type": "ffa_lora"},
        system={"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (1, 2)},
        sampling={"kind": "poisson"},
        privacy={"level": "client", "noise_multiplier": 1.0},
    )
    with pytest.raises(ConfigError, match="lower trainable.lora_rank to 2"):
        config.validate()


def test_svd_factors_runs_one_svd_at_a_time():
    """Two SVD calls in flight at once can hang XLA:CPU (`kernels.ordering`): each SVD after
    the first computes its input from the previous SVD's output (a data dependency, which the
    CPU executor's thunk order follows), and the values are unchanged."""
    rng = np.random.default_rng(0)
    products = {
        t: jnp.asarray(rng.normal(size=(2, 6, n)), jnp.float32)
        for t, n in (("k", 3), ("q", 5), ("v", 3))
    }
    closed = jax.make_jaxpr(lambda p: svd_factors(p, 2))(products)
    depends: dict = {}
    svd_inputs = []  # each SVD's input, in program order
    for eqn in closed.jaxpr.eqns:
        upstream = set().union(
            *(depends.get(v, set()) for v in eqn.invars if not hasattr(v, "val"))
        )
        if eqn.primitive.name == "svd" or str(eqn.params.get("name", "")) == "svd":
            svd_inputs.append(eqn.invars[0])
            upstream = upstream | {len(svd_inputs) - 1}
        for v in eqn.outvars:
            depends[v] = upstream
    assert len(svd_inputs) == 3
    for k, x in enumerate(svd_inputs[1:], start=1):
        assert k - 1 in depends[x]
    factors = svd_factors(products, 2)
    for t, p in products.items():
        u, s, vt = np.linalg.svd(np.asarray(p, np.float64), full_matrices=False)
        want = (u[..., :2] * s[..., None, :2]) @ vt[..., :2, :]
        f = factors[t]
        np.testing.assert_allclose(np.asarray(f["a"] @ f["b"]), want, rtol=1e-4, atol=1e-5)
