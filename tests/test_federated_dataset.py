"""Tests for fedjax_llm.data.federated_dataset."""

import json

import numpy as np
import pytest

from fedjax_llm.data import (
    DEFAULT_FAMILIES,
    ByteTokenizer,
    Example,
    build_task_data,
    format_partition_stats,
    generate_examples,
    make_federated_dataset,
    tokenize_examples,
)

TOK = ByteTokenizer()


def _build(**overrides):
    kwargs = dict(
        families=DEFAULT_FAMILIES,
        num_clients=12,
        examples_per_client=10,
        seq_len=32,
        partitioner="dirichlet",
        partitioner_kwargs={"alpha": 0.5},
        test_fraction=0.2,
        eval_examples_per_family=5,
        seed=0,
        tokenizer=TOK,
    )
    kwargs.update(overrides)
    return build_task_data(**kwargs)


def test_tokenize_layout_and_loss_mask():
    examples = [Example("37+45=", "82", 0), Example("rev abc=", "cba", 1), Example("x=", "", 1)]
    tx = tokenize_examples(examples, TOK, 16, ["add", "reverse"])
    assert tx.tokens.shape == (3, 16) and tx.tokens.dtype == np.int32
    assert tx.loss_mask.shape == (3, 16) and tx.loss_mask.dtype == np.float32
    assert tx.prompt_len.dtype == np.int32 and tx.labels.dtype == np.int32
    np.testing.assert_array_equal(tx.labels, [0, 1, 1])
    np.testing.assert_array_equal(tx.prompt_len, [7, 9, 3])
    assert tx.label_names == ("add", "reverse") and tx.responses == ("82", "cba", "")
    for i, ex in enumerate(examples):
        row, mask, p = tx.tokens[i], tx.loss_mask[i], tx.prompt_len[i]
        length = p + len(ex.response) + 1
        np.testing.assert_array_equal(row[:length], TOK.encode(ex.prompt + ex.response, True, True))
        assert np.all(row[length:] == TOK.pad_id)
        # The mask covers exactly the response tokens and the final eos.
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(p, length))
        assert np.all(mask[mask != 0] == 1.0)
        assert row[length - 1] == TOK.eos_id
        assert TOK.decode(row[mask > 0]) == ex.response
        assert TOK.decode(row[:p]) == ex.prompt


def test_tokenize_all_families_fit_32():
    examples = generate_examples(DEFAULT_FAMILIES, 3000, seed=0)
    tx = tokenize_examples(examples, TOK, 32, DEFAULT_FAMILIES)
    assert len(tx) == 3000 and tx.seq_len == 32
    np.testing.assert_array_equal(tx.loss_mask.sum(1), [len(e.response) + 1 for e in examples])


def test_tokenize_too_long_raises_never_truncates():
    examples = [Example("a=", "b", 0), Example("copy abcdef=", "abcdef", 0)]
    with pytest.raises(ValueError, match=r"example 1 .*20 tokens.*seq_len=10.*at least 20"):
        tokenize_examples(examples, TOK, 10, ["copy"])


@pytest.mark.parametrize(
    "examples, seq_len, match",
    [
        ([Example("a=", "b", 2)], 8, "label"),
        ([Example("a=", "b", 0)], 1, "seq_len"),
    ],
)
def test_tokenize_bad_arguments(examples, seq_len, match):
    with pytest.raises(ValueError, match=match):
        tokenize_examples(examples, TOK, seq_len, ["x", "y"])


def test_make_federated_dataset_contiguous():
    examples = tokenize_examples(
        generate_examples(["add", "copy"], 10, 0), TOK, 32, ["add", "copy"]
    )
    assignment = [np.array([3, 1]), np.array([0]), np.array([9, 5, 7])]
    fd = make_federated_dataset(examples, assignment)
    assert fd.num_clients == 3 and fd.num_examples == 6
    np.testing.assert_array_equal(fd.client_start, [0, 2, 3])
    np.testing.assert_array_equal(fd.client_count, [2, 1, 3])
    np.testing.assert_array_equal(fd.client_ids, [0, 0, 1, 2, 2, 2])
    for m, idx in enumerate(assignment):
        sl = fd.client_slice(m)
        np.testing.assert_array_equal(sl.tokens, examples.tokens[idx])
        assert sl.responses == tuple(examples.responses[i] for i in idx)
        np.testing.assert_array_equal(
            fd.client_indices(m),
            np.arange(fd.client_start[m], fd.client_start[m] + fd.client_count[m]),
        )
    with pytest.raises(IndexError):
        fd.client_slice(3)


@pytest.mark.parametrize(
    "assignment, match",
    [
        ([], "no clients"),
        ([np.array([0]), np.array([], dtype=int)], "no examples"),
        ([np.array([0, 1]), np.array([1])], "more than one client"),
        ([np.array([0, 10])], r"\[0, 10\)"),
    ],
)
def test_make_federated_dataset_bad_assignment(assignment, match):
    examples = tokenize_examples(generate_examples(["add"], 10, 0), TOK, 16, ["add"])
    with pytest.raises(ValueError, match=match):
        make_federated_dataset(examples, assignment)


@pytest.mark.parametrize(
    "partitioner, kwargs",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("pathological", {"classes_per_client": 2}),
        ("quantity_skew", {"sigma": 1.0}),
    ],
)
def test_build_task_data_shapes(partitioner, kwargs):
    data = _build(partitioner=partitioner, partitioner_kwargs=kwargs)
    train, test = data.train, data.client_test
    assert train.num_clients == test.num_clients == 12
    assert train.num_examples + test.num_examples == 120
    assert np.all(train.client_count >= 1) and np.all(test.client_count >= 1)
    assert train.examples.tokens.shape == (train.num_examples, 32)
    assert test.examples.tokens.shape == (test.num_examples, 32)
    sizes = train.client_count + test.client_count
    expected_test = np.clip(np.floor(0.2 * sizes + 0.5), 1, sizes - 1)
    np.testing.assert_array_equal(test.client_count, expected_test)
    # The global eval set is class-balanced over families.
    assert data.eval.tokens.shape == (5 * len(DEFAULT_FAMILIES), 32)
    np.testing.assert_array_equal(np.bincount(data.eval.labels), 5)
    assert data.eval.label_names == tuple(DEFAULT_FAMILIES)
    stats = data.stats
    json.dumps(stats)
    assert stats["num_clients"] == 12 and stats["num_examples"] == 120
    assert stats["num_train"] == train.num_examples and stats["num_eval"] == len(data.eval)
    assert stats["partitioner"] == partitioner
    assert "split:" in format_partition_stats(stats)


def test_build_task_data_client_label_skew_preserved():
    # Train and test of a client come from the same partition cell, so their labels agree.
    data = _build(
        partitioner="pathological",
        partitioner_kwargs={"classes_per_client": 1},
        num_clients=14,
        examples_per_client=20,
    )
    for m in range(data.train.num_clients):
        train_labels = set(data.train.client_slice(m).labels.tolist())
        test_labels = set(data.client_test.client_slice(m).labels.tolist())
        assert len(train_labels) == 1 and test_labels == train_labels


def test_build_task_data_deterministic():
    a, b, c = _build(seed=5), _build(seed=5), _build(seed=6)
    for x, y in [(a.train, b.train), (a.client_test, b.client_test)]:
        np.testing.assert_array_equal(x.examples.tokens, y.examples.tokens)
        np.testing.assert_array_equal(x.client_count, y.client_count)
    np.testing.assert_array_equal(a.eval.tokens, b.eval.tokens)
    assert a.stats == b.stats
    assert not np.array_equal(a.train.examples.tokens, c.train.examples.tokens)
    # The eval set comes from its own stream, not a copy of the training pool's first examples.
    assert a.eval.responses != a.train.examples.responses[: len(a.eval)]


def test_build_task_data_minimal_clients():
    data = _build(examples_per_client=2, partitioner="iid", partitioner_kwargs={})
    np.testing.assert_array_equal(data.train.client_count, 1)
    np.testing.assert_array_equal(data.client_test.client_count, 1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_clients": 0}, "num_clients"),
        ({"examples_per_client": 1}, "examples_per_client"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"eval_examples_per_family": 0}, "eval_examples_per_family"),
        ({"seed": -1}, "seed"),
        ({"seq_len": 8}, "seq_len"),
        ({"partitioner": "nope"}, "partitioner.*valid names"),
        ({"partitioner_kwargs": {"alpha": 0.0}}, "alpha"),
        ({"partitioner_kwargs": {"alpha": 1.0, "min_examples": 1}}, "min_examples"),
        ({"partitioner_kwargs": {"beta": 1.0}}, "beta"),
        ({"families": ["add", "bogus"]}, "families.*valid names"),
    ],
)
def test_build_task_data_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _build(**overrides)


class _NoBosTokenizer(ByteTokenizer):
    """Like Qwen2: no bos token."""

    @property
    def bos_id(self):
        return None


def test_tokenize_without_bos():
    tok = _NoBosTokenizer()
    tx = tokenize_examples([Example("37+45=", "82", 0)], tok, 16, ["add"])
    assert tx.prompt_len[0] == 6
    np.testing.assert_array_equal(tx.tokens[0, :9], tok.encode("37+45=82", add_eos=True))
    np.testing.assert_array_equal(np.flatnonzero(tx.loss_mask[0]), [6, 7, 8])
    with pytest.raises(ValueError, match="empty prompt.*no bos"):
        tokenize_examples([Example("", "82", 0)], tok, 16, ["add"])
