"""The aggregation pipeline (`fedjax_llm.pipeline`) and its kernels: composition of upload
transforms, clipping, hyperparameter declarations, the median and weighted-mean aggregators, a
gathering aggregator inside the compiled round, and key hygiene of the whole round.

The round-level tests use linear least squares (not a language model) as the `Objective`, so a
round compiles in a second and every client's delta is cheap to recompute.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms import ClientOutput, HyperParams, make_fedavg
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective
from fedjax_llm.pipeline import (
    AggregationPipeline,
    UploadTransform,
    chain,
    clip_upload,
    coordinate_median_aggregator,
    identity,
    merge_hyperparams,
    weighted_mean,
)
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientData,
    LocalSchedule,
    init_round_state,
    make_client_update,
    make_round_fn,
    make_sequential_round,
    round_hparams,
)
from fedjax_llm.sampling import Cohort, cohort_slots
from kernels import coordinate_median
from kernels import weighted_mean as kernel_weighted_mean

# ----------------------------------------------------------------------------- the problem
SIZES = (3, 2, 4, 3, 5, 2)
"""Examples of each client of a population of M = 6."""
M = len(SIZES)
D = 3
SCHEDULE = LocalSchedule(local_steps=2, batch_size=2, max_client_examples=max(SIZES))
CLIENT_LR = 0.1


def least_squares_loss(frozen, params, batch, key):
    """Weighted mean of ``0.5 * (x . w + b - y)^2``; padding examples have weight 0."""
    del frozen, key
    weight = batch["example_weight"]
    residual = jnp.sum(batch["x"] * params["w"], axis=-1) + params["b"] - batch["y"]
    loss_sum = jnp.sum(weight * 0.5 * residual**2)
    loss_weight = jnp.sum(weight)
    return loss_sum / jnp.maximum(loss_weight, 1.0), {LOSS_SUM: loss_sum, LOSS_WEIGHT: loss_weight}


OBJECTIVE = Objective(least_squares_loss, fields=("x", "y"))
ALGORITHM = make_fedavg(optax.inject_hyperparams(optax.sgd)(learning_rate=99.0), optax.sgd(1.0))


def make_problem(seed: int = 0):
    """Heterogeneous client data (each client its own true model) and initial params."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sum(SIZES), D)).astype(np.float32)
    truth = np.repeat(rng.normal(size=(M, D + 1)), SIZES, axis=0)
    y = (np.sum(x * truth[:, :D], axis=1) + truth[:, D]).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]]).astype(np.int32)
    data = ClientData(
        {"x": jnp.asarray(x), "y": jnp.asarray(y)},
        jnp.asarray(starts),
        jnp.asarray(np.asarray(SIZES, np.int32)),
    )
    params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.float32(0.3)}
    return data, params


def cohort(ids, delivered, slots: int) -> Cohort:
    """``ids`` on the first slots of a padded axis of ``slots`` entries."""
    n = len(ids)
    client_ids = np.zeros(slots, np.int32)
    client_ids[:n] = ids
    deliver = np.zeros(slots, bool)
    deliver[:n] = delivered
    return Cohort(jnp.asarray(client_ids), jnp.asarray(np.arange(slots) < n), jnp.asarray(deliver))


def hparams_for(pipeline: AggregationPipeline, **values) -> HyperParams:
    return round_hparams(CLIENT_LR, values={**pipeline.hyperparams, **values})


def compiled_round(pipeline, ids, delivered, chunk=2, devices=1, key=7, **kwargs):
    """One jitted round of the least-squares problem from fresh state; returns
    ``((state, output), initial params)``."""
    data, params = make_problem()
    fn = make_round_fn(
        ALGORITHM,
        OBJECTIVE,
        SCHEDULE,
        num_clients_total=M,
        clients_per_chunk=chunk,
        pipeline=pipeline,
        mesh=client_mesh(devices),
        **kwargs,
    )
    state = init_round_state(ALGORITHM, params, M, pipeline)
    slots = cohort_slots(len(ids), chunk, devices)
    out = jax.jit(fn)(
        {}, state, data, cohort(ids, delivered, slots), jax.random.key(key), hparams_for(pipeline)
    )
    return out, params


def client_mesh(devices: int):
    if devices == 1:
        return None
    return jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (CLIENT_AXIS,))


def tree_leaves_f64(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------- transforms
def scaled_by(factor: float, name: str) -> UploadTransform:
    """A transform with server and client state that multiplies the upload by ``factor`` and
    records the key it was given in its client state (to check which key each part sees)."""

    def apply(upload, state, client_state, key, hparams):
        del client_state, hparams
        upload = jax.tree.map(lambda x: x * factor + state, upload)
        return upload, jax.random.key_data(key), {f"{name}/calls": jnp.float32(1.0)}

    return UploadTransform(
        init=lambda like: jnp.float32(0.0),
        client_init=lambda like: jnp.zeros((2,), jnp.uint32),
        apply=apply,
        update=lambda state, stats, key, hparams: state + stats[f"{name}/calls"],
        hyperparams={f"{name}/unused": factor},
    )


def shifted_by(shift: float, name: str) -> UploadTransform:
    def apply(upload, state, client_state, key, hparams):
        del state, hparams
        upload = jax.tree.map(lambda x: x + shift, upload)
        return upload, jax.random.key_data(key), {f"{name}/calls": jnp.float32(1.0)}

    return scaled_by(1.0, name)._replace(apply=apply, hyperparams={})


def test_chain_of_nothing_is_identity():
    upload = ClientOutput({"w": jnp.arange(3.0)}, ())
    for transform in (chain(), identity()):
        like = jax.eval_shape(lambda: upload)
        state, client_state = transform.init(like), transform.client_init(like)
        out, new_client_state, stats = jax.jit(transform.apply)(
            upload, state, client_state, jax.random.key(0), round_hparams(0.1)
        )
        chex.assert_trees_all_equal(out, upload)
        assert new_client_state == () and stats == {} and state == ()
        assert dict(transform.hyperparams) == {}
    single = scaled_by(2.0, "a")
    assert chain(single) is single


def test_chain_applies_in_order_with_separate_keys_and_states():
    a, b = scaled_by(2.0, "a"), shifted_by(1.0, "b")
    upload = ClientOutput({"w": jnp.asarray([1.0, -3.0])}, ())
    like = jax.eval_shape(lambda: upload)
    key = jax.random.key(5)
    hparams = round_hparams(0.1)

    for first_a in (True, False):
        parts = (a, b) if first_a else (b, a)
        chained = chain(*parts)
        state, client_state = chained.init(like), chained.client_init(like)
        assert len(state) == 2 and len(client_state) == 2
        out, new_client_state, stats = jax.jit(chained.apply)(
            upload, state, client_state, key, hparams
        )
        expected = 2.0 * upload.delta["w"] + 1.0 if first_a else 2.0 * (upload.delta["w"] + 1.0)
        np.testing.assert_array_equal(out.delta["w"], expected)
        # Part i got split(key, 2)[i]: distinct keys, neither of them the client's own key.
        split = jax.random.key_data(jax.random.split(key, 2))
        np.testing.assert_array_equal(new_client_state[0], split[0])
        np.testing.assert_array_equal(new_client_state[1], split[1])
        assert not np.array_equal(split[0], split[1])
        assert sorted(stats) == ["a/calls", "b/calls"]
        # Each part updates its own server state from the merged stats.
        new_state = jax.jit(chained.update)(state, stats, key, hparams)
        assert [float(s) for s in new_state] == [1.0, 1.0]
        assert dict(chained.hyperparams) == {"a/unused": 2.0}

    clash = chain(scaled_by(2.0, "a"), shifted_by(1.0, "a"))
    with pytest.raises(ValueError, match="a/calls"):
        clash.apply(upload, clash.init(like), clash.client_init(like), key, hparams)


def test_clip_upload_clips_the_whole_client_output():
    # |(3, 4, 12)| = 13 over delta and extra together.
    upload = ClientOutput({"a": jnp.asarray([3.0, 4.0])}, {"c": jnp.asarray([12.0])})
    transform = clip_upload()
    assert dict(transform.hyperparams) == {"clip_norm": 1.0}
    apply = jax.jit(transform.apply)
    out, _, stats = apply(
        upload, (), (), jax.random.key(0), round_hparams(0.1, values={"clip_norm": 6.5})
    )
    chex.assert_trees_all_close(
        out, ClientOutput({"a": jnp.asarray([1.5, 2.0])}, {"c": jnp.asarray([6.0])}), rtol=1e-7
    )
    assert float(stats["clip/clipped"]) == 1.0 and float(stats["clip/norm_sum"]) == 13.0
    # Under the norm: returned exactly as it was.
    out, _, stats = apply(
        upload, (), (), jax.random.key(0), round_hparams(0.1, values={"clip_norm": 20.0})
    )
    chex.assert_trees_all_equal(out, upload)
    assert float(stats["clip/clipped"]) == 0.0 and float(stats["clip/norm_sum"]) == 13.0
    # Another name and default for the hyperparameter.
    assert dict(clip_upload("user_clip", 3.0).hyperparams) == {"user_clip": 3.0}


def test_clip_norm_is_a_round_hyperparameter_without_retracing():
    data, params = make_problem()
    pipeline = AggregationPipeline(clip_upload(), weighted_mean())
    round_fn = make_round_fn(
        ALGORITHM, OBJECTIVE, SCHEDULE, num_clients_total=M, clients_per_chunk=2, pipeline=pipeline
    )
    traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
    state = init_round_state(ALGORITHM, params, M, pipeline)
    # Client 5's upload is lost and two slots are padding: neither is clipped nor counted.
    ids, delivered = [0, 2, 5, 3], [True, True, False, True]
    for r, clip_norm in enumerate((1e-4, 1e3, 1e-3)):
        before = tree_leaves_f64(state.server.params)
        state, out = traced(
            {},
            state,
            data,
            cohort(ids, delivered, 6),
            jax.random.fold_in(jax.random.key(0), r),
            hparams_for(pipeline, clip_norm=clip_norm),
        )
        step = np.linalg.norm(tree_leaves_f64(state.server.params) - before)
        # The server moves by the mean of clipped deltas: at most the clip norm.
        assert step <= clip_norm * (1 + 1e-6), (clip_norm, step)
        clipped = float(out.pipeline["clip/clipped"])
        assert clipped == (3.0 if clip_norm < 1 else 0.0), (clip_norm, out.pipeline)
        assert float(out.pipeline["clip/norm_sum"]) > 0


def test_merge_hyperparams_refuses_clashing_defaults():
    assert merge_hyperparams({"a": 1.0}, {"b": 2.0}, {"a": 1.0}) == {"a": 1.0, "b": 2.0}
    assert merge_hyperparams() == {}
    with pytest.raises(ValueError, match="'clip_norm'"):
        merge_hyperparams({"clip_norm": 1.0}, {"clip_norm": 2.0})
    with pytest.raises(ValueError, match="'clip_norm'"):
        chain(clip_upload(default=1.0), clip_upload(default=2.0))
    clashing = coordinate_median_aggregator()._replace(hyperparams={"clip_norm": 0.5})
    with pytest.raises(ValueError, match="'clip_norm'"):
        _ = AggregationPipeline(clip_upload(default=1.0), clashing).hyperparams


# --------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("num_clients,seed", [(5, 0), (6, 1), (9, 2), (1, 3)])
def test_coordinate_median_matches_numpy_with_masked_clients(num_clients, seed):
    rng = np.random.default_rng(seed)
    stacked = {
        "a": rng.normal(size=(num_clients, 3)).astype(np.float32),
        "b": rng.normal(size=(num_clients, 2, 2)).astype(np.float32),
    }
    mask = rng.random(num_clients) < 0.7
    mask[0] = True
    if num_clients > 1:
        mask[-1] = False
        # A masked client holding NaN and inf must not leak into the median.
        stacked["a"][-1] = [np.nan, np.inf, -np.inf]
        stacked["b"][-1] = np.nan
    out = jax.jit(coordinate_median)(jax.tree.map(jnp.asarray, stacked), jnp.asarray(mask))
    for name, x in stacked.items():
        np.testing.assert_allclose(out[name], np.median(x[mask], axis=0), rtol=1e-6, atol=0)
        assert out[name].dtype == jnp.float32
    # No client counts: zeros, not NaN.
    none = jax.jit(coordinate_median)(jax.tree.map(jnp.asarray, stacked), jnp.zeros(num_clients))
    for x in jax.tree.leaves(none):
        np.testing.assert_array_equal(x, np.zeros_like(x))


def test_coordinate_median_keeps_a_counted_nan_visible():
    # A NaN in a counted client is ranked as +inf (documented), so it cannot vanish.
    x = jnp.asarray([[1.0], [np.nan], [5.0]])
    np.testing.assert_array_equal(coordinate_median(x, jnp.asarray([1, 1, 0])), [np.inf])
    np.testing.assert_array_equal(coordinate_median(x, jnp.asarray([1, 1, 1])), [5.0])


def test_weighted_mean_aggregator_equals_the_kernel():
    rng = np.random.default_rng(0)
    stacked = {
        "w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
    }
    stacked["w"] = stacked["w"].at[2].set(jnp.nan)  # zero weight: must contribute nothing
    weights = jnp.asarray([2.0, 1.0, 0.0, 3.0, 5.0, 1.0])
    expected = jax.jit(kernel_weighted_mean)(stacked, weights)
    aggregator = weighted_mean()
    like = jax.eval_shape(lambda: jax.tree.map(lambda x: x[0], stacked))
    hparams = round_hparams(0.1)

    @functools.partial(jax.jit, static_argnums=2)
    def aggregate(stacked, weights, chunk):
        state = aggregator.init(like)
        acc = aggregator.start(state, like)
        for begin in range(0, 6, chunk):
            part = jax.tree.map(lambda x, b=begin: x[b : b + chunk], stacked)
            acc = aggregator.accumulate(acc, part, weights[begin : begin + chunk], state, hparams)
        return aggregator.finalize(state, acc, jax.random.key(0), hparams)

    mean, state, metrics = aggregate(stacked, weights, 6)
    chex.assert_trees_all_equal(mean, expected)  # one chunk: the same sums in the same order
    assert state == () and metrics == {}
    # Chunks of 2 add the same terms in another grouping: float32 reassociation, a few ulps.
    chunked, _, _ = aggregate(stacked, weights, 2)
    chex.assert_trees_all_close(chunked, expected, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(tree_leaves_f64(expected)))


# ------------------------------------------------------ a gathering aggregator in the round
def median_pipeline() -> AggregationPipeline:
    return AggregationPipeline(identity(), coordinate_median_aggregator())


def test_median_round_is_independent_of_chunking_order_devices_and_engine():
    """The coordinate-wise median of the delivered clients' deltas, inside the compiled round,
    equals numpy's median of the per-client deltas whatever the chunk size, the order of the
    clients, the number of devices or the engine (sequential reference)."""
    data, params = make_problem()
    pipeline = median_pipeline()
    ids = np.asarray([4, 0, 3, 1, 5])
    delivered = np.asarray([True, True, False, True, True])  # client 3's upload is lost
    key = jax.random.key(11)
    hparams = hparams_for(pipeline)
    state0 = init_round_state(ALGORITHM, params, M, pipeline)

    # Per-client deltas from the sequential round's building block, one client at a time.
    client_update = jax.jit(make_client_update(ALGORITHM, OBJECTIVE, SCHEDULE, pipeline))
    broadcast = ALGORITHM.broadcast(state0.server)
    deltas = []
    for cid in ids[delivered]:
        result = client_update(
            {},
            broadcast,
            state0.pipeline.transform,
            jax.tree.map(lambda s, c=cid: s[c], state0.clients),
            data,
            jnp.int32(cid),
            jnp.float32(1.0),
            jnp.float32(1.0),
            key,
            hparams,
        )
        deltas.append(jax.tree.map(np.asarray, result.upload.delta))
    expected = {
        name: np.asarray(params[name]) + np.median(np.stack([d[name] for d in deltas]), axis=0)
        for name in params
    }

    def compiled(order, chunk, devices):
        return compiled_round(pipeline, ids[order], delivered[order], chunk, devices, key=11)[0]

    forward, backward = np.arange(len(ids)), np.arange(len(ids))[::-1]
    results = {f"chunk {chunk}": compiled(forward, chunk, 1) for chunk in (None, 1, 2)}
    results["reversed"] = compiled(backward, 2, 1)
    results["2 devices"] = compiled(forward, 1, 2)
    sequential = make_sequential_round(
        ALGORITHM, OBJECTIVE, SCHEDULE, num_clients_total=M, pipeline=pipeline
    )
    results["sequential"] = sequential(
        {}, state0, data, cohort(ids, delivered, len(ids)), key, hparams
    )

    # Each variant computes the same per-client deltas (up to float32 rounding of differently
    # batched arithmetic, an ulp or two of the O(1) params) and takes their exact median.
    for name, (state, out) in results.items():
        chex.assert_trees_all_close(
            state.server.params, expected, rtol=1e-6, atol=1e-7, custom_message=name
        )
        assert int(np.sum(np.asarray(out.weights) > 0)) == 4, name
    # The median is really not the mean here (the test would not see a wrong aggregator).
    mean = np.mean(np.stack([d["w"] for d in deltas]), axis=0)
    assert not np.allclose(expected["w"] - np.asarray(params["w"]), mean, atol=1e-3)


# ---------------------------------------------------------------------------- key hygiene
def noisy_clip(hyperparam: str = "clip_norm", scale: float = 1e-3) -> UploadTransform:
    """Clipping followed by Gaussian noise drawn from the client's upload key."""
    clip = clip_upload(hyperparam)

    def apply(upload, state, client_state, key, hparams):
        upload, client_state, stats = clip.apply(upload, state, client_state, None, hparams)
        leaves, treedef = jax.tree.flatten(upload)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)
        ]
        return treedef.unflatten(noisy), client_state, stats

    return clip._replace(apply=apply)


def random_sign_flip() -> UploadTransform:
    """A second random transform (an 'attack' flipping whole uploads at random)."""

    def apply(upload, state, client_state, key, hparams):
        flip = jax.random.bernoulli(key, 0.5)
        sign = jnp.where(flip, -1.0, 1.0)
        return jax.tree.map(lambda x: x * sign, upload), client_state, {"flip/count": flip * 1.0}

    return identity()._replace(apply=apply)


def reusing_transform() -> UploadTransform:
    """A user bug: the same key drawn from twice. The checker must catch it (control)."""

    def apply(upload, state, client_state, key, hparams):
        a, b = jax.random.normal(key), jax.random.normal(key)
        return jax.tree.map(lambda x: x + 0 * (a + b), upload), client_state, {}

    return identity()._replace(apply=apply)


def _round_under_key_reuse_checks(transform: UploadTransform, engine: str):
    data, params = make_problem()
    pipeline = AggregationPipeline(transform, weighted_mean())
    state = init_round_state(ALGORITHM, params, M, pipeline)
    args = (data, cohort([1, 4, 2], [True, True, False], 4), jax.random.key(3))
    with jax.debug_key_reuse(True):
        if engine == "sequential":
            fn = make_sequential_round(
                ALGORITHM, OBJECTIVE, SCHEDULE, num_clients_total=M, pipeline=pipeline
            )
        else:
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
        return fn({}, state, *args, hparams_for(pipeline, clip_norm=0.5))


@pytest.mark.parametrize("engine", ["compiled", "sequential"])
def test_round_uses_no_key_twice(engine):
    transform = chain(noisy_clip(), random_sign_flip())
    state, out = _round_under_key_reuse_checks(transform, engine)
    assert np.all(np.isfinite(tree_leaves_f64(state.server.params)))
    assert float(out.pipeline["clip/clipped"]) >= 0
    # The checker is really on: a transform that reuses its key is refused.
    with pytest.raises(jax.errors.KeyReuseError):
        _round_under_key_reuse_checks(reusing_transform(), engine)


def test_transform_keys_are_per_client():
    """Each client's transform draws from its own key: two clients' noise differs, and one
    client's noise is reproducible."""
    data, params = make_problem()
    pipeline = AggregationPipeline(noisy_clip(scale=1.0), coordinate_median_aggregator())
    client_update = jax.jit(make_client_update(ALGORITHM, OBJECTIVE, SCHEDULE, pipeline))
    state = init_round_state(ALGORITHM, params, M, pipeline)
    hparams = hparams_for(pipeline, clip_norm=1e-6)  # clipped to ~0: the upload is the noise

    def upload(cid):
        result = client_update(
            {},
            ALGORITHM.broadcast(state.server),
            state.pipeline.transform,
            jax.tree.map(lambda s: s[cid], state.clients),
            data,
            jnp.int32(cid),
            jnp.float32(1.0),
            jnp.float32(1.0),
            jax.random.key(0),
            hparams,
        )
        return tree_leaves_f64(result.upload)

    assert not np.allclose(upload(0), upload(1), atol=1e-3)
    np.testing.assert_array_equal(upload(2), upload(2))
