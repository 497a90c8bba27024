"""The record and row splits shared by the builders of federated data from files.

`build_file_data` (instructions, text) and `build_preference_data` (preference pairs) take the
same steps around their own formatting, each with its own random stream derived from `seed`:

1. `_check_split_arguments` checks the partitioning arguments before anything is loaded.
2. `_split_records` reads the label and client columns (failing at once when one is missing),
   keeps a random subset of `max_examples` records (in file order), gives each record a label
   and a group (client) code, and holds out a global eval set of `eval_fraction` of the records,
   at the record level, before partitioning.
3. The builder formats the pool and eval records into rows (dropping what does not fit).
4. `_partition_rows` partitions the pool rows into clients (`natural`: one client per value of
   the client column, dropping values with fewer than `min_examples` rows; the others by label)
   and splits each client's rows at random into train and test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.data.federated_dataset import (
    _derive_seed,
    _split_train_test,
    partitioner_arguments,
)
from fedjax_llm.data.loaders import FILE_COLUMN, LoadedDataset
from fedjax_llm.data.partitioners import PARTITIONERS, natural_clients, partition

__all__: list[str] = []  # internal to the builders; their public API is in fedjax_llm.data

_MISSING = "(missing)"  # label / client value of a record without one


def _column_values(loaded: LoadedDataset, column: str, role: str) -> list[str]:
    """A column's values as strings (None -> `(missing)`), with a clear error when absent."""
    if column not in loaded.column_names:
        raise ValueError(
            f"{role}={column!r} is not a column of {loaded.source!r}; its columns are "
            f"{sorted(loaded.column_names)} ({FILE_COLUMN!r} is the source file of each record)."
        )
    return [_MISSING if v is None else str(v) for v in loaded.column(column)]


def _codes(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer code per value and the sorted distinct values."""
    names, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), [str(x) for x in names]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}.")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}.")
    return float(value)


def _check_split_arguments(
    *,
    partitioner: str,
    num_clients: int | None,
    client_column: str | None,
    seed: int,
    max_examples: int | None,
    test_fraction: float,
    eval_fraction: float,
    partitioner_kwargs: Mapping[str, Any] | None,
) -> tuple[float, float, dict[str, Any]]:
    """Checks the partitioning arguments of a file-data builder.

    Returns:
        `(test_fraction, eval_fraction, kwargs)`: the fractions as floats and the partitioner's
        keyword arguments (`partitioner_arguments`).

    Raises:
        ValueError: Naming the argument and its valid values.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner: unknown name {partitioner!r}; valid names are {sorted(PARTITIONERS)}."
        )
    if partitioner != "natural" and num_clients is None:
        raise ValueError(
            f"num_clients is required by partitioner {partitioner!r}; only 'natural' derives the "
            "clients from the data (num_clients=None)."
        )
    if partitioner == "natural" and client_column is None:
        raise ValueError(
            "partitioner 'natural' needs client_column: the column whose values are the clients "
            f"(e.g. 'user', 'source', or {FILE_COLUMN!r} for one client per file)."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 3
    ):
        raise ValueError(
            f"max_examples must be None or an integer >= 3 (eval, train and test need one "
            f"each), got {max_examples!r}."
        )
    test_fraction = _check_fraction("test_fraction", test_fraction)
    eval_fraction = _check_fraction("eval_fraction", eval_fraction)
    return test_fraction, eval_fraction, partitioner_arguments(partitioner_kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class _RecordSplit:
    """The records kept, their labels and groups, and the global eval split.

    Attributes:
        record_ids: [R] sorted indices into the loaded records of the records kept.
        labels: [R] label code per kept record (0 for all without a label column).
        label_names: Name of each label code (`["all"]` without a label column).
        groups: [R] client-column code per kept record (0 for all unless `natural`).
        group_names: Name of each group code (empty unless `natural`).
        pool_pos: Positions in `record_ids` of the records left for partitioning, ascending.
        eval_pos: Positions in `record_ids` of the global eval records, ascending.
    """

    record_ids: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    groups: np.ndarray
    group_names: list[str]
    pool_pos: np.ndarray
    eval_pos: np.ndarray


def _split_records(
    loaded: LoadedDataset,
    *,
    partitioner: str,
    label_column: str | None,
    client_column: str | None,
    max_examples: int | None,
    eval_fraction: float,
    seed: int,
) -> _RecordSplit:
    """Record subset, label and group codes, and the global eval split (see the module doc).

    Raises:
        ValueError: If the label or client column is missing (listing the columns found) or
            fewer than 3 records are left.
    """
    # Check the columns before any slow work.
    label_values = _column_values(loaded, label_column, "label_column") if label_column else None
    client_values = (
        _column_values(loaded, client_column, "client_column") if partitioner == "natural" else None
    )

    num_records = len(loaded)
    record_ids = np.arange(num_records)
    if max_examples is not None and max_examples < num_records:
        pick = np.random.default_rng(_derive_seed(seed, 10)).permutation(num_records)
        record_ids = np.sort(pick[:max_examples])
    if record_ids.size < 3:
        raise ValueError(
            f"{loaded.source!r} has {record_ids.size} records; eval, train and test need at "
            "least one each."
        )

    if label_values is not None:
        labels, label_names = _codes([label_values[i] for i in record_ids.tolist()])
    else:
        labels, label_names = np.zeros(record_ids.size, dtype=np.int64), ["all"]
    if client_values is not None:
        groups, group_names = _codes([client_values[i] for i in record_ids.tolist()])
    else:
        groups, group_names = np.zeros(record_ids.size, dtype=np.int64), []

    # Global eval set at the record level, before partitioning.
    num_eval = int(min(max(1, round(eval_fraction * record_ids.size)), record_ids.size - 2))
    eval_pick = np.random.default_rng(_derive_seed(seed, 11)).permutation(record_ids.size)
    is_eval = np.zeros(record_ids.size, dtype=bool)
    is_eval[eval_pick[:num_eval]] = True
    return _RecordSplit(
        record_ids=record_ids,
        labels=labels,
        label_names=label_names,
        groups=groups,
        group_names=group_names,
        pool_pos=np.flatnonzero(~is_eval),
        eval_pos=np.flatnonzero(is_eval),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _RowPartition:
    """The clients of the pool rows and each client's train/test split.

    Attributes:
        assignment: Each client's pool-row indices (train and test).
        train_assign: Each client's training rows, sorted.
        test_assign: Each client's held-out rows, sorted.
        client_names: The client-column value of each client (`natural`), else None.
        dropped_names: Client-column values left out for having too few rows.
        dropped_examples: Rows of the dropped values.
        unselected: Eligible clients left out because `num_clients` asked for fewer.
    """

    assignment: list[np.ndarray]
    train_assign: list[np.ndarray]
    test_assign: list[np.ndarray]
    client_names: list[str] | None
    dropped_names: list[str]
    dropped_examples: int
    unselected: int


def _partition_rows(
    row_groups: np.ndarray,
    row_labels: np.ndarray,
    group_names: Sequence[str],
    *,
    partitioner: str,
    num_clients: int | None,
    kwargs: Mapping[str, Any],
    test_fraction: float,
    seed: int,
) -> _RowPartition:
    """Partitions pool rows into clients and splits each client into train and test.

    Args:
        row_groups: [N] group code of each pool row (used by `natural`).
        row_labels: [N] label code of each pool row (used by the other partitioners).
        group_names: Name of each group code.
        partitioner: A key of `PARTITIONERS`.
        num_clients: Clients to make (`natural`: None keeps all, an integer a seeded subset).
        kwargs: The partitioner's keyword arguments (`partitioner_arguments`).
        test_fraction: Share of each client's rows held out.
        seed: The builder's seed.

    Returns:
        The `_RowPartition`.

    Raises:
        ValueError: If the partitioner cannot make the clients asked for.
    """
    part_seed = _derive_seed(seed, 1)
    client_names: list[str] | None = None
    dropped_names: list[str] = []
    dropped_examples = 0
    if partitioner == "natural":
        nat = natural_clients(
            row_groups, num_clients, part_seed, min_examples=kwargs["min_examples"]
        )
        assignment = nat.assignment
        client_names = [group_names[g] for g in nat.groups.tolist()]
        dropped_names = [group_names[g] for g in nat.dropped_groups.tolist()]
        dropped_examples = nat.num_dropped_examples
        unselected = int(nat.unselected_groups.size)
    else:
        assignment = partition(partitioner, row_labels, int(num_clients), part_seed, **kwargs)
        unselected = 0
    train_assign, test_assign = _split_train_test(assignment, test_fraction, _derive_seed(seed, 2))
    return _RowPartition(
        assignment=assignment,
        train_assign=train_assign,
        test_assign=test_assign,
        client_names=client_names,
        dropped_names=dropped_names,
        dropped_examples=int(dropped_examples),
        unselected=unselected,
    )
