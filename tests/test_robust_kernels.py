"""Tests of the robust aggregators (kernels/robust.py) and the Byzantine attacks
(kernels/attacks.py): closed forms worked by hand or in a few lines of numpy, and the properties
every aggregator must have (permutation invariance, masked NaN ignored, the mean recovered when
the defence is switched off, one compilation across hyperparameter values)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from kernels import (
    alie,
    alie_z,
    centered_clipping,
    coordinate_median,
    flatten_clients,
    gaussian_noise_attack,
    geometric_median,
    ipm,
    krum,
    krum_scores,
    krum_selection,
    norm_bounded_mean,
    scaling,
    sign_flip,
    trimmed_mean,
)

NUM_CLIENTS = 9


def client_stack(rng: np.random.Generator, num_clients: int = NUM_CLIENTS) -> dict:
    return {
        "a": rng.normal(size=(num_clients, 3)).astype(np.float32),
        "b": {"c": rng.normal(size=(num_clients, 2, 2)).astype(np.float32)},
    }


def as_rows(stacked: dict) -> np.ndarray:
    """``[C, P]`` float64, leaves in `jax.tree.leaves` order ("a" then "b"/"c")."""
    leaves = jax.tree.leaves(stacked)
    return np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in leaves], 1)


def from_row(vector: np.ndarray) -> dict:
    return {"a": vector[:3], "b": {"c": vector[3:].reshape(2, 2)}}


def take(stacked: dict, index) -> dict:
    return jax.tree.map(lambda x: np.asarray(x)[index], stacked)


def poison(stacked: dict, rows) -> dict:
    """A copy with NaN and inf in the given rows."""
    out = jax.tree.map(np.array, stacked)
    for i in rows:
        out["a"][i] = [np.nan, np.inf, -np.inf]
        out["b"]["c"][i] = np.nan
    return out


# Every aggregator as f(stacked, mask, weights), with fixed hyperparameters; the weights are used
# by the weighted ones (zero outside the mask), the center of centered clipping is fixed.
CENTER = from_row(np.linspace(-0.5, 0.5, 7).astype(np.float32))
AGGREGATORS = {
    "coordinate_median": lambda s, m, w: coordinate_median(s, m),
    "trimmed_mean": lambda s, m, w: trimmed_mean(s, m, 0.2),
    "krum": lambda s, m, w: krum(s, m, 1),
    "multi_krum": lambda s, m, w: krum(s, m, 1, 3),
    "geometric_median": lambda s, m, w: geometric_median(s, m, num_iters=20),
    "weighted_geometric_median": lambda s, m, w: geometric_median(s, m, w, num_iters=20),
    "norm_bounded_mean": lambda s, m, w: norm_bounded_mean(s, jnp.where(m, w, 0.0), 2.0),
    "centered_clipping": lambda s, m, w: centered_clipping(s, m, CENTER, 1.0, num_iters=3),
}


def mask_and_weights(rng: np.random.Generator, num_counted: int, num_clients: int = NUM_CLIENTS):
    mask = np.zeros(num_clients, bool)
    mask[rng.choice(num_clients, size=num_counted, replace=False)] = True
    return mask, rng.uniform(0.5, 3.0, size=num_clients).astype(np.float32)


# --- flatten_clients --------------------------------------------------------------------------


def test_flatten_clients_round_trips_each_row():
    stacked = client_stack(np.random.default_rng(0), 4)
    stacked["b"]["c"] = stacked["b"]["c"].astype(jnp.bfloat16)
    matrix, unflatten = flatten_clients(stacked)
    assert matrix.shape == (4, 7) and matrix.dtype == jnp.float32
    np.testing.assert_array_equal(matrix, as_rows(stacked).astype(np.float32))
    row = unflatten(matrix[2])
    chex.assert_trees_all_equal(
        row, jax.tree.map(lambda x: jnp.asarray(x[2], jnp.float32), stacked)
    )


# --- trimmed_mean -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, mask, trim, expected",
    [
        ([1.0, 2.0, 3.0, 4.0, 100.0], [1, 1, 1, 1, 1], 0.2, 3.0),  # k = 1: mean(2, 3, 4)
        ([np.nan, 7.0, -2.0, 4.0, 1.0, 100.0], [0, 1, 1, 1, 1, 1], 0.2, 4.0),  # mean(1, 4, 7)
        ([1.0, 2.0, 3.0, 4.0, 100.0], [1, 1, 1, 1, 1], 0.0, 22.0),  # no trimming: the mean
        ([1.0, 2.0, 3.0, 10.0], [1, 1, 1, 1], 0.5, 2.5),  # k capped at 1: the median
        ([1.0, 2.0, np.nan, 3.0], [1, 1, 1, 1], 0.25, 2.5),  # a counted NaN is +inf, trimmed
        ([5.0, np.inf, 7.0, 9.0], [1, 0, 0, 0], 0.4, 5.0),  # one client
        (list(range(10)), [1] * 10, 0.3, 4.5),  # 0.3 * 10 trims 3 at each end: mean(3..6)
    ],
)
def test_trimmed_mean_closed_forms(values, mask, trim, expected):
    stacked = {"w": jnp.asarray(values, jnp.float32)[:, None]}
    out = jax.jit(trimmed_mean)(stacked, jnp.asarray(mask), jnp.float32(trim))
    chex.assert_trees_all_close(out, {"w": jnp.array([expected], jnp.float32)}, rtol=1e-6)


@pytest.mark.parametrize("num_counted, trim", [(9, 0.1), (8, 0.25), (7, 0.3), (5, 0.45)])
def test_trimmed_mean_matches_numpy(num_counted, trim):
    rng = np.random.default_rng(num_counted)
    stacked = client_stack(rng)
    mask, _ = mask_and_weights(rng, num_counted)
    out = jax.jit(trimmed_mean)(poison(stacked, np.flatnonzero(~mask)), mask, jnp.float32(trim))
    k = int(np.floor(trim * num_counted))
    expected = jax.tree.map(
        lambda x: np.sort(x[mask], axis=0)[k : num_counted - k].mean(axis=0), stacked
    )
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)


# --- Krum -------------------------------------------------------------------------------------

# 1-D points 0, 1, 3, 10, 50, 51 (and a masked NaN), f = 1, so n - f - 2 = 3 neighbours:
#   0: 1 + 9 + 100 = 110     1: 1 + 4 + 81 = 86     3: 9 + 4 + 49 = 62     10: 100 + 81 + 49 = 230
#   50: 1 + 1600 + 2209 = 3810     51: 1 + 1681 + 2304 = 3986
LINE = {"w": jnp.array([0.0, 1.0, 3.0, 10.0, 50.0, 51.0, np.nan])[:, None]}
LINE_MASK = jnp.array([1, 1, 1, 1, 1, 1, 0])


def test_krum_scores_selection_and_means_worked_by_hand():
    scores = jax.jit(krum_scores)(LINE, LINE_MASK, jnp.int32(1))
    np.testing.assert_array_equal(scores, [110.0, 86.0, 62.0, 230.0, 3810.0, 3986.0, np.inf])
    selection = jax.jit(krum_selection)(LINE, LINE_MASK, jnp.int32(1), jnp.int32(2))
    np.testing.assert_array_equal(selection, [0, 1, 1, 0, 0, 0, 0])
    assert selection.dtype == jnp.float32
    # Krum: the point 3; multi-Krum: mean(3, 1) and mean(3, 1, 0).
    multi_krum = jax.jit(krum)
    chex.assert_trees_all_equal(multi_krum(LINE, LINE_MASK, 1, 1), {"w": jnp.array([3.0])})
    chex.assert_trees_all_close(multi_krum(LINE, LINE_MASK, 1, 2), {"w": jnp.array([2.0])})
    chex.assert_trees_all_close(multi_krum(LINE, LINE_MASK, 1, 3), {"w": jnp.array([4 / 3])})
    # More selected than counted: all six counted are averaged.
    chex.assert_trees_all_close(multi_krum(LINE, LINE_MASK, 1, 50), {"w": jnp.array([115 / 6])})


def test_krum_picks_the_planted_central_inlier_over_colluding_outliers():
    # Inliers: the origin and the 4 unit points around it; two colluding outliers near (100, 100).
    points = np.array(
        [[1, 0], [0, 1], [0, 0], [-1, 0], [0, -1], [100, 100], [101, 100]], np.float32
    )
    stacked = {"x": points[:, :1], "y": points[:, 1]}  # the distance spans both leaves
    mask = np.ones(7, bool)
    # n = 7, f = 2: 3 neighbours. The origin: 1 + 1 + 1; a unit point: 1 + 2 + 2;
    # (100, 100): 1 + 19801 + 19801; (101, 100): 1 + 20000 + 20002.
    scores = jax.jit(krum_scores)(stacked, mask, jnp.int32(2))
    np.testing.assert_array_equal(scores, [5, 5, 3, 5, 5, 39603, 40003])
    out = jax.jit(krum)(stacked, mask, jnp.int32(2))
    chex.assert_trees_all_equal(out, {"x": jnp.array([0.0]), "y": jnp.array(0.0)})


def numpy_krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    n = len(rows)
    scores = []
    for i in range(n):
        dist = sorted(np.sum((rows[j] - rows[i]) ** 2) for j in range(n) if j != i)
        scores.append(sum(dist[: n - f - 2]))
    return np.array(scores)


@pytest.mark.parametrize("f, m", [(1, 1), (2, 3)])
def test_krum_matches_a_numpy_loop(f, m):
    rng = np.random.default_rng(f)
    stacked = client_stack(rng)
    mask, _ = mask_and_weights(rng, 8)
    poisoned = poison(stacked, np.flatnonzero(~mask))
    rows = as_rows(stacked)[mask]
    expected_scores = numpy_krum_scores(rows, f)
    scores = jax.jit(krum_scores)(poisoned, mask, jnp.int32(f))
    np.testing.assert_allclose(scores[mask], expected_scores, rtol=1e-5)
    assert np.all(np.isinf(scores[~mask]))
    chosen = np.argsort(expected_scores)[:m]
    out = jax.jit(krum)(poisoned, mask, jnp.int32(f), jnp.int32(m))
    chex.assert_trees_all_close(out, from_row(rows[chosen].mean(0)), rtol=1e-5, atol=1e-6)


def test_krum_never_selects_a_counted_non_finite_upload():
    stacked = client_stack(np.random.default_rng(3), 6)
    stacked = poison(stacked, [1])
    stacked["a"][4] = [np.inf, 0.0, 0.0]
    mask = np.ones(6, bool)
    scores = np.asarray(jax.jit(krum_scores)(stacked, mask, 1))
    assert np.isinf(scores[1]) and np.isinf(scores[4]) and np.all(np.isfinite(scores[[0, 2, 3, 5]]))
    selection = jax.jit(krum_selection)(stacked, mask, 1, 4)
    np.testing.assert_array_equal(selection, [1, 0, 1, 1, 0, 1])
    chex.assert_tree_all_finite(jax.jit(krum)(stacked, mask, 1, 4))


# --- geometric_median -------------------------------------------------------------------------


def test_geometric_median_of_a_convex_quadrilateral_is_where_its_diagonals_cross():
    # Diagonals (0,0)-(4,1) and (4,0)-(0,3) cross at (3, 0.75); the mean is (2, 1).
    stacked = {"p": jnp.array([[0.0, 0.0], [4.0, 0.0], [4.0, 1.0], [0.0, 3.0]])}
    out = jax.jit(geometric_median, static_argnames="num_iters")(
        stacked, jnp.ones(4), num_iters=200
    )
    chex.assert_trees_all_close(out, {"p": jnp.array([3.0, 0.75])}, atol=1e-4)


def test_geometric_median_of_symmetric_points_and_its_robustness_to_a_far_outlier():
    center = np.array([2.0, -1.0])
    angles = np.arange(6) * np.pi / 3
    hexagon = center + np.stack([np.cos(angles), np.sin(angles)], 1)
    points = np.concatenate([hexagon, [[1e4, 1e4]]]).astype(np.float32)
    stacked = {"p": points}
    median = jax.jit(geometric_median, static_argnames="num_iters")
    symmetric = median(stacked, np.arange(7) < 6, num_iters=50)
    chex.assert_trees_all_close(symmetric, {"p": center.astype(np.float32)}, atol=1e-5)
    robust = median(stacked, np.ones(7), num_iters=50)
    # Balance of forces: 6 unit pulls on a unit circle against one unit pull moves the median
    # about 2 r / 6 = 1/3 towards the outlier; the mean moves by about 2000.
    assert np.linalg.norm(robust["p"] - center) < 0.4
    assert np.linalg.norm(points.mean(0) - center) > 1000


def test_geometric_median_with_a_weighted_majority_is_that_point():
    stacked = {"p": jnp.array([[1.0, 1.0], [5.0, 0.0], [0.0, 7.0], [-3.0, -3.0]])}
    out = jax.jit(geometric_median)(stacked, np.ones(4), np.array([5.0, 1.0, 1.0, 1.0]))
    chex.assert_trees_all_close(out, {"p": jnp.array([1.0, 1.0])}, atol=1e-4)


# --- norm_bounded_mean ------------------------------------------------------------------------


def test_norm_bounded_mean_matches_numpy():
    rng = np.random.default_rng(5)
    stacked = client_stack(rng)
    weights = rng.uniform(0.5, 3.0, NUM_CLIENTS)
    weights[[2, 6]] = 0.0
    rows = as_rows(stacked)
    norms = np.linalg.norm(rows, axis=1)
    bound = float(np.median(norms))
    clipped = rows * np.minimum(1.0, bound / norms)[:, None]
    expected = from_row(weights @ clipped / weights.sum())
    out = jax.jit(norm_bounded_mean)(poison(stacked, [2, 6]), weights, jnp.float32(bound))
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    assert np.sum(norms > bound) >= 3  # the bound did clip some clients


# --- centered_clipping ------------------------------------------------------------------------


@pytest.mark.parametrize("num_iters", [1, 3])
def test_centered_clipping_matches_a_numpy_loop(num_iters):
    rng = np.random.default_rng(num_iters)
    mask, _ = mask_and_weights(rng, 7)
    # Clients at distances from about 0.5 to 8 from the center, so some are clipped and some not.
    rows = rng.normal(size=(NUM_CLIENTS, 7)) * np.linspace(0.2, 3.0, NUM_CLIENTS)[:, None]
    center = rng.normal(size=7)
    radius = 2.0
    v = center.copy()
    for _ in range(num_iters):
        diff = rows[mask] - v
        scale = np.minimum(1.0, radius / np.linalg.norm(diff, axis=1))
        v = v + (diff * scale[:, None]).mean(0)
    stacked = {"a": rows[:, :3], "b": {"c": rows[:, 3:].reshape(-1, 2, 2)}}
    stacked = poison(jax.tree.map(lambda x: x.astype(np.float32), stacked), np.flatnonzero(~mask))
    out = jax.jit(centered_clipping, static_argnames="num_iters")(
        stacked,
        mask,
        from_row(center.astype(np.float32)),
        jnp.float32(radius),
        num_iters=num_iters,
    )
    chex.assert_trees_all_close(out, from_row(v), rtol=1e-5, atol=1e-6)


# --- properties of every aggregator -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregators_are_invariant_to_permuting_clients(name):
    rng = np.random.default_rng(7)
    stacked = client_stack(rng)
    mask, weights = mask_and_weights(rng, 7)
    stacked = poison(stacked, np.flatnonzero(~mask))
    perm = rng.permutation(NUM_CLIENTS)
    aggregate = jax.jit(AGGREGATORS[name])
    out = aggregate(stacked, mask, weights)
    permuted = aggregate(take(stacked, perm), mask[perm], weights[perm])
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(permuted, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_masked_rows_holding_nan_are_ignored_and_no_client_gives_zeros(name):
    rng = np.random.default_rng(8)
    stacked = client_stack(rng)
    mask, weights = mask_and_weights(rng, 6)
    aggregate = jax.jit(AGGREGATORS[name])
    out = aggregate(poison(stacked, np.flatnonzero(~mask)), mask, weights)
    # The same as the aggregate of the counted clients alone.
    alone = aggregate(take(stacked, mask), np.ones(6, bool), weights[mask])
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, alone, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_dtypes(out, jax.tree.map(lambda x: x[0], stacked))

    nothing = aggregate(poison(stacked, range(NUM_CLIENTS)), np.zeros(NUM_CLIENTS, bool), weights)
    chex.assert_trees_all_equal(nothing, jax.tree.map(lambda x: np.zeros_like(x[0]), stacked))


def test_with_the_defence_switched_off_every_aggregator_is_the_mean():
    rng = np.random.default_rng(9)
    stacked = client_stack(rng)
    mask, weights = mask_and_weights(rng, 7)
    poisoned = poison(stacked, np.flatnonzero(~mask))
    rows = as_rows(stacked)[mask]
    mean = from_row(rows.mean(0))
    w = weights[mask].astype(np.float64)
    weighted = from_row(w @ rows / w.sum())
    outs = {
        "trim 0": jax.jit(trimmed_mean)(poisoned, mask, 0.0),
        "multi-Krum, f = 0, m = n": jax.jit(krum)(poisoned, mask, 0, 7),
        "huge bound": jax.jit(norm_bounded_mean)(poisoned, np.where(mask, weights, 0.0), 1e6),
        "huge radius": jax.jit(centered_clipping)(poisoned, mask, CENTER, 1e6),
        "huge radius, 3 iterations": jax.jit(centered_clipping, static_argnums=4)(
            poisoned, mask, CENTER, 1e6, 3
        ),
    }
    for what, out in outs.items():
        expected = weighted if what == "huge bound" else mean
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6, custom_message=what)


# Each kernel with one hyperparameter passed as an argument, and two values for it.
TRACED = {
    "trimmed_mean": (lambda s, m, h: trimmed_mean(s, m, h), (0.1, 0.3)),
    "krum_scores num_byzantine": (lambda s, m, h: krum_scores(s, m, h), (1, 3)),
    "krum num_selected": (lambda s, m, h: krum(s, m, 1, h), (1, 4)),
    "geometric_median eps": (lambda s, m, h: geometric_median(s, m, eps=h), (1e-6, 10.0)),
    "norm_bounded_mean": (lambda s, m, h: norm_bounded_mean(s, m * 1.0, h), (0.5, 2.0)),
    "centered_clipping": (lambda s, m, h: centered_clipping(s, m, CENTER, h), (0.5, 2.0)),
    "sign_flip": (lambda s, m, h: sign_flip(s, m, h), (1.0, 3.0)),
    "scaling": (lambda s, m, h: scaling(s, m, h), (2.0, 10.0)),
    "gaussian_noise_attack": (
        lambda s, m, h: gaussian_noise_attack(s, m, jax.random.key(0), h),
        (0.1, 5.0),
    ),
    "alie": (lambda s, m, h: alie(s, m, ~m, h), (0.5, 1.5)),
    "ipm": (lambda s, m, h: ipm(s, m, ~m, h), (0.1, 100.0)),
}


@pytest.mark.parametrize("name", sorted(TRACED))
def test_one_compilation_across_hyperparameter_values_and_client_counts(name):
    fn, values = TRACED[name]
    rng = np.random.default_rng(10)
    stacked = client_stack(rng)
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)

    jitted = jax.jit(traced)
    outs = []
    for num_counted, value in zip((6, 8), values, strict=True):
        mask, _ = mask_and_weights(rng, num_counted)
        outs.append(jitted(stacked, jnp.asarray(mask), jnp.asarray(value)))
    assert len(traces) == 1
    # The hyperparameter was not constant-folded away: the two values give different results.
    first, second = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(o)]) for o in outs)
    assert not np.allclose(first, second)


# --- attacks ----------------------------------------------------------------------------------


def attack_stack(rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
    """A stack with a bfloat16 leaf, NaN in the padding rows 7 and 8, 2 malicious clients."""
    stacked = client_stack(rng)
    stacked["b"]["c"] = jnp.asarray(stacked["b"]["c"], jnp.bfloat16)
    stacked = poison(stacked, [7, 8])
    malicious = np.zeros(NUM_CLIENTS, bool)
    malicious[[1, 4]] = True
    benign = np.zeros(NUM_CLIENTS, bool)
    benign[[0, 2, 3, 5, 6]] = True
    return stacked, malicious, benign


def assert_other_rows_bit_identical(out: dict, stacked: dict, malicious: np.ndarray):
    chex.assert_trees_all_equal_dtypes(out, stacked)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
        x, y = np.asarray(x)[~malicious], np.asarray(y)[~malicious]
        assert x.tobytes() == y.tobytes()


def numpy_benign_moments(stacked: dict, benign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = as_rows(stacked)[benign]
    return rows.mean(0), rows.std(0)  # population std (ddof = 0)


@pytest.mark.parametrize(
    "attack, formula",
    [
        pytest.param(
            lambda s, m, b: sign_flip(s, m, 2.5), lambda x, mu, sd: -2.5 * x, id="sign_flip"
        ),
        pytest.param(lambda s, m, b: scaling(s, m, 10.0), lambda x, mu, sd: 10.0 * x, id="scaling"),
        pytest.param(lambda s, m, b: ipm(s, m, b, 0.5), lambda x, mu, sd: -0.5 * mu, id="ipm"),
        pytest.param(
            lambda s, m, b: alie(s, m, b, 1.5), lambda x, mu, sd: mu - 1.5 * sd, id="alie"
        ),
        # n = 7 counted, f = 2: s = floor(4.5) - 2 = 2, z = Phi^-1(5 / 7).
        pytest.param(
            lambda s, m, b: alie(s, m, b),
            lambda x, mu, sd: mu - norm.ppf(5 / 7) * sd,
            id="alie_default_z",
        ),
    ],
)
def test_attacks_match_numpy_and_leave_other_rows_bit_identical(attack, formula):
    stacked, malicious, benign = attack_stack(np.random.default_rng(11))
    out = jax.jit(attack)(stacked, malicious, benign)
    assert_other_rows_bit_identical(out, stacked, malicious)
    mu, sd = numpy_benign_moments(stacked, benign)
    got = as_rows(out)[malicious]
    expected = np.broadcast_to(formula(as_rows(stacked)[malicious], mu, sd), got.shape)
    # The bfloat16 leaf (the last 4 coordinates) holds the attack rounded to bfloat16.
    np.testing.assert_allclose(got[:, :3], expected[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 3:], expected[:, 3:], rtol=1e-2, atol=1e-2)


def test_gaussian_noise_attack_draws_fresh_noise_per_leaf_and_row():
    stacked = {"u": np.zeros((4, 3000), np.float32), "v": np.ones((4, 3000), np.float32)}
    malicious = np.array([0, 1, 1, 0], bool)
    key = jax.random.key(3)
    attack = jax.jit(gaussian_noise_attack)
    out = attack(stacked, malicious, key, 2.0)
    assert_other_rows_bit_identical(out, stacked, malicious)
    noise = np.concatenate([np.asarray(out["u"])[malicious], np.asarray(out["v"])[malicious]])
    np.testing.assert_allclose(noise.mean(), 0.0, atol=0.05)
    np.testing.assert_allclose(noise.std(), 2.0, rtol=0.03)
    # No two rows or leaves share noise, and the key itself is never drawn from.
    flat = noise.reshape(4, 3000)
    assert np.all(np.abs(np.corrcoef(flat) - np.eye(4)) < 0.1)
    assert not np.allclose(flat[0], 2.0 * np.asarray(jax.random.normal(key, (4, 3000)))[1])
    again = attack(stacked, malicious, key, 2.0)
    chex.assert_trees_all_equal(again, out)
    other = attack(stacked, malicious, jax.random.key(4), 2.0)
    assert not np.allclose(other["u"], out["u"])


@pytest.mark.parametrize("n, f", [(10, 2), (20, 4), (50, 12), (100, 20), (7, 3), (25, 11)])
def test_alie_z_matches_scipy(n, f):
    s = np.floor(n / 2 + 1) - f
    expected = max(norm.ppf((n - s) / n), 0.0)
    np.testing.assert_allclose(jax.jit(alie_z)(n, f), expected, rtol=1e-5, atol=1e-6)


def test_alie_z_is_clamped_to_a_finite_non_negative_value():
    z = jax.jit(alie_z)
    assert float(z(10, 0)) == 0.0  # Phi^-1(0.4) < 0
    assert float(z(0, 0)) == 0.0
    majority = float(z(10, 6))  # s = 0: Phi^-1(1) would be inf
    assert np.isfinite(majority) and 5.0 < majority < 5.5
