"""Communication compression: the compressors of `kernels.compression` (closed forms and exact
bytes), the error-feedback upload transforms of `fedjax_llm.compression` inside the compiled
round, the compressed broadcast, config checks and one small run.

The round-level tests use linear least squares as the `Objective`, so a round compiles in a
second.
"""

from __future__ import annotations

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import ALGORITHM, OBJECTIVE, SCHEDULE, M, make_problem

from fedjax_llm import ConfigError, Simulation, load_config
from fedjax_llm.algorithms import ClientOutput, RoundInfo
from fedjax_llm.compression import (
    BYTES_STAT,
    RESIDUAL_STAT,
    DownlinkState,
    compress_upload,
    downlink_bytes,
    lowrank_compressor,
    qsgd_compressor,
    randk_compressor,
    sign_compressor,
    topk_compressor,
    with_downlink_compression,
)
from fedjax_llm.metrics import read_jsonl
from fedjax_llm.pipeline import AggregationPipeline, default_pipeline, weighted_mean
from fedjax_llm.round import (
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import Cohort
from kernels import (
    low_rank,
    low_rank_bytes,
    num_kept,
    random_k,
    scaled_sign,
    stochastic_quantize,
    top_k,
)


def random_tree(seed: int = 0):
    """A small upload with distinct magnitudes: a matrix, a vector and a scalar."""
    rng = np.random.default_rng(seed)
    return {
        "m": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "s": jnp.asarray(rng.normal(), jnp.float32),
    }


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------- compressors
def test_top_k_keeps_exactly_the_k_largest_over_the_whole_upload():
    tree = random_tree()
    n = 24
    out, nbytes = jax.jit(top_k, static_argnums=1)(tree, 0.25)
    k = 6  # ceil(0.25 * 24)
    x, y = flat(tree), flat(out)
    largest = np.argsort(-np.abs(x))[:k]
    expected = np.zeros(n, np.float32)
    expected[largest] = x[largest]
    np.testing.assert_array_equal(y, expected)
    assert np.count_nonzero(y) == k
    assert nbytes == k * (4 + 4) == 48
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    # k is ceil(ratio * n) with the ratio read as a decimal: 0.07 of 100 is 7, not 8.
    assert num_kept(0.07, 100) == 7 and num_kept(0.001, 10) == 1 and num_kept(1.0, 10) == 10
    everything, _ = top_k(tree, 1.0)
    chex.assert_trees_all_equal(everything, tree)


def test_random_k_is_unbiased_with_exactly_k_values():
    x = {"a": jnp.linspace(-2.0, 3.0, 12), "b": jnp.asarray([0.5, -1.5, 4.0, 1.0])}
    n, k, draws = 16, 4, 4000
    keys = jax.random.split(jax.random.key(0), draws)
    compress = jax.jit(jax.vmap(lambda x, key: random_k(x, 0.25, key), in_axes=(None, 0)))
    out, nbytes = compress(x, keys)
    samples = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"])], axis=1)
    assert np.all(np.asarray(nbytes) == k * 4 + 4) and k * 4 + 4 == 20
    np.testing.assert_array_equal(np.count_nonzero(samples, axis=1), k)
    # Each coordinate is x_i * (n / k) with probability k / n, else 0: variance (n / k - 1)
    # x_i^2, so the mean of `draws` samples has standard deviation |x_i| sqrt(3 / draws). Five
    # of them: a false failure has probability below 16 * 6e-7.
    truth = flat(x)
    bound = 5 * np.abs(truth) * math.sqrt((n / k - 1) / draws) + 1e-6
    assert np.all(np.abs(samples.mean(axis=0) - truth) <= bound)
    # Unscaled (for error feedback): the kept values as they are.
    kept, _ = random_k(x, 0.25, keys[0], unbiased=False)
    y = flat(kept)
    np.testing.assert_array_equal(y[y != 0], truth[y != 0])


@pytest.mark.parametrize("scale", ["max_abs", "l2"])
def test_qsgd_is_unbiased_and_within_one_step(scale):
    bits, draws = 4, 4000
    levels = 2 ** (bits - 1) - 1  # 7
    x = {"a": jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), jnp.float32)}
    x["a"] = x["a"].at[0, 0].set(0.0)
    keys = jax.random.split(jax.random.key(3), draws)
    compress = jax.vmap(
        lambda x, key: stochastic_quantize(x, bits, key, scale=scale), in_axes=(None, 0)
    )
    out, nbytes = jax.jit(compress)(x, keys)
    a, q = np.asarray(x["a"]), np.asarray(out["a"])
    m = np.abs(a).max() if scale == "max_abs" else np.sqrt(np.sum(a.astype(np.float64) ** 2))
    step = m / levels
    assert math.ceil(64 * bits / 8) + 4 == 36 and np.all(np.asarray(nbytes) == 36)
    # Every value is on the grid of `levels` steps each side of zero, within one step of x.
    grid = q / step
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
    assert np.abs(grid).max() <= levels + 1e-4
    assert np.all(np.abs(q - a) <= step * (1 + 1e-5))
    assert np.all(q[:, 0, 0] == 0.0)  # zero is exact
    # Unbiased: each draw is one of the two neighbours, so its variance is at most step^2 / 4.
    bound = 5 * step / (2 * math.sqrt(draws))
    assert np.all(np.abs(q.mean(axis=0) - a) <= bound)


def test_qsgd_bytes_per_leaf_and_bits_checked():
    tree = {"a": jnp.zeros((5,)), "b": jnp.zeros((2, 3))}
    _, nbytes = stochastic_quantize(tree, 3, jax.random.key(0))
    assert nbytes == (math.ceil(5 * 3 / 8) + 4) + (math.ceil(6 * 3 / 8) + 4) == 2 + 4 + 3 + 4
    out, _ = stochastic_quantize(tree, 8, jax.random.key(0))
    chex.assert_trees_all_equal(out, tree)  # an all-zero leaf (scale 0) stays zero
    for bad in (0, 1, 17):
        with pytest.raises(ValueError, match="bits"):
            stochastic_quantize(tree, bad, jax.random.key(0))


def test_scaled_sign_is_the_mean_magnitude_times_the_sign():
    tree = {"a": jnp.asarray([1.0, -3.0, 0.0, 2.0, -0.5, 0.25, 7.0, -1.0, 4.0, 0.0])}
    out, nbytes = jax.jit(scaled_sign)(tree)
    a = np.asarray(tree["a"])
    scale = np.abs(a).sum() / a.size
    np.testing.assert_allclose(out["a"], scale * np.where(a >= 0, 1.0, -1.0), rtol=1e-6)
    assert nbytes == math.ceil(10 / 8) + 4 == 6


def test_low_rank_is_exact_for_a_rank_r_matrix_and_dense_for_vectors():
    rng = np.random.default_rng(2)
    stack = np.einsum("lir,lrj->lij", rng.normal(size=(3, 12, 2)), rng.normal(size=(3, 2, 9)))
    tree = {
        "stacked": jnp.asarray(stack, jnp.float32),  # 3 matrices 12 x 9 of rank 2
        "vector": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        "tiny": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),  # factors not smaller
    }
    out, nbytes = jax.jit(low_rank, static_argnums=1)(tree, 2, jax.random.key(0))
    for i in range(3):
        u, s, vt = np.linalg.svd(stack[i].astype(np.float64))
        truncated = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(out["stacked"][i], truncated, atol=2e-5)
    chex.assert_trees_all_equal(out["vector"], tree["vector"])
    chex.assert_trees_all_equal(out["tiny"], tree["tiny"])
    assert nbytes == 3 * 2 * (12 + 9) * 4 + 5 * 4 + 4 * 4 == 540
    assert low_rank_bytes(jax.eval_shape(lambda: tree), 2) == nbytes


# ---------------------------------------------------------------------------- error feedback
COMPRESSORS = {
    "topk": topk_compressor(0.2),
    "randk": randk_compressor(0.2, unbiased=False),
    "qsgd": qsgd_compressor(2),
    "sign": sign_compressor(),
    "lowrank": lowrank_compressor(1),
}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_error_feedback_accumulates_exactly_what_compression_dropped(name):
    compressor = COMPRESSORS[name]
    transform = compress_upload(compressor)
    uploads = [
        ClientOutput(random_tree(seed), {"c": jnp.full((2,), seed, jnp.float32)})
        for seed in range(6)
    ]
    like = jax.eval_shape(lambda: uploads[0])
    residual = transform.client_init(like)
    # The residual covers the model change; the algorithm's extra is sent dense.
    chex.assert_trees_all_equal(residual, jax.tree.map(jnp.zeros_like, uploads[0].delta))
    apply = jax.jit(transform.apply)
    hparams = round_hparams(0.1)
    sent_sum = jax.tree.map(jnp.zeros_like, uploads[0].delta)
    for i, upload in enumerate(uploads):
        sent, new_residual, stats = apply(
            upload, transform.init(like), residual, jax.random.key(i), hparams
        )
        chex.assert_trees_all_equal(sent.extra, upload.extra)
        # The stats: the exact bytes (compressed change + 2 dense float32) and the norm of
        # what was left out (the new residual).
        assert float(stats[BYTES_STAT]) == compressor.message_bytes(like.delta) + 8
        expected_norm = np.linalg.norm(flat(new_residual).astype(np.float64))
        np.testing.assert_allclose(float(stats[RESIDUAL_STAT]), expected_norm, rtol=1e-5)
        # Each round: sent + new residual == upload + old residual.
        chex.assert_trees_all_close(
            jax.tree.map(lambda s, r: s + r, sent.delta, new_residual),
            jax.tree.map(lambda u, r: u + r, upload.delta, residual),
            atol=1e-6,
        )
        sent_sum = jax.tree.map(lambda a, b: a + b, sent_sum, sent.delta)
        residual = new_residual
    total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), [u.delta for u in uploads])
    chex.assert_trees_all_close(
        jax.tree.map(lambda s, r: s + r, sent_sum, residual), total, atol=1e-5
    )
    assert np.any(flat(residual) != 0)  # the compressor really dropped something


def test_without_error_feedback_nothing_is_kept():
    transform = compress_upload(topk_compressor(0.25), error_feedback=False)
    upload = ClientOutput(random_tree(), ())
    like = jax.eval_shape(lambda: upload)
    assert transform.client_init(like) == ()
    sent, state, _ = jax.jit(transform.apply)(upload, (), (), jax.random.key(0), round_hparams(0.1))
    assert state == ()
    chex.assert_trees_all_equal(sent.delta, top_k(upload.delta, 0.25)[0])


# ------------------------------------------------------------------------------ in the round
COHORT = Cohort(
    jnp.asarray([0, 2, 3, 5], jnp.int32),
    jnp.asarray([True, True, True, False]),  # the last slot is padding
    jnp.asarray([True, False, True, False]),  # client 2's upload is lost
)


def run_rounds(pipeline, algorithm=ALGORITHM, rounds=2):
    """``rounds`` compiled rounds of the least-squares problem; returns (state, outputs)."""
    data, params = make_problem()
    fn = jax.jit(
        make_round_fn(
            algorithm,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=M,
            clients_per_chunk=2,
            pipeline=pipeline,
        )
    )
    state = init_round_state(algorithm, params, M, pipeline)
    hparams = round_hparams(0.1, values=pipeline.hyperparams)
    outputs = []
    for r in range(rounds):
        state, out = fn({}, state, data, COHORT, jax.random.key(r), hparams)
        outputs.append(out)
    return state, outputs


@pytest.mark.parametrize("compressor", [topk_compressor(1.0), randk_compressor(1.0, False)])
def test_round_with_nothing_dropped_equals_the_plain_round(compressor):
    plain, plain_out = run_rounds(default_pipeline())
    pipeline = AggregationPipeline(compress_upload(compressor), weighted_mean())
    compressed, out = run_rounds(pipeline)
    chex.assert_trees_all_equal(compressed.server, plain.server)
    np.testing.assert_array_equal(out[-1].train_loss, plain_out[-1].train_loss)
    assert float(out[-1].pipeline[RESIDUAL_STAT]) == 0.0
    chex.assert_trees_all_equal(
        compressed.clients.transform, jax.tree.map(jnp.zeros_like, compressed.clients.transform)
    )


def test_round_reports_exact_bytes_and_commits_residuals_of_delivered_clients_only():
    compressor = topk_compressor(0.5)
    pipeline = AggregationPipeline(compress_upload(compressor), weighted_mean())
    state, outputs = run_rounds(pipeline, rounds=1)
    # The upload: delta {"b": [], "w": [3]}, 4 values; k = 2: 2 * (4 + 4) bytes per client,
    # summed over the 2 delivered clients.
    assert float(outputs[0].pipeline[BYTES_STAT]) == 2 * 2 * 8
    residual = np.concatenate(
        [np.asarray(state.clients.transform["b"])[:, None]]
        + [np.asarray(state.clients.transform["w"])],
        axis=1,
    )
    written = np.any(residual != 0, axis=1)
    # Clients 0 and 3 delivered: exactly 2 of their 4 values were left out; the lost upload
    # of client 2, the padding slot's client 5 and the clients never sampled keep zeros.
    np.testing.assert_array_equal(written, [True, False, False, True, False, False])
    np.testing.assert_array_equal(np.count_nonzero(residual, axis=1), [2, 0, 0, 2, 0, 0])


# ---------------------------------------------------------------------------------- downlink
def test_downlink_without_loss_equals_the_plain_round():
    plain, _ = run_rounds(default_pipeline(), rounds=3)
    wrapped = with_downlink_compression(ALGORITHM, topk_compressor(1.0))
    state, _ = run_rounds(default_pipeline(), wrapped, rounds=3)
    assert isinstance(state.server, DownlinkState)
    chex.assert_trees_all_equal(state.server.inner, plain.server)
    chex.assert_trees_all_equal(state.server.client_params, plain.server.params)
    assert int(state.server.message_bytes) == 4 * (4 + 4)
    # What a client downloads: the compressed change (FedAvg broadcasts nothing else).
    assert downlink_bytes(state.server, jax.eval_shape(wrapped.broadcast, state.server)) == 32
    assert downlink_bytes(plain.server, jax.eval_shape(ALGORITHM.broadcast, plain.server)) is None


def test_downlink_clients_train_from_their_copy_and_the_gap_is_the_residual():
    wrapped = with_downlink_compression(ALGORITHM, topk_compressor(0.25))
    data, params = make_problem()
    server = wrapped.server_init(params)
    assert int(server.message_bytes) == 1 * 8  # k = ceil(0.25 * 4) = 1 value and index
    aggregate = ClientOutput({"w": jnp.asarray([0.1, -0.4, 0.2]), "b": jnp.float32(0.05)}, ())
    info = RoundInfo(jnp.int32(1), M)
    update = jax.jit(wrapped.server_update)
    new = update(server, aggregate, info, jax.random.key(0))
    # The server's model moved by the full aggregate; the clients' copy by its largest value.
    chex.assert_trees_all_close(
        wrapped.server_params(new), jax.tree.map(jnp.add, params, aggregate.delta), atol=1e-7
    )
    moved = jax.tree.map(jnp.subtract, new.client_params, params)
    np.testing.assert_allclose(moved["w"], [0.0, -0.4, 0.0], atol=1e-7)
    assert float(moved["b"]) == 0.0
    chex.assert_trees_all_equal(wrapped.broadcast(new).params, new.client_params)
    # Next round, with nothing new, the gap (the server-side residual) is sent: 0.2 first.
    newer = update(new, jax.tree.map(jnp.zeros_like, aggregate), info, jax.random.key(1))
    moved = jax.tree.map(jnp.subtract, newer.client_params, params)
    np.testing.assert_allclose(moved["w"], [0.0, -0.4, 0.2], atol=1e-7)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--aggregation.compression_ratio", "0"], "compression_ratio=0.0 must be in \\(0, 1\\]"),
        (["--aggregation.compression_ratio", "1.5"], "compression_ratio=1.5 must be in"),
        (["--aggregation.quantization_bits", "0"], "quantization_bits=0 must be in \\[2, 16\\]"),
        (["--aggregation.lowrank_rank", "0"], "lowrank_rank=0 must be positive"),
        (["--aggregation.transforms", "[topk,sign]"], "2 compressors"),
    ],
)
def test_bad_compression_settings_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_shipped_compression_config_loads():
    path = os.path.join(
        os.path.dirname(__file__), "..", "configs", "compression_topk_error_feedback.yaml"
    )
    config = load_config(path)
    assert config.aggregation.transforms == ("topk",) and config.aggregation.error_feedback


# ---------------------------------------------------------------------------------- the run
def test_topk_run_learns_and_reports_exact_bytes(make_config):
    """Top-10% uploads and a top-10% broadcast (``aggregation.downlink``), both with error
    feedback: the run learns and both directions report their exact bytes."""
    config = make_config(
        aggregation={"transforms": ("topk",), "compression_ratio": 0.1, "downlink": "topk"},
        run={"num_rounds": 4},
    )
    sim = Simulation(config, verbose=False)
    n = sum(x.size for x in jax.tree.leaves(sim.params))
    history = sim.run()
    rounds = read_jsonl(os.path.join(config.run.output_dir, "metrics.jsonl"))[1:]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    k = math.ceil(n / 10)
    for record in rounds:
        delivered = record["participants"]
        assert record["bytes_up_dense"] == 4 * n * delivered
        assert record["bytes_up"] == k * 8 * delivered
        assert record["pipeline/compression/bytes_up"] == record["bytes_up"]
        assert record["bytes_down"] == k * 8 * record["sampled"]
    # About 0.2 of the dense size: a tenth of the values, each with a 4-byte index.
    assert rounds[0]["bytes_up"] / rounds[0]["bytes_up_dense"] == pytest.approx(0.2, abs=1e-3)
    assert rounds[-1]["pipeline/compression/residual_norm_sum"] > 0
