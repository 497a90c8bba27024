"""Tests of the kernels package: streamed weighted sums (kernels/aggregation.py), global-norm
clipping (kernels/clipping.py) and the coordinate-wise median (kernels/robust.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import (
    WeightedSum,
    clip_by_global_norm,
    coordinate_median,
    global_norm,
    weighted_mean,
    weighted_sum_finalize,
    weighted_sum_init,
    weighted_sum_update,
)

NUM_CLIENTS = 12


def client_stack(rng: np.random.Generator, num_clients: int = NUM_CLIENTS) -> dict:
    return {
        "a": rng.normal(size=(num_clients, 3)).astype(np.float32),
        "b": {"c": rng.normal(size=(num_clients, 2, 2)).astype(np.float32)},
    }


def random_chunking(rng: np.random.Generator, n: int) -> list[int]:
    """Cut points of a random split of ``range(n)`` into 1 to n non-empty chunks."""
    num_cuts = rng.integers(0, n)
    return sorted(rng.choice(np.arange(1, n), size=num_cuts, replace=False).tolist())


# --- aggregation.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_streamed_weighted_sum_over_any_chunking_equals_the_one_shot_mean(seed):
    rng = np.random.default_rng(seed)
    stacked = client_stack(rng)
    weights = rng.integers(0, 5, size=NUM_CLIENTS).astype(np.float32)
    weights[seed % NUM_CLIENTS] = 3.0  # at least one client counts
    cuts = random_chunking(rng, NUM_CLIENTS)

    update = jax.jit(weighted_sum_update)
    like = jax.tree.map(lambda x: x[0], stacked)
    sums = weighted_sum_init(like)
    for chunk in np.split(np.arange(NUM_CLIENTS), cuts):
        sums = update(sums, jax.tree.map(lambda x, c=chunk: x[c], stacked), weights[chunk])
    streamed = jax.jit(weighted_sum_finalize)(sums)

    one_shot = jax.jit(weighted_mean)(stacked, weights)
    expected = jax.tree.map(
        lambda x: np.tensordot(weights.astype(np.float64), x, axes=1) / weights.sum(), stacked
    )
    chex.assert_trees_all_close(streamed, one_shot, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one_shot, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums.weight, weights.sum(), rtol=0)
    chex.assert_trees_all_equal_dtypes(one_shot, jax.tree.map(lambda x: x[0], stacked))


def test_weighted_mean_closed_form():
    stacked = {"w": jnp.array([[1.0, 2.0], [10.0, 20.0], [3.0, -4.0]])}
    out = jax.jit(weighted_mean)(stacked, jnp.array([1.0, 0.0, 3.0]))
    chex.assert_trees_all_close(out, {"w": jnp.array([2.5, -2.5])})


def test_a_zero_weight_client_excludes_its_nan_and_inf():
    rng = np.random.default_rng(0)
    stacked = client_stack(rng, 4)
    weights = np.array([2.0, 0.0, 1.0, 0.0], np.float32)
    poisoned = jax.tree.map(np.copy, stacked)
    poisoned["a"][1] = [np.nan, np.inf, -np.inf]
    poisoned["b"]["c"][3] = np.nan
    clean = jax.jit(weighted_mean)(stacked, weights)
    out = jax.jit(weighted_mean)(poisoned, weights)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal(out, clean)

    # The same through the streamed path, a poisoned client alone in its chunk.
    sums = weighted_sum_init(jax.tree.map(lambda x: x[0], stacked))
    for chunk in ([0], [1], [2, 3]):
        sums = jax.jit(weighted_sum_update)(
            sums, jax.tree.map(lambda x, c=chunk: x[c], poisoned), weights[chunk]
        )
    chex.assert_trees_all_close(weighted_sum_finalize(sums), clean, rtol=1e-6)


def test_finalize_without_weight_gives_zeros_and_takes_dtypes_of_like():
    like = {"x": jnp.ones(3, jnp.bfloat16), "y": jnp.ones((), jnp.float32)}
    empty = weighted_sum_init(like)
    assert isinstance(empty, WeightedSum)
    chex.assert_trees_all_equal_dtypes(empty.total, {"x": jnp.zeros(3), "y": jnp.zeros(())})
    out = jax.jit(weighted_sum_finalize)(empty)
    chex.assert_trees_all_equal(out, {"x": jnp.zeros(3), "y": jnp.zeros(())})

    stacked = {"x": jnp.full((2, 3), 1.5, jnp.bfloat16), "y": jnp.array([1.0, 3.0])}
    sums = weighted_sum_update(empty, stacked, jnp.array([1.0, 1.0]))
    cast = jax.jit(weighted_sum_finalize)(sums, like)
    chex.assert_trees_all_equal_dtypes(cast, like)
    chex.assert_trees_all_close(cast, {"x": jnp.full(3, 1.5, jnp.bfloat16), "y": jnp.array(2.0)})


# --- clipping.py ------------------------------------------------------------------------------


def test_clip_by_global_norm_closed_form_and_pre_clip_norm():
    tree = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[0.0], [4.0]])}}  # norm 5
    clipped, norm = jax.jit(clip_by_global_norm)(tree, jnp.float32(2.0))
    np.testing.assert_allclose(norm, 5.0, rtol=1e-7)
    chex.assert_trees_all_close(
        clipped, {"a": jnp.array([1.2, 0.0]), "b": {"c": jnp.array([[0.0], [1.6]])}}, rtol=1e-6
    )
    np.testing.assert_allclose(global_norm(clipped), 2.0, rtol=1e-6)
    assert float(global_norm({})) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_a_tree_inside_the_norm_is_unchanged_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    tree = {
        "f32": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=5), jnp.bfloat16),
    }
    norm = float(global_norm(tree))
    for max_norm in (norm * 1.5, norm * 100.0):
        clipped, pre = jax.jit(clip_by_global_norm)(tree, jnp.float32(max_norm))
        chex.assert_trees_all_equal(clipped, tree)
        chex.assert_trees_all_equal_dtypes(clipped, tree)
        np.testing.assert_allclose(pre, norm, rtol=1e-6)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    clipped, pre = jax.jit(clip_by_global_norm)(zeros, jnp.float32(1.0))
    chex.assert_trees_all_equal(clipped, zeros)
    assert float(pre) == 0.0


def test_clip_under_vmap_clips_each_client_to_its_own_norm():
    rng = np.random.default_rng(1)
    stacked = client_stack(rng, 5)
    # Client i scaled by i + 1, so some clients are inside the norm and some are clipped.
    factor = np.arange(1, 6, dtype=np.float32)
    stacked = jax.tree.map(lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)), stacked)
    max_norm = jnp.float32(3.0)
    clipped, norms = jax.jit(jax.vmap(clip_by_global_norm, in_axes=(0, None)))(stacked, max_norm)
    assert float(norms.min()) < 3.0 < float(norms.max())
    for i in range(5):
        one = jax.tree.map(lambda x, i=i: x[i], stacked)
        expected_norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(one)))
        np.testing.assert_allclose(norms[i], expected_norm, rtol=1e-5)
        scale = min(1.0, 3.0 / expected_norm)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], clipped),
            jax.tree.map(lambda x, s=scale: x * s, one),
            rtol=1e-5,
        )


# --- robust.py --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, mask, expected",
    [
        ([1.0, 5.0, 3.0, 100.0], [1, 1, 1, 0], 3.0),  # odd count: the middle one
        ([1.0, 5.0, 3.0, 10.0], [1, 1, 1, 1], 4.0),  # even count: mean of the two middle ones
        ([np.nan, 7.0, -2.0, 4.0], [0, 1, 1, 0], 2.5),  # a masked NaN is ignored
        ([2.0, 9.0, 4.0, 1.0], [0, 0, 0, 1], 1.0),  # one client
    ],
)
def test_coordinate_median_closed_forms(values, mask, expected):
    stacked = {"w": jnp.asarray(values, jnp.float32)[:, None]}
    out = jax.jit(coordinate_median)(stacked, jnp.asarray(mask))
    chex.assert_trees_all_equal(out, {"w": jnp.array([expected], jnp.float32)})


@pytest.mark.parametrize("num_counted", [1, 4, 7, 8])
def test_coordinate_median_matches_numpy_for_odd_and_even_counts(num_counted):
    rng = np.random.default_rng(num_counted)
    stacked = client_stack(rng, 9)
    mask = np.zeros(9, bool)
    mask[rng.choice(9, size=num_counted, replace=False)] = True
    out = jax.jit(coordinate_median)(stacked, jnp.asarray(mask, jnp.float32))
    expected = jax.tree.map(lambda x: np.median(x[mask], axis=0), stacked)
    chex.assert_trees_all_close(out, expected, rtol=1e-6)
    chex.assert_trees_all_equal_dtypes(out, jax.tree.map(lambda x: x[0], stacked))
