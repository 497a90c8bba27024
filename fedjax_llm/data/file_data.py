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

Steps 1, 2 and 4 are `fedjax_llm.data.record_split`, which `build_preference_data` shares.
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
    _replace_rows,
    _training_owner,
    make_federated_dataset,
)
from fedjax_llm.data.formatting import (
    LOSS_ON,
    FormatReport,
    records_to_conversations,
    tokenize_conversations,
    tokenize_documents,
)
from fedjax_llm.data.loaders import FILE_COLUMN, FORMATS, LoadedDataset, load_records
from fedjax_llm.data.partitioners import partition_stats
from fedjax_llm.data.poisoning import (
    PoisoningSpec,
    backdoor_records,
    check_poisoning,
    poison_records,
)
from fedjax_llm.data.record_split import (
    _check_split_arguments,
    _partition_rows,
    _split_records,
)
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = ["build_file_data"]


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
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | LoadedDataset,
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
        path: A file, folder, glob, list of them, or hub dataset name (see `load_records`),
            or records already loaded with `load_records` (then `format`, `text_column`,
            `sample_by`, `split` and `cache_dir` are not used for loading).
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
            dropped, the records are preference pairs (see `build_preference_data`), the
            tokenizer cannot format instructions, or the partitioner cannot make the clients
            asked for.
        ConfigError: If `poisoning` is invalid (e.g. not one flag per client), the data is plain
            text (nothing to poison), or no triggered eval example fits `seq_len`.
    """
    if format not in FORMATS:
        raise ValueError(
            f"format: unknown value {format!r}; valid values are {list(FORMATS)} (preference "
            "pairs: build_preference_data, or load_preference_pairs)."
        )
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: unknown value {loss_on!r}; valid values are {list(LOSS_ON)}.")
    test_fraction, eval_fraction, kwargs = _check_split_arguments(
        partitioner=partitioner,
        num_clients=num_clients,
        client_column=client_column,
        seed=seed,
        max_examples=max_examples,
        test_fraction=test_fraction,
        eval_fraction=eval_fraction,
        partitioner_kwargs=partitioner_kwargs,
    )
    if poisoning is not None:
        poisoning = check_poisoning(poisoning)

    if isinstance(path, LoadedDataset):
        loaded = path
        if format != "auto" and format != loaded.schema:
            raise ValueError(
                f"format={format!r}, but the records given were loaded as {loaded.schema!r}; "
                "load them with that format or pass format='auto'."
            )
    else:
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
            "build_file_data does not train on; build them with build_preference_data "
            "(data.format=preference), load them with load_preference_pairs, or pass format= to "
            "read other columns."
        )
    if poisoning is not None:
        if loaded.schema == "text":
            raise ConfigError(
                f"byzantine.attack={poisoning.kind} needs instruction data (prompt and response); "
                f"data.format=text has none ({loaded.source!r} was read as plain text)."
            )
    records = _split_records(
        loaded,
        partitioner=partitioner,
        label_column=label_column,
        client_column=client_column,
        max_examples=max_examples,
        eval_fraction=eval_fraction,
        seed=seed,
    )
    record_ids, labels, label_names = records.record_ids, records.labels, records.label_names
    groups, pool_pos, eval_pos = records.groups, records.pool_pos, records.eval_pos

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

    part = _partition_rows(
        groups[row_pos],
        pool.labels,
        records.group_names,
        partitioner=partitioner,
        num_clients=num_clients,
        kwargs=kwargs,
        test_fraction=test_fraction,
        seed=seed,
    )
    assignment, train_assign, test_assign = part.assignment, part.train_assign, part.test_assign
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
            "count": len(part.dropped_names),
            "examples": part.dropped_examples,
            "names": part.dropped_names[:100],
        },
        unselected_clients=part.unselected,
        client_names=part.client_names,
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
