"""Tests for fedjax_llm.data.partitioners."""

import hashlib
import json
import time
import warnings

import numpy as np
import pytest

from fedjax_llm.data import (
    DIRICHLET_OVER,
    PARTITIONERS,
    dirichlet_partition,
    format_partition_stats,
    natural_clients,
    partition,
    partition_convention,
    partition_stats,
)

# Keyword arguments that make each partitioner's defining property visible.
KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "pathological": {"classes_per_client": 2},
    "quantity_skew": {"sigma": 1.0},
}


def _labels(n, num_labels, seed, skew=False):
    rng = np.random.default_rng(seed)
    p = None
    if skew:  # imbalanced label frequencies
        p = np.arange(1, num_labels + 1, dtype=float)
        p /= p.sum()
    return rng.choice(num_labels, size=n, p=p)


def _client_label_counts(assignment, labels, num_labels):
    return np.stack([np.bincount(labels[a], minlength=num_labels) for a in assignment])


def test_registry():
    assert set(PARTITIONERS) == set(KWARGS) | {"natural"}


@pytest.mark.parametrize("name", sorted(KWARGS))
@pytest.mark.parametrize(
    "n, num_clients, num_labels, min_examples, skew",
    [
        (50, 5, 3, 2, False),
        (200, 37, 7, 2, True),
        (1000, 100, 7, 3, False),
        (64, 32, 4, 2, True),  # exactly num_clients * min_examples examples
        (500, 1, 5, 2, False),
    ],
)
def test_is_a_partition_with_min_sizes(name, n, num_clients, num_labels, min_examples, skew):
    for seed in range(3):
        labels = _labels(n, num_labels, seed, skew)
        kwargs = dict(KWARGS[name], min_examples=min_examples)
        if name == "pathological":
            kwargs["classes_per_client"] = min(2, num_labels)
            if num_clients * 2 < num_labels:
                kwargs["classes_per_client"] = num_labels
        assignment = partition(name, labels, num_clients, seed, **kwargs)
        assert len(assignment) == num_clients
        idx = np.concatenate(assignment)
        np.testing.assert_array_equal(np.sort(idx), np.arange(n))  # every index exactly once
        assert min(a.size for a in assignment) >= min_examples
        for a in assignment:
            assert np.all(np.diff(a) > 0)  # sorted within a client


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_deterministic_by_seed(name):
    labels = _labels(500, 5, 0)
    a = partition(name, labels, 20, 7, **KWARGS[name])
    b = partition(name, labels, 20, 7, **KWARGS[name])
    c = partition(name, labels, 20, 8, **KWARGS[name])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_equal_sizes():
    sizes = [a.size for a in partition("iid", _labels(1003, 5, 0), 10, 0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_lowers_entropy():
    labels = _labels(5000, 7, 0)
    names = [str(i) for i in range(7)]
    iid = partition_stats(partition("iid", labels, 100, 0), labels, names)
    for alpha, expected_max in [(0.1, 0.5), (1.0, 1.4)]:
        skew = partition_stats(partition("dirichlet", labels, 100, 0, alpha=alpha), labels, names)
        assert skew["client_label_entropy_mean"] < expected_max < iid["client_label_entropy_mean"]
    near_iid = partition_stats(partition("dirichlet", labels, 100, 0, alpha=1e4), labels, names)
    assert near_iid["client_label_entropy_mean"] > 0.9 * iid["client_label_entropy_mean"]


def test_dirichlet_equal_sizes():
    labels = _labels(1000, 7, 1, skew=True)
    sizes = [a.size for a in partition("dirichlet", labels, 30, 0, alpha=0.05)]
    assert max(sizes) - min(sizes) <= 1


def _digest(assignment):
    return hashlib.sha256(
        b"".join(np.asarray(a, np.int64).tobytes() + b"|" for a in assignment)
    ).hexdigest()


def test_dirichlet_default_convention_is_unchanged():
    """Outputs recorded before `over` existed: the default stays the same bit for bit."""
    small = [
        [0, 6, 12, 15, 17, 18],
        [3, 5, 8, 9, 20, 23],
        [2, 11, 13, 14, 21, 22],
        [1, 4, 7, 10, 16, 19],
    ]
    labels = np.arange(24) % 3
    for kwargs in ({}, {"over": "labels"}):
        got = dirichlet_partition(labels, 4, 5, alpha=0.5, **kwargs)
        assert [a.tolist() for a in got] == small
    labels = np.random.default_rng(0).integers(0, 6, 600)
    for got in (
        dirichlet_partition(labels, 12, 11, alpha=0.3),
        partition("dirichlet", labels, 12, 11, alpha=0.3, over="labels"),
    ):
        assert _digest(got) == "93f12379d5fe35cefa3fe83df7787c6f8fdef2624dc06b1cd7d304fbf3b9ca32"


@pytest.mark.parametrize(
    "n, num_clients, num_labels, alpha, min_examples, skew",
    [
        (50, 5, 3, 0.5, 2, False),
        (600, 30, 7, 0.5, 2, True),
        (1000, 20, 10, 0.1, 3, False),
        (500, 1, 5, 0.5, 2, False),
        (2000, 10, 4, 1.0, 130, True),  # min_examples above what one draw usually gives
    ],
)
def test_dirichlet_over_clients_assigns_every_example(
    n, num_clients, num_labels, alpha, min_examples, skew
):
    for seed in range(3):
        labels = _labels(n, num_labels, seed, skew)
        assignment = partition(
            "dirichlet",
            labels,
            num_clients,
            seed,
            alpha=alpha,
            over="clients",
            min_examples=min_examples,
        )
        assert len(assignment) == num_clients
        idx = np.concatenate(assignment)
        np.testing.assert_array_equal(np.sort(idx), np.arange(n))  # every example, once
        np.testing.assert_array_equal(  # so every label's examples are all assigned
            _client_label_counts(assignment, labels, num_labels).sum(axis=0),
            np.bincount(labels, minlength=num_labels),
        )
        assert min(a.size for a in assignment) >= min_examples
        for a in assignment:
            assert np.all(np.diff(a) > 0)


def test_dirichlet_over_clients_has_unequal_sizes():
    labels = _labels(5000, 7, 0)
    sizes = np.array(
        [a.size for a in partition("dirichlet", labels, 50, 0, alpha=0.5, over="clients")]
    )
    assert sizes.max() > 3 * sizes.min() and sizes.std() > 0.3 * sizes.mean()
    same = [a.size for a in partition("dirichlet", labels, 50, 0, alpha=0.5, over="labels")]
    assert max(same) - min(same) <= 1


@pytest.mark.parametrize("over", DIRICHLET_OVER)
def test_dirichlet_heterogeneity_grows_as_alpha_shrinks(over):
    labels = _labels(6000, 7, 2)
    names = [str(i) for i in range(7)]
    alphas = [1000.0, 10.0, 1.0, 0.3, 0.1]
    entropy = []
    for alpha in alphas:
        per_seed = [
            partition_stats(
                partition("dirichlet", labels, 20, seed, alpha=alpha, over=over), labels, names
            )["client_label_entropy_mean"]
            for seed in range(3)
        ]
        entropy.append(np.mean(per_seed))
    assert np.all(np.diff(entropy) < 0), dict(zip(alphas, entropy, strict=True))
    assert entropy[0] > 0.95 * np.log(7)  # nearly IID
    assert entropy[-1] < 0.5 * np.log(7)  # a few labels per client


def test_dirichlet_over_clients_deterministic_by_seed():
    labels = _labels(800, 5, 0)
    a, b, c = (
        partition("dirichlet", labels, 16, seed, alpha=0.3, over="clients") for seed in (7, 7, 8)
    )
    assert _digest(a) == _digest(b) != _digest(c)
    assert _digest(a) != _digest(partition("dirichlet", labels, 16, 7, alpha=0.3))


def test_dirichlet_over_clients_impossible_min_examples_is_a_clear_error():
    # 20 clients of 3 labels at alpha 0.01: each label lands on about one client.
    with pytest.raises(ValueError, match=r"over clients.*raise alpha.*over='labels'"):
        partition("dirichlet", _labels(200, 3, 0), 20, 0, alpha=0.01, over="clients")


def test_dirichlet_over_must_be_a_known_convention():
    with pytest.raises(ValueError, match=r"over must be one of \['labels', 'clients'\]"):
        partition("dirichlet", _labels(100, 7, 0), 10, 0, over="users")


def test_stats_name_the_dirichlet_convention():
    labels = _labels(500, 5, 0)
    names = [str(i) for i in range(5)]
    for kwargs, want in [
        ({"alpha": 0.5}, "over labels"),
        ({"alpha": 0.5, "over": "labels"}, "over labels"),
        ({"alpha": 0.5, "over": "clients"}, "over clients"),
    ]:
        assignment = partition("dirichlet", labels, 10, 0, **kwargs)
        stats = partition_stats(
            assignment, labels, names, partitioner="dirichlet", partitioner_kwargs=kwargs
        )
        json.dumps(stats)
        assert want in stats["convention"] and stats["partitioner_kwargs"] == kwargs
        assert f"convention: dirichlet {want}" in format_partition_stats(stats)
        # Stats made without the keyword (as build_task_data does) are named when formatted.
        plain = partition_stats(assignment, labels, names)
        assert "convention" not in plain
        plain.update(partitioner="dirichlet", partitioner_kwargs=kwargs)
        assert f"convention: dirichlet {want}" in format_partition_stats(plain)
    assert "Hsu" in partition_convention("dirichlet") and "FedMA" in partition_convention(
        "dirichlet", {"over": "clients"}
    )


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_pathological_exactly_k_labels(k):
    for seed, skew in [(0, False), (1, True)]:
        labels = _labels(2000, 7, seed, skew)
        assignment = partition("pathological", labels, 50, seed, classes_per_client=k)
        counts = _client_label_counts(assignment, labels, 7)
        np.testing.assert_array_equal((counts > 0).sum(axis=1), k)


def test_quantity_skew_sizes():
    labels = _labels(10000, 5, 0)
    sizes = np.array([a.size for a in partition("quantity_skew", labels, 100, 0, sigma=1.5)])
    assert sizes.max() > 5 * np.median(sizes)
    equal = [a.size for a in partition("quantity_skew", labels, 100, 0, sigma=0.0)]
    assert max(equal) - min(equal) <= 1


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_speed_100k_examples_10k_clients(name):
    labels = _labels(100_000, 7, 0)
    partition(name, labels[:1000], 100, 0, **KWARGS[name])  # warm up imports and caches
    start = time.perf_counter()
    assignment = partition(name, labels, 10_000, 0, **KWARGS[name])
    elapsed = time.perf_counter() - start
    assert len(assignment) == 10_000
    assert elapsed < 2.0, f"{name} took {elapsed:.2f} s"


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("dirichlet", {"alpha": 0.0}, "alpha"),
        ("dirichlet", {"alpha": -1.0}, "alpha"),
        ("dirichlet", {"alpha": float("nan")}, "alpha"),
        ("pathological", {"classes_per_client": 8}, "classes_per_client"),
        ("pathological", {"classes_per_client": 0}, "classes_per_client"),
        ("quantity_skew", {"sigma": -0.5}, "sigma"),
        ("iid", {"min_examples": 0}, "min_examples"),
        ("iid", {"alpha": 1.0}, "alpha.*accepts"),
        ("nope", {}, "partitioner.*valid names.*'dirichlet'"),
    ],
)
def test_bad_kwargs(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition(name, _labels(100, 7, 0), 10, 0, **kwargs)


def test_too_many_clients():
    with pytest.raises(ValueError, match="num_clients"):
        partition("iid", _labels(100, 7, 0), 51, 0)  # 51 * min_examples(2) > 100
    with pytest.raises(ValueError, match="num_clients"):
        partition("dirichlet", _labels(100, 7, 0), 0, 0)


def test_pathological_too_few_shards():
    # 3 clients x 2 labels cannot cover 7 labels without leaving examples unassigned.
    with pytest.raises(ValueError, match="classes_per_client"):
        partition("pathological", _labels(100, 7, 0), 3, 0, classes_per_client=2)


def test_pathological_refuses_undersized_clients():
    # Label 0 has one example, so the client holding its only shard would get 1 < 2 examples.
    labels = np.array([0] + [1] * 19)
    with pytest.raises(ValueError, match="min_examples"):
        partition("pathological", labels, 10, 0, classes_per_client=1)


def test_bad_seed_and_labels():
    with pytest.raises(ValueError, match="seed"):
        partition("iid", _labels(100, 7, 0), 10, -1)
    with pytest.raises(ValueError, match="labels"):
        partition("iid", np.zeros((10, 2), dtype=int), 2, 0)


def test_partition_stats_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 0])
    assignment = [np.array([0, 1]), np.array([2, 4]), np.array([3, 5])]
    stats = partition_stats(assignment, labels, ["a", "b", "c"])
    json.dumps(stats)  # JSON-serializable
    assert stats["num_clients"] == 3 and stats["num_examples"] == 6
    assert stats["examples_per_client"] == {"min": 2, "median": 2.0, "mean": 2.0, "max": 2}
    assert stats["labels_per_client_mean"] == pytest.approx(5 / 3)
    assert stats["client_label_entropy_mean"] == pytest.approx(2 * np.log(2) / 3)
    assert stats["global_label_entropy"] == pytest.approx(
        -(1 / 2 * np.log(1 / 2) + 1 / 3 * np.log(1 / 3) + 1 / 6 * np.log(1 / 6))
    )
    assert stats["global_label_histogram"] == {"a": 3, "b": 2, "c": 1}
    text = format_partition_stats(stats)
    assert "3 clients" in text and "a 3, b 2, c 1" in text and len(text.splitlines()) >= 4


# ----------------------------------------------------------------------------------------------
# natural: one client per distinct value of a column.
# ----------------------------------------------------------------------------------------------


def test_natural_one_client_per_value():
    groups = np.array([5, 2, 5, 9, 2, 2, 9, 5])
    assignment = partition("natural", groups, None, 0)
    # Clients in ascending group order, indices ascending within a client.
    assert [a.tolist() for a in assignment] == [[1, 4, 5], [0, 2, 7], [3, 6]]
    result = natural_clients(groups)
    np.testing.assert_array_equal(result.groups, [2, 5, 9])
    assert result.dropped_groups.size == 0 and result.num_dropped_examples == 0


def test_natural_drops_small_groups_and_reports_them():
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
    result = natural_clients(groups, min_examples=2)
    np.testing.assert_array_equal(result.groups, [0, 2, 4])
    np.testing.assert_array_equal(result.dropped_groups, [1, 3])
    np.testing.assert_array_equal(result.dropped_counts, [1, 1])
    assert result.num_dropped_examples == 2
    assert [a.tolist() for a in result.assignment] == [[0, 1], [3, 4, 5], [7, 8]]
    with pytest.warns(UserWarning, match=r"left out 2 groups.*2 examples.*\[1, 3\]"):
        assignment = partition("natural", groups, None, 0)
    assert len(assignment) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        partition("natural", groups, None, 0, min_examples=1)


def test_natural_nothing_left_is_an_error():
    with pytest.raises(ValueError, match=r"none of the 3 groups has min_examples=2.*largest has 1"):
        natural_clients(np.array([0, 1, 2]))


def test_natural_subset_deterministic_by_seed():
    groups = np.repeat(np.arange(50), 3)
    a = natural_clients(groups, num_clients=10, seed=3)
    b = natural_clients(groups, num_clients=10, seed=3)
    c = natural_clients(groups, num_clients=10, seed=4)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert not np.array_equal(a.groups, c.groups)
    assert len(a.assignment) == 10 and a.unselected_groups.size == 40
    assert np.all(np.diff(a.groups) > 0)
    for g, idx in zip(a.groups, a.assignment, strict=True):
        np.testing.assert_array_equal(groups[idx], g)
    with pytest.raises(ValueError, match="num_clients=51 but only 50 groups"):
        natural_clients(groups, num_clients=51)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": np.array([0.5, 1.5])}, "integer"),
        ({"groups": np.zeros((2, 2), int)}, "1-D"),
        ({"num_clients": 0}, "num_clients"),
        ({"min_examples": 0}, "min_examples"),
        ({"seed": -1}, "seed"),
    ],
)
def test_natural_bad_arguments(kwargs, match):
    kwargs = {"groups": np.array([0, 0, 1, 1]), **kwargs}
    with pytest.raises(ValueError, match=match):
        natural_clients(**kwargs)


def test_natural_speed_100k_examples_10k_clients():
    groups = np.random.default_rng(0).permutation(np.arange(100_000) % 10_000)
    natural_clients(groups[:1000])  # warm up
    start = time.perf_counter()
    result = natural_clients(groups)
    elapsed = time.perf_counter() - start
    assert len(result.assignment) == 10_000
    assert sum(a.size for a in result.assignment) == 100_000
    assert elapsed < 2.0, f"natural took {elapsed:.2f} s"
