"""Federated task data from real files: load, format, hold out a global eval set, partition, split.

`build_file_data` returns the same `TaskData` as `build_task_data`, so the simulator trains on
local JSON/JSONL/Parquet/CSV/text files (or a hub dataset when online) exactly as it trains on the
built-in tasks. The steps, each with its own random stream derived from `seed`:

1. `load_records` reads the records and detects their schema; `max_examples` keeps a random
   subset of records (in file order).
2. A global eval set of `eval_fraction` of the records is held out before partitioning, at the
   record level, so no document or conversation is split between eval and training.
3. The rest is formatted (`tokenize_conversations` for instructions, `tokenize_documents` for
   text; packed text rows never mix clients or labels), then partitioned into clients: `natural`
   makes one client per value of `client_column` (`"__file__"`: one client per file) and drops
   values with fewer than 2 rows; the other partitioners split by the label column.
4. Each client's rows are split at random into train and test, exactly as `build_task_data` does.
5. With a `PoisoningSpec`, the training rows of malicious clients are poisoned at the record level
   (the user text and the reply of the trained turn, before the chat template renders them) and
   formatted again in place; test rows and the global eval set stay clean.

Labels are the values of `label_column` (sorted; `"all"` when it is None), so evaluation reports
loss and perplexity per category. For plain text, exact match means nothing (`responses` are
empty); `stats["exact_match_meaningful"]` says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.config import ConfigError
from fedjax_llm.data.federated_dataset import (
    TaskData,
    TokenizedExamples,
    _derive_seed,
    _replace_rows,
    _split_train_test,
    _training_owner,
    make_federated_dataset,
    partitioner_arguments,
)
from fedjax_llm.data.formatting import (
    LOSS_ON,
    FormatReport,
    records_to_conversations,
    tokenize_conversations,
    tokenize_documents,
)
from fedjax_llm.data.loaders import FILE_COLUMN, FORMATS, LoadedDataset, load_records
from fedjax_llm.data.partitioners import PARTITIONERS, natural_clients, partition, partition_stats
from fedjax_llm.data.poisoning import (
    PoisoningSpec,
    backdoor_records,
    check_poisoning,
    poison_records,
)
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = ["build_file_data"]

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


def _format(
    loaded: LoadedDataset,
    tokenizer: Tokenizer,
    seq_len: int,
    labels: np.ndarray,
    label_names: Sequence[str],
    groups: np.ndarray,
    pack: bool,
    loss_on: str,
    min_response_tokens: int,
    chat_template: str | None,
) -> tuple[TokenizedExamples, FormatReport]:
    if loaded.schema == "text":
        return tokenize_documents(
            loaded.column(loaded.text_column),
            tokenizer,
            seq_len,
            groups=groups,
            labels=labels,
            label_names=label_names,
            pack=pack,
        )
    return tokenize_conversations(
        records_to_conversations(loaded),
        tokenizer,
        seq_len,
        labels=labels,
        label_names=label_names,
        loss_on=loss_on,
        min_response_tokens=min_response_tokens,
        chat_template=chat_template,
        describe=loaded.describe,
    )


def _trained_turn(conversation: Sequence[Mapping[str, str]]) -> tuple[int, int]:
    """`(prompt message, reply message)` indices of the turn a formatted row generates.

    The reply is the last assistant message after the first message (the reference turn of
    `tokenize_conversations` when nothing is truncated away); the prompt message is the last user
    message before it, or the message just before it when no user message precedes it.
    """
    reply = max(j for j, m in enumerate(conversation) if m.get("role") == "assistant" and j > 0)
    users = [j for j in range(reply) if conversation[j].get("role") == "user"]
    return (users[-1] if users else reply - 1), reply


def _retokenize(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    prompts: Sequence[str],
    responses: Sequence[str],
    format_args: Mapping[str, Any],
) -> tuple[TokenizedExamples | None, np.ndarray]:
    """Formats conversations with the trained turn's prompt and reply texts replaced.

    Returns:
        `(examples, kept)`: the formatted rows (None if every one is dropped as too long) and the
        indices of the conversations they come from.
    """
    changed = []
    for conv, prompt, response in zip(conversations, prompts, responses, strict=True):
        conv = [dict(m) for m in conv]
        p, r = _trained_turn(conv)
        conv[p]["content"], conv[r]["content"] = prompt, response
        changed.append(conv)
    if not changed:
        return None, np.zeros(0, dtype=np.int64)
    try:
        examples, report = tokenize_conversations(changed, **format_args)
    except ValueError as err:
        if "dropped all" in str(err):
            return None, np.zeros(0, dtype=np.int64)
        raise
    return examples, report.row_records


def _poison_file_pool(
    pool: TokenizedExamples,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    train_assign: Sequence[np.ndarray],
    labels: np.ndarray | None,
    spec: PoisoningSpec,
    format_args: Mapping[str, Any],
) -> tuple[TokenizedExamples, int, int]:
    """Poisons the malicious clients' training rows of a formatted pool (see `poison_records`).

    Args:
        pool: The formatted pool rows.
        conversations: The conversation of each pool row.
        train_assign: Each client's training rows.
        labels: [rows] label per row for label flipping; None: no label column.
        spec: The attack.
        format_args: Keyword arguments of `tokenize_conversations`, without `labels`.

    Returns:
        `(train_pool, num_poisoned, num_skipped)`: the pool with the poisoned training rows
        replaced, how many were poisoned, and how many poisoned rows were left clean because
        their poisoned version no longer fits `seq_len`.
    """
    turns = [_trained_turn(c) for c in conversations]
    prompts = [c[p]["content"] for c, (p, _) in zip(conversations, turns, strict=True)]
    replies = [c[r]["content"] for c, (_, r) in zip(conversations, turns, strict=True)]
    owner = _training_owner(train_assign, len(pool))
    prompts, replies, poisoned = poison_records(prompts, replies, labels, owner, spec)
    rows = np.flatnonzero(poisoned)
    new, kept = _retokenize(
        [conversations[i] for i in rows.tolist()],
        [prompts[i] for i in rows.tolist()],
        [replies[i] for i in rows.tolist()],
        {**format_args, "labels": pool.labels[rows]},
    )
    if new is None:
        return pool, 0, int(rows.size)
    return _replace_rows(pool, rows[kept], new), int(kept.size), int(rows.size - kept.size)


def build_file_data(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    format: str = "auto",
    num_clients: int | None = None,
    partitioner: str = "natural",
    partitioner_kwargs: Mapping[str, Any] | None = None,
    label_column: str | None = None,
    client_column: str | None = FILE_COLUMN,
    text_column: str = "text",
    test_fraction: float = 0.2,
    eval_fraction: float = 0.1,
    max_examples: int | None = None,
    pack: bool = True,
    seed: int = 0,
    split: str = "train",
    loss_on: str = "last",
    min_response_tokens: int = 1,
    chat_template: str | None = None,
    sample_by: str = "document",
    cache_dir: str | None = None,
    poisoning: PoisoningSpec | None = None,
) -> TaskData:
    """Builds federated task data from local files (or a hub dataset when online).

    Args:
        path: A file, folder, glob, list of them, or hub dataset name (see `load_records`).
        tokenizer: An `HFTokenizer` (instructions need a chat template, see `chat_template`) or
            any `Tokenizer`.
        seq_len: Row length T.
        format: `"auto"` (detect), `"alpaca"`, `"dolly"`, `"messages"` or `"text"`.
        num_clients: Number of clients; required by every partitioner except `natural`, where
            None means one client per value of `client_column` and an integer keeps that many of
            those clients, chosen by `seed`.
        partitioner: A key of `PARTITIONERS`: `natural` (by `client_column`), or `iid`,
            `dirichlet`, `pathological`, `quantity_skew` (by the label column).
        partitioner_kwargs: Keyword arguments of the partitioner, e.g. `{"alpha": 0.3}` or
            `{"alpha": 0.3, "over": "clients"}` (see `dirichlet_partition` for the two Dirichlet
            conventions); `min_examples` defaults to 2 and may not be lower.
        label_column: Column whose values are the labels (category, source, language, or
            `"__file__"`), used by label-skew partitioners and per-category evaluation; None
            gives every record the label `"all"`.
        client_column: Column whose values are the clients of the `natural` partitioner (user,
            source, ...); `"__file__"` (the default) makes one client per file.
        text_column: Column of plain-text records.
        test_fraction: Share of each client's rows held out as its test set, in (0, 1).
        eval_fraction: Share of the records held out, before partitioning, as the global eval
            set, in (0, 1) (at least one record).
        max_examples: Keep at most this many records, a random subset chosen by `seed` (before
            the eval split); None keeps all.
        pack: For plain text, pack documents into full rows (True) or one document per row.
        seed: Non-negative integer seed; the result is a deterministic function of it.
        split: Split of a hub dataset.
        loss_on: For conversations, `"last"` or `"all"` assistant turns (see
            `tokenize_conversations`).
        min_response_tokens: Fewest response tokens a truncated example keeps; shorter ones are
            dropped and counted.
        chat_template: Jinja chat template replacing the tokenizer's (needed for tokenizers
            without one, e.g. `CHATML_TEMPLATE`).
        sample_by: For `.txt` files: `"document"`, `"paragraph"` or `"line"` per record.
        cache_dir: Cache folder of `datasets`.
        poisoning: Data poisoning by malicious clients (one `malicious` flag per client, in the
            order of the built clients); None (the default) builds clean data. Label flipping
            draws the wrong responses from rows of another `label_column` value (any other
            response without one). A backdoor also builds `TaskData.backdoor_eval` from the
            global eval rows. Poisoned rows whose poisoned version is dropped as too long for
            `seq_len` stay clean (counted in `stats["poisoning_skipped"]`).

    Returns:
        The `TaskData`. `eval.label_names` are the label values. `stats` holds
        `partition_stats` of the partition (with its `convention`) plus `source`, `schema`,
        `task` (`"instruction"` or `"text"`), `exact_match_meaningful`, `files`,
        `empty_files`, `num_records`, the formatting counts (`format_pool`, `format_eval`, and
        `dropped_by_truncation`, `dropped_empty`, `truncated` summed over both),
        `dropped_clients` (`count`, `examples`, the first 100 `names`), `client_names` (for
        `natural`), `client_num_train`, `client_num_test`, and the arguments that shaped the
        data. With `poisoning` also `poisoning` (the attack), `poisoned_examples`,
        `poisoning_skipped`, and for a backdoor `num_backdoor_eval`.

    Raises:
        FileNotFoundError: If `path` does not exist (see `load_records`).
        ValueError: If an argument is invalid (the message names it and the valid values), a
            column is missing (it lists the columns found), the data is empty or all of it is
            dropped, the tokenizer cannot format instructions, or the partitioner cannot make
            the clients asked for.
        ConfigError: If `poisoning` is invalid (e.g. not one flag per client), the data is plain
            text (nothing to poison), or no triggered eval example fits `seq_len`.
    """
    if format not in FORMATS:
        raise ValueError(
            f"format: unknown value {format!r}; valid values are {list(FORMATS)} (preference "
            "pairs: load_preference_pairs)."
        )
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
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: unknown value {loss_on!r}; valid values are {list(LOSS_ON)}.")
    test_fraction = _check_fraction("test_fraction", test_fraction)
    eval_fraction = _check_fraction("eval_fraction", eval_fraction)
    kwargs = partitioner_arguments(partitioner_kwargs)
    if poisoning is not None:
        poisoning = check_poisoning(poisoning)

    loaded = load_records(
        path,
        format,
        text_column=text_column,
        sample_by=sample_by,
        split=split,
        cache_dir=cache_dir,
    )
    if loaded.schema == "preference":
        raise ValueError(
            f"{loaded.source!r} holds preference pairs (prompt/chosen/rejected), which "
            "build_file_data cannot train on yet; load them with load_preference_pairs, or pass "
            "format= to read other columns."
        )
    if poisoning is not None:
        if loaded.schema == "text":
            raise ConfigError(
                f"byzantine.attack={poisoning.kind} needs instruction data (prompt and response); "
                f"data.format=text has none ({loaded.source!r} was read as plain text)."
            )
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
    pool_pos, eval_pos = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)

    def fmt(pos: np.ndarray, what: str) -> tuple[TokenizedExamples, FormatReport]:
        try:
            return _format(
                loaded.select(record_ids[pos]),
                tokenizer,
                seq_len,
                labels[pos],
                label_names,
                groups[pos],
                pack,
                loss_on,
                min_response_tokens,
                chat_template,
            )
        except ValueError as err:
            if "dropped all" in str(err) or "documents are empty" in str(err):
                raise ValueError(f"{what} of {loaded.source!r}: {err}") from err
            raise

    pool, pool_report = fmt(pool_pos, "the training records")
    eval_set, eval_report = fmt(eval_pos, f"the global eval set ({eval_pos.size} records)")
    row_pos = pool_pos[pool_report.row_records]  # position in record_ids of each pool row

    dropped_names: list[str] = []
    dropped_examples = 0
    client_names: list[str] | None = None
    part_seed = _derive_seed(seed, 1)
    if partitioner == "natural":
        nat = natural_clients(
            groups[row_pos], num_clients, part_seed, min_examples=kwargs["min_examples"]
        )
        assignment = nat.assignment
        client_names = [group_names[g] for g in nat.groups.tolist()]
        dropped_names = [group_names[g] for g in nat.dropped_groups.tolist()]
        dropped_examples = nat.num_dropped_examples
        unselected = int(nat.unselected_groups.size)
    else:
        assignment = partition(partitioner, pool.labels, int(num_clients), part_seed, **kwargs)
        unselected = 0
    train_assign, test_assign = _split_train_test(assignment, test_fraction, _derive_seed(seed, 2))
    train_pool, backdoor_eval = pool, None
    if poisoning is not None:
        if poisoning.malicious.size != len(train_assign):
            raise ConfigError(
                f"byzantine.fraction: the malicious-client mask has {poisoning.malicious.size} "
                f"entries but the data has {len(train_assign)} clients; it needs one flag per "
                "client."
            )
        format_args = {
            "tokenizer": tokenizer,
            "seq_len": seq_len,
            "label_names": label_names,
            "loss_on": loss_on,
            "min_response_tokens": min_response_tokens,
            "chat_template": chat_template,
        }
        convs = records_to_conversations(loaded.select(record_ids[pool_pos]))
        train_pool, num_poisoned, num_skipped = _poison_file_pool(
            pool,
            [convs[i] for i in pool_report.row_records.tolist()],
            train_assign,
            pool.labels if label_column else None,
            poisoning,
            format_args,
        )
        if poisoning.kind == "backdoor":
            convs = records_to_conversations(loaded.select(record_ids[eval_pos]))
            convs = [convs[i] for i in eval_report.row_records.tolist()]
            triggered, targets = backdoor_records(
                [c[_trained_turn(c)[0]]["content"] for c in convs], poisoning
            )
            backdoor_eval, _ = _retokenize(
                convs, triggered, targets, {**format_args, "labels": eval_set.labels}
            )
            if backdoor_eval is None:
                raise ConfigError(
                    f"data.seq_len={seq_len} is too short for byzantine.attack=backdoor: no eval "
                    "prompt with the trigger leaves room for the target; raise data.seq_len."
                )
    train = make_federated_dataset(train_pool, train_assign)
    client_test = make_federated_dataset(pool, test_assign)

    stats = partition_stats(
        assignment, pool.labels, label_names, partitioner=partitioner, partitioner_kwargs=kwargs
    )
    reports = (pool_report, eval_report)
    stats.update(
        source=loaded.source,
        schema=loaded.schema,
        task="text" if loaded.schema == "text" else "instruction",
        exact_match_meaningful=loaded.schema != "text",
        files=len(loaded.files),
        empty_files=list(loaded.empty_files),
        num_records=int(record_ids.size),
        format_pool=pool_report.as_dict(),
        format_eval=eval_report.as_dict(),
        dropped_by_truncation=sum(r.dropped_too_long for r in reports),
        dropped_empty=sum(r.dropped_empty + r.dropped_no_response for r in reports),
        truncated=sum(r.num_truncated for r in reports),
        dropped_clients={
            "count": len(dropped_names),
            "examples": int(dropped_examples),
            "names": dropped_names[:100],
        },
        unselected_clients=unselected,
        client_names=client_names,
        client_num_train=train.client_count.tolist(),
        client_num_test=client_test.client_count.tolist(),
        partitioner=partitioner,
        partitioner_kwargs=kwargs,
        label_column=label_column,
        client_column=client_column if partitioner == "natural" else None,
        seq_len=int(seq_len),
        pack=bool(pack) if loaded.schema == "text" else None,
        loss_on=loss_on if loaded.schema != "text" else None,
        seed=int(seed),
        test_fraction=test_fraction,
        eval_fraction=eval_fraction,
        num_train=train.num_examples,
        num_client_test=client_test.num_examples,
        num_eval=len(eval_set),
    )
    if poisoning is not None:
        stats.update(
            poisoning=poisoning.kind,
            poisoned_examples=num_poisoned,
            poisoning_skipped=num_skipped,
        )
        if backdoor_eval is not None:
            stats.update(num_backdoor_eval=len(backdoor_eval))
    return TaskData(
        train=train,
        client_test=client_test,
        eval=eval_set,
        stats=stats,
        backdoor_eval=backdoor_eval,
    )
