"""Tests for fedjax_llm.data.client_arrays: per-client held-out arrays and build info."""

import json

import numpy as np
import pytest

from fedjax_llm.data import ClientArrays


def clients(sizes, width=3):
    return [
        {"x": np.full((n, width), m, np.int32), "y": np.ones(n, np.float32)}
        for m, n in enumerate(sizes)
    ]


def test_positional_construction_and_plain_stats_are_unchanged():
    data = ClientArrays.from_clients(clients([2, 3]))
    again = ClientArrays(data.examples, data.client_start, data.client_count, None)
    assert again.client_test is None and again.info is None
    assert again.stats == {
        "source": "arrays",
        "num_clients": 2,
        "num_train": 5,
        "client_sizes": {"min": 2, "mean": 2.5, "max": 3},
        "fields": ["x", "y"],
        "num_eval": 0,
    }


def test_client_test_and_info_extend_the_stats():
    train, test = (
        ClientArrays.from_clients(clients([2, 3])),
        ClientArrays.from_clients(clients([1, 4])),
    )
    data = ClientArrays(
        train.examples,
        train.client_start,
        train.client_count,
        client_test=test,
        info={"source": "pairs.jsonl", "client_names": ["a", "b"], "num_train": 5},
    )
    stats = data.stats
    assert stats["num_client_test"] == 5 and stats["source"] == "pairs.jsonl"
    assert stats["client_names"] == ["a", "b"] and stats["num_clients"] == 2
    json.dumps(stats)


def test_client_test_must_match_the_clients_and_fields():
    train = ClientArrays.from_clients(clients([2, 3]))
    with pytest.raises(ValueError, match="client_test has 1 clients, the training data 2"):
        ClientArrays(
            train.examples,
            train.client_start,
            train.client_count,
            client_test=ClientArrays.from_clients(clients([2])),
        )
    other = ClientArrays.from_clients([{"x": np.zeros((1, 3), np.int32)}] * 2)
    with pytest.raises(ValueError, match=r"client_test has fields \['x'\]"):
        ClientArrays(train.examples, train.client_start, train.client_count, client_test=other)
