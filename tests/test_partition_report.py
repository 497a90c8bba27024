"""Tests for fedjax_llm.data.partition_report."""

import time

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image  # noqa: E402

from fedjax_llm.data import (  # noqa: E402
    DEFAULT_FAMILIES,
    ByteTokenizer,
    build_task_data,
    client_label_counts,
    partition,
    save_partition_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_client_label_counts_by_hand():
    labels = np.array([0, 2, 1, 1, 0])
    counts = client_label_counts([np.array([0, 1]), np.array([2, 3, 4])], labels)
    np.testing.assert_array_equal(counts, [[1, 0, 1], [1, 2, 0]])
    np.testing.assert_array_equal(client_label_counts([np.array([0])], labels, 4), [[1, 0, 0, 0]])
    with pytest.raises(ValueError, match="no clients"):
        client_label_counts([], labels)
    with pytest.raises(ValueError, match="largest is 2"):
        client_label_counts([np.array([1])], labels, 2)


def test_report_from_task_data(tmp_path):
    data = build_task_data(
        families=DEFAULT_FAMILIES,
        num_clients=12,
        examples_per_client=10,
        seq_len=32,
        partitioner="dirichlet",
        partitioner_kwargs={"alpha": 0.3},
        test_fraction=0.2,
        eval_examples_per_family=2,
        seed=0,
        tokenizer=ByteTokenizer(),
    )
    path = save_partition_report(data, tmp_path / "sub" / "partition.png")
    assert path == str(tmp_path / "sub" / "partition.png")
    assert_png(path)


def test_report_for_10k_clients_and_many_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 60, size=100_000)  # more labels than heatmap columns
    assignment = partition("dirichlet", labels, 10_000, 0, alpha=0.5)
    start = time.perf_counter()
    path = save_partition_report(
        assignment, tmp_path / "big.png", labels=labels, title="10k clients", max_rows=50
    )
    elapsed = time.perf_counter() - start
    assert_png(path)
    assert elapsed < 20, f"report took {elapsed:.1f} s"


def test_report_names_and_single_client(tmp_path):
    labels = np.array([0, 1, 1])
    path = save_partition_report(
        [np.array([0, 1, 2])], tmp_path / "one.png", labels=labels, label_names=["a", "b"]
    )
    assert_png(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "pass labels"),
        ({"labels": np.array([0, 1]), "label_names": ["a", "b", "c"], "max_rows": 0}, "max_rows"),
        ({"labels": np.array([0, 1]), "max_labels": 1}, "max_labels"),
        ({"labels": np.array([0, 2]), "label_names": ["a", "b"]}, r"labels must lie in \[0, 2\)"),
    ],
)
def test_report_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_partition_report([np.array([0, 1])], tmp_path / "x.png", **kwargs)
