"""Differential-privacy mechanisms inside the compiled round (`fedjax_llm.privacy.mechanisms`):
per-client clipping, the noised fixed-denominator mean, adaptive clipping, DP-SGD's private
gradient, the noise kernel's statistics and key hygiene.

Round-level checks use the linear least-squares problem of tests/test_pipeline.py, so every
client's delta can be recomputed one client at a time and checked in numpy.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import (
    ALGORITHM,
    CLIENT_LR,
    OBJECTIVE,
    SCHEDULE,
    M,
    cohort,
    compiled_round,
    hparams_for,
    make_problem,
)

from fedjax_llm.pipeline import AggregationPipeline, clip_upload, default_pipeline
from fedjax_llm.privacy.mechanisms import adaptive_clip, dp_mean, dp_sgd_objective
from fedjax_llm.round import (
    init_round_state,
    make_client_update,
    make_round_fn,
    make_sequential_round,
    round_hparams,
)
from kernels import add_gaussian_noise, gaussian_noise_like

IDS = np.asarray([4, 0, 3, 1, 5])
ALL_DELIVERED = np.ones(len(IDS), bool)


def dp_pipeline(expected: float, z: float, clip: float) -> AggregationPipeline:
    return AggregationPipeline(clip_upload(default=clip), dp_mean(expected, z, clip))


def run_round(pipeline, ids=IDS, delivered=ALL_DELIVERED, **kwargs):
    return compiled_round(pipeline, ids, delivered, **kwargs)


def client_deltas(ids) -> list[dict]:
    """Each client's unclipped delta, one client at a time."""
    data, params = make_problem()
    pipeline = default_pipeline()
    state = init_round_state(ALGORITHM, params, M, pipeline)
    update = jax.jit(make_client_update(ALGORITHM, OBJECTIVE, SCHEDULE, pipeline))
    out = []
    for cid in ids:
        result = update(
            {},
            ALGORITHM.broadcast(state.server),
            state.pipeline.transform,
            jax.tree.map(lambda s, c=cid: s[c], state.clients),
            data,
            jnp.int32(cid),
            jnp.float32(1.0),
            jnp.float32(1.0),
            jax.random.key(7),
            round_hparams(CLIENT_LR),
        )
        out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), result.upload.delta))
    return out


def test_no_noise_and_infinite_clip_is_the_plain_round():
    """z = 0 and C = inf: the DP round is the non-private round with uniform weights, to the
    last bit but one: the DP mean divides by a constant denominator, which XLA compiles to a
    multiplication by its reciprocal, the plain mean by the traced sum of weights."""
    (dp_state, dp_out), _ = run_round(dp_pipeline(len(IDS), 0.0, math.inf))
    (plain_state, _), _ = run_round(default_pipeline(), uniform_weighting=True)
    for a, b in zip(
        jax.tree.leaves(dp_state.server.params),
        jax.tree.leaves(plain_state.server.params),
        strict=True,
    ):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)
    assert float(dp_out.pipeline["dp/noise_stddev"]) == 0.0


def test_each_client_is_clipped_as_a_whole_and_summed_over_a_fixed_denominator():
    """The aggregate is sum_i clip(delta_i, C) / expected with the clip of each client's whole
    update (not per tensor, not after averaging), for a clip that binds some clients only."""
    deltas = client_deltas(IDS)
    norms = [np.sqrt(sum(np.sum(v**2) for v in d.values())) for d in deltas]
    clip = float(np.median(norms))
    expected_clients = 7.5  # the fixed denominator, not the 5 that came
    (state, out), params = run_round(dp_pipeline(expected_clients, 0.0, clip))
    clipped = [
        {k: v * min(1.0, clip / n) for k, v in d.items()}
        for d, n in zip(deltas, norms, strict=True)
    ]
    want = {
        k: np.asarray(params[k], np.float64) + sum(c[k] for c in clipped) / expected_clients
        for k in params
    }
    chex.assert_trees_all_close(state.server.params, want, rtol=1e-5, atol=1e-6)
    # Clipping after averaging or per tensor gives something else here.
    mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in params}
    mean_norm = np.sqrt(sum(np.sum(v**2) for v in mean.values()))
    averaged_then_clipped = {
        k: np.asarray(params[k]) + v * min(1.0, clip / mean_norm) * len(deltas) / expected_clients
        for k, v in mean.items()
    }
    assert not np.allclose(np.asarray(state.server.params["w"]), averaged_then_clipped["w"])
    assert float(out.pipeline["clip/clipped"]) == sum(n > clip for n in norms)


def test_the_noise_is_the_same_for_every_chunk_size_device_count_and_engine():
    pipeline = dp_pipeline(5.0, 1.3, 0.5)
    results = {f"chunk {c}": run_round(pipeline, chunk=c)[0] for c in (None, 1, 2)}
    results["2 devices"] = run_round(pipeline, chunk=1, devices=2)[0]
    data, params = make_problem()
    sequential = make_sequential_round(
        ALGORITHM, OBJECTIVE, SCHEDULE, num_clients_total=M, pipeline=pipeline
    )
    results["sequential"] = sequential(
        {},
        init_round_state(ALGORITHM, params, M, pipeline),
        data,
        cohort(IDS, ALL_DELIVERED, len(IDS)),
        jax.random.key(7),
        hparams_for(pipeline),
    )
    reference = results.pop("chunk None")[0].server.params
    # The noise (std 0.65 / 5 per coordinate) dwarfs float rounding: equal to 1e-6 means the
    # same noise was drawn.
    assert np.abs(np.asarray(reference["w"]) - np.asarray(params["w"])).max() > 0.01
    for name, (state, _) in results.items():
        chex.assert_trees_all_close(
            state.server.params, reference, rtol=1e-5, atol=1e-6, custom_message=name
        )
    other_key = run_round(pipeline, key=8)[0][0].server.params
    assert not np.allclose(np.asarray(other_key["w"]), np.asarray(reference["w"]))


def test_an_empty_round_still_adds_noise():
    """Whether anyone took part must not show: with every upload lost, the server still steps
    on the noise (updates_when_empty)."""
    (state, out), params = run_round(dp_pipeline(5.0, 1.0, 1.0), delivered=~ALL_DELIVERED)
    assert float(np.sum(np.asarray(out.weights))) == 0.0
    moved = np.asarray(state.server.params["w"]) - np.asarray(params["w"])
    assert np.all(moved != 0)
    # Noise only: the same for any cohort whose uploads were all lost.
    (other, _), _ = run_round(dp_pipeline(5.0, 1.0, 1.0), ids=IDS[:2], delivered=[False] * 2)
    chex.assert_trees_all_close(other.server.params, state.server.params)


@pytest.mark.parametrize("engine", ["compiled", "sequential"])
def test_a_private_round_uses_no_key_twice(engine):
    data, params = make_problem()
    transform = adaptive_clip(0.5, 0.5, 0.2, 1.0, 5.0)
    pipeline = AggregationPipeline(transform, dp_mean(5.0, 1.0, 0.5))
    objective = dp_sgd_objective(OBJECTIVE, 1.0, 1.0)
    kwargs = dict(num_clients_total=M, pipeline=pipeline)
    with jax.debug_key_reuse(True):
        if engine == "sequential":
            fn = make_sequential_round(ALGORITHM, objective, SCHEDULE, **kwargs)
        else:
            fn = jax.jit(
                make_round_fn(ALGORITHM, objective, SCHEDULE, clients_per_chunk=2, **kwargs)
            )
        state = init_round_state(ALGORITHM, params, M, pipeline)
        state, _ = fn(
            {},
            state,
            data,
            cohort(IDS, ALL_DELIVERED, 6),
            jax.random.key(3),
            hparams_for(pipeline),
        )
    assert np.all(np.isfinite(np.asarray(state.server.params["w"])))


def test_adaptive_clipping_follows_its_closed_form_and_sets_the_round_clip():
    """C' = C exp(-lr (b~ - gamma)) with b~ = (sum_i (b_i - 1/2)) / m + 1/2 over the expected
    cohort m, b_i whether client i was at most C (count noise 0 here), and the next round clips
    and noises with C'."""
    deltas = client_deltas(IDS)
    norms = np.asarray([np.sqrt(sum(np.sum(v**2) for v in d.values())) for d in deltas])
    c0, gamma, lr, expected = float(np.sort(norms)[1]) * 1.01, 0.5, 0.2, 5.0
    transform = adaptive_clip(c0, gamma, lr, 0.0, expected)
    pipeline = AggregationPipeline(transform, dp_mean(expected, 0.0, c0))
    (state, out), _ = run_round(pipeline)
    below = float(np.sum(norms <= c0))
    assert float(out.pipeline["clip/below"]) == below
    fraction = (below - 0.5 * len(IDS)) / expected + 0.5
    want = c0 * math.exp(-lr * (fraction - gamma))
    np.testing.assert_allclose(float(state.pipeline.transform), want, rtol=1e-6)
    assert float(out.pipeline["dp/clip_norm"]) == pytest.approx(c0)
    # The second round's clip (and the noise scale the aggregator reports) is the new C.
    data, _ = make_problem()
    fn = jax.jit(
        make_round_fn(
            ALGORITHM,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=M,
            clients_per_chunk=2,
            pipeline=pipeline,
        )
    )
    _, out2 = fn(
        {}, state, data, cohort(IDS, ALL_DELIVERED, 6), jax.random.key(1), hparams_for(pipeline)
    )
    assert float(out2.pipeline["dp/clip_norm"]) == pytest.approx(want, rel=1e-6)


def test_the_count_noise_of_adaptive_clipping_has_its_stddev():
    transform = adaptive_clip(1.0, 0.5, 1.0, 3.0, 10.0)
    keys = jax.random.split(jax.random.key(0), 20000)
    stats = {"clip/centered": jnp.float32(0.0)}
    new = jax.vmap(lambda k: transform.update(jnp.float32(1.0), stats, k, None))(keys)
    # log C' = -((0 + noise) / m + 1/2 - gamma), so the noise is -10 log C' (gamma = 1/2).
    noise = -10.0 * np.log(np.asarray(new, np.float64))
    assert abs(noise.mean()) < 5 * 3.0 / math.sqrt(len(keys))
    assert abs(noise.std() / 3.0 - 1) < 5 * math.sqrt(0.5 / len(keys))


# ------------------------------------------------------------------------------ DP-SGD
def test_dp_sgd_gradient_is_the_mean_of_clipped_per_example_gradients():
    data, params = make_problem()
    b = 4
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(b, 3)).astype(np.float32),
        "y": rng.normal(size=b).astype(np.float32),
        "example_weight": np.asarray([1, 1, 1, 0], np.float32),
    }
    clip = 0.7
    private = dp_sgd_objective(OBJECTIVE, clip, 0.0)
    grads = jax.jit(jax.grad(lambda p: private.loss({}, p, batch, jax.random.key(0))[0]))(params)
    w, bias = np.asarray(params["w"], np.float64), float(params["b"])
    total = {"w": np.zeros(3), "b": 0.0}
    for i in range(b):
        if not batch["example_weight"][i]:
            continue
        r = batch["x"][i] @ w + bias - batch["y"][i]
        g = {"w": r * batch["x"][i], "b": r}
        norm = math.sqrt(np.sum(g["w"] ** 2) + g["b"] ** 2)
        scale = min(1.0, clip / norm)
        total = {"w": total["w"] + g["w"] * scale, "b": total["b"] + g["b"] * scale}
    np.testing.assert_allclose(np.asarray(grads["w"]), total["w"] / b, rtol=1e-5)
    np.testing.assert_allclose(float(grads["b"]), total["b"] / b, rtol=1e-5)
    # The loss value and metrics are the objective's own.
    assert private.loss({}, params, batch, jax.random.key(0))[1] == pytest.approx(
        OBJECTIVE.loss({}, params, batch, jax.random.key(0))[1]
    )


def test_dp_sgd_noise_has_stddev_z_c_over_the_batch_size():
    data, params = make_problem()
    batch = {
        "x": np.zeros((5, 3), np.float32),
        "y": np.zeros(5, np.float32),
        "example_weight": np.ones(5, np.float32),
    }
    params = {"w": jnp.zeros(3), "b": jnp.float32(0.0)}  # zero loss: the gradient is the noise
    z, clip = 1.5, 0.4
    private = dp_sgd_objective(OBJECTIVE, clip, z)
    grad = jax.jit(jax.vmap(lambda k: jax.grad(lambda p: private.loss({}, p, batch, k)[0])(params)))
    draws = np.asarray(grad(jax.random.split(jax.random.key(1), 20000))["w"], np.float64)
    want = z * clip / 5
    assert abs(draws.std() / want - 1) < 5 * math.sqrt(0.5 / draws.size)
    assert abs(draws.mean()) < 5 * want / math.sqrt(draws.size)


# ------------------------------------------------------------------------- noise kernel
def test_gaussian_noise_statistics_over_many_draws():
    n, stddev = 100_000, 0.37
    like = {"a": jnp.zeros(n), "b": jnp.zeros((n // 4, 4))}
    noise = jax.jit(gaussian_noise_like)(jax.random.key(5), like, jnp.float32(stddev))
    for name, leaf in noise.items():
        x = np.asarray(leaf, np.float64).ravel()
        assert abs(x.mean()) < 5 * stddev / math.sqrt(n), name
        # The sample variance of n normals has relative std sqrt(2 / n).
        assert abs(x.var() / stddev**2 - 1) < 5 * math.sqrt(2 / n), name
        # Gaussian tails: the fourth standardized moment is 3.
        assert abs(np.mean((x / stddev) ** 4) - 3) < 5 * math.sqrt(96 / n), name
    # Leaves draw independent noise.
    a, b = np.asarray(noise["a"]), np.asarray(noise["b"]).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)


def test_zero_noise_returns_the_input_bit_for_bit():
    x = {"a": jnp.asarray([-0.0, 1.5, -2.25])}
    out = add_gaussian_noise(x, jax.random.key(0), 0.0)
    assert np.array_equal(np.signbit(np.asarray(out["a"])), np.signbit(np.asarray(x["a"])))
    assert np.array_equal(np.asarray(out["a"]), np.asarray(x["a"]))
