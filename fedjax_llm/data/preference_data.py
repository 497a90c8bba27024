"""Federated preference pairs from files: the training data of a DPO objective.

`build_preference_data` turns `(prompt, chosen, rejected)` records (see `load_preference_pairs`)
into a `ClientArrays` with exactly the fields the DPO objective reads (`fedjax_llm.dpo`):

- `chosen`, `rejected`: [N, T] int32 token rows, the prompt followed by one response;
- `chosen_mask`, `rejected_mask`: [N, T] float32, 1 where token t is a response target (the
  response and the final eos), the convention of `TokenizedExamples.loss_mask`.

Each side is a conversation rendered with the chat template exactly as instruction data is
(`tokenize_conversations` with the loss on the last assistant turn): a text prompt is one user
message, a text response one assistant message; list values are message lists, the response's
appended to the prompt's, and the response's last message (an assistant message) is the target.
Both rows of a pair therefore start with the same prompt tokens. A response longer than `seq_len`
loses its end, as instruction responses do; a pair is dropped (and counted) when either side
keeps no response token.

The records are split as `build_file_data` splits them (`fedjax_llm.data.record_split`): a seeded
subset, a global eval set held out at the record level, a partition of the remaining pairs into
clients (`natural` by `client_column`, or a label partitioner by `label_column`), and a seeded
train/test split of each client's pairs. `ClientArrays.eval` holds the global eval pairs,
`ClientArrays.client_test` each client's held-out pairs, and `ClientArrays.info` what the build
did (see `build_preference_data`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.data.client_arrays import ClientArrays
from fedjax_llm.data.formatting import _check_seq_len, tokenize_conversations
from fedjax_llm.data.loaders import (
    FILE_COLUMN,
    LoadedDataset,
    _check_preference_pairs,
    load_preference_pairs,
)
from fedjax_llm.data.partitioners import partition_stats
from fedjax_llm.data.record_split import (
    _check_split_arguments,
    _partition_rows,
    _split_records,
)
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = ["build_preference_data"]

_Messages = list[dict[str, Any]]


def _messages(value: Any, role: str) -> _Messages:
    """A prompt (`role="user"`) or response (`"assistant"`) value as a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _normalized(messages: _Messages) -> list[tuple[Any, str]]:
    """Roles and stripped contents: what makes two responses the same."""
    return [(m["role"], str(m["content"] or "").strip()) for m in messages]


def _pair_conversations(loaded: LoadedDataset) -> tuple[list[_Messages], list[_Messages]]:
    """The chosen and rejected conversation of every record, checked.

    Raises:
        ValueError: If a list response does not end with a non-empty assistant message, or the
            chosen and rejected responses are the same (naming the record and the column).
    """
    prompts = loaded.column("prompt")
    chosen_conv: list[_Messages] = []
    rejected_conv: list[_Messages] = []
    for i, (prompt, chosen, rejected) in enumerate(
        zip(prompts, loaded.column("chosen"), loaded.column("rejected"), strict=True)
    ):
        context = _messages(prompt, "user")
        responses = {}
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            messages = _messages(value, "assistant")
            last = messages[-1]
            if last["role"] != "assistant":
                raise ValueError(
                    f"preference pairs: {column!r} of {loaded.describe(i)} ends with a "
                    f"{last['role']!r} message; a response must end with the assistant message "
                    "that is compared."
                )
            content = last["content"]
            if content is None or (isinstance(content, str) and not content.strip()):
                raise ValueError(
                    f"preference pairs: {column!r} of {loaded.describe(i)} is empty (its last "
                    "assistant message has no content); every pair needs a non-empty chosen and "
                    "rejected response."
                )
            responses[column] = messages
        if _normalized(responses["chosen"]) == _normalized(responses["rejected"]):
            raise ValueError(
                f"preference pairs: 'rejected' of {loaded.describe(i)} is identical to 'chosen' "
                f"({str(responses['chosen'][-1]['content']).strip()!r:.80}); a pair needs two "
                "different responses."
            )
        chosen_conv.append(context + responses["chosen"])
        rejected_conv.append(context + responses["rejected"])
    return chosen_conv, rejected_conv


def _tokenize_pairs(
    chosen: Sequence[_Messages],
    rejected: Sequence[_Messages],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    chat_template: str | None,
    describe: Any,
    what: str,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    """Tokenizes pairs into the four preference fields, dropping pairs that do not fit.

    Both sides go through `tokenize_conversations` in one batch, with one column more than
    `seq_len`: a row whose real tokens reach that extra column was cut, which counts truncation
    exactly. After the extra column is sliced off, a row keeps a response token exactly when
    `tokenize_conversations` with `seq_len` would keep it.

    Returns:
        `(fields, kept, report)`: the fields of the kept pairs, the indices of the kept pairs,
        and the counts (`num_records`, `num_pairs`, `num_truncated` rows, `dropped_too_long`).

    Raises:
        ValueError: If every pair is dropped (naming `what` and data.seq_len).
    """
    n = len(chosen)
    too_long = ValueError(
        f"preference pairs: all {n} pairs of {what} are too long for seq_len={seq_len} "
        "(data.seq_len): a pair needs its prompt and at least one token of each response to fit; "
        "raise data.seq_len or shorten the prompts."
    )
    try:
        examples, report = tokenize_conversations(
            [*chosen, *rejected],
            tokenizer,
            seq_len + 1,
            loss_on="last",
            min_response_tokens=1,
            chat_template=chat_template,
            describe=lambda k: describe(k % n),
        )
    except ValueError as err:
        if "dropped all" in str(err):
            raise too_long from None
        raise
    mask = examples.loss_mask[:, :seq_len]
    fits = mask.sum(axis=1) > 0
    cut = examples.loss_mask[:, seq_len] > 0
    row_of = np.full(2 * n, -1, dtype=np.int64)
    rows = np.flatnonzero(fits)
    row_of[report.row_records[rows]] = rows
    chosen_row, rejected_row = row_of[:n], row_of[n:]
    kept = np.flatnonzero((chosen_row >= 0) & (rejected_row >= 0))
    if kept.size == 0:
        raise too_long
    c, r = chosen_row[kept], rejected_row[kept]
    fields = {
        "chosen": examples.tokens[c, :seq_len],
        "chosen_mask": mask[c],
        "rejected": examples.tokens[r, :seq_len],
        "rejected_mask": mask[r],
    }
    counts = {
        "num_records": n,
        "num_pairs": int(kept.size),
        "num_truncated": int(cut[c].sum() + cut[r].sum()),
        "dropped_too_long": int(n - kept.size),
    }
    return fields, kept, counts


def _gather(fields: Mapping[str, np.ndarray], assignment: Sequence[np.ndarray]) -> ClientArrays:
    """The clients' rows of `fields`, stored contiguously in client order."""
    counts = np.array([len(a) for a in assignment], dtype=np.int64)
    idx = np.concatenate([np.asarray(a, dtype=np.int64) for a in assignment])
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return ClientArrays({f: np.ascontiguousarray(v[idx]) for f, v in fields.items()}, start, counts)


def build_preference_data(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | LoadedDataset,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    num_clients: int | None = None,
    partitioner: str = "natural",
    partitioner_kwargs: Mapping[str, Any] | None = None,
    label_column: str | None = None,
    client_column: str | None = FILE_COLUMN,
    test_fraction: float = 0.2,
    eval_fraction: float = 0.1,
    max_examples: int | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> ClientArrays:
    """Builds federated preference-pair (DPO) data from local files (or a hub dataset).

    Args:
        path: A file, folder, glob, list of them, or hub dataset name of records with `prompt`,
            `chosen` and `rejected` (see `load_preference_pairs`), or records already loaded
            with schema `preference` (then `split` and `cache_dir` are not used).
        tokenizer: An `HFTokenizer` with a chat template, or any `Tokenizer` with
            `chat_template`.
        seq_len: Row length T of both sides of a pair.
        num_clients: Number of clients; required by every partitioner except `natural`, where
            None means one client per value of `client_column` and an integer keeps that many of
            those clients, chosen by `seed`.
        partitioner: A key of `PARTITIONERS`: `natural` (by `client_column`), or `iid`,
            `dirichlet`, `pathological`, `quantity_skew` (by the label column).
        partitioner_kwargs: Keyword arguments of the partitioner (as in `build_file_data`);
            `min_examples` defaults to 2 and may not be lower.
        label_column: Column whose values label the pairs (category, source, ...), used by
            label-skew partitioners; None gives every pair the label `"all"`.
        client_column: Column whose values are the clients of `natural` (user, source, ...);
            `"__file__"` (the default) makes one client per file.
        test_fraction: Share of each client's pairs held out in `client_test`, in (0, 1).
        eval_fraction: Share of the records held out, before partitioning, as the global eval
            set, in (0, 1) (at least one record).
        max_examples: Keep at most this many records, a random subset chosen by `seed` (before
            the eval split); None keeps all.
        seed: Non-negative integer seed; the result is a deterministic function of it.
        chat_template: Jinja chat template replacing the tokenizer's (needed for tokenizers
            without one, e.g. `CHATML_TEMPLATE`).
        split: Split of a hub dataset.
        cache_dir: Cache folder of `datasets`.

    Returns:
        The `ClientArrays` of the training pairs (fields `chosen`, `chosen_mask`,
        `rejected`, `rejected_mask`), with `eval` (the
        global eval pairs), `client_test` (each client's held-out pairs, one client per
        training client, in the same order) and `info`, which its `stats` merge in:
        `partition_stats` of the partition (with `partitioner`, `partitioner_kwargs` and
        `convention`) plus `source`, `schema` (`"preference"`), `task` (`"preference"`),
        `exact_match_meaningful` (False), `files`, `empty_files`, `num_records`, `format_pool`
        and `format_eval` (`num_records`, `num_pairs`, `num_truncated` rows,
        `dropped_too_long` pairs), `dropped_by_truncation` (pairs, both sets),
        `dropped_empty` (0: empty responses are errors), `truncated` (rows whose response was
        cut, both sets), `dropped_clients` (`count`, `examples`, the first 100 `names`),
        `unselected_clients`, `client_names` (for `natural`, else None), `client_num_train`,
        `client_num_test`, `label_names`, `label_column`, `client_column`, `seq_len`, `seed`,
        `test_fraction`, `eval_fraction`, `num_train`, `num_client_test` and `num_eval`.

    Raises:
        FileNotFoundError: If `path` does not exist (see `load_records`).
        ValueError: If an argument is invalid (the message names it and the valid values), a
            column is missing (it lists the columns found), a record has an empty or malformed
            value, a list response does not end with an assistant message, or chosen equals
            rejected (the message names the record, its file and the column), every pair of
            the training or eval records is too long for `seq_len`, the tokenizer has no chat
            template, or the partitioner cannot make the clients asked for.
    """
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
    seq_len = _check_seq_len(seq_len)
    if isinstance(path, LoadedDataset):
        loaded = path
        if loaded.schema != "preference":
            raise ValueError(
                f"{loaded.source!r} was loaded as {loaded.schema!r} records, not preference "
                "pairs (prompt/chosen/rejected); build it with build_file_data."
            )
        _check_preference_pairs(loaded)
    else:
        loaded = load_preference_pairs(path, split=split, cache_dir=cache_dir)
    records = _split_records(
        loaded,
        partitioner=partitioner,
        label_column=label_column,
        client_column=client_column,
        max_examples=max_examples,
        eval_fraction=eval_fraction,
        seed=seed,
    )
    chosen, rejected = _pair_conversations(loaded)

    def tokenize(pos: np.ndarray, what: str) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
        ids = records.record_ids[pos].tolist()
        return _tokenize_pairs(
            [chosen[i] for i in ids],
            [rejected[i] for i in ids],
            tokenizer=tokenizer,
            seq_len=seq_len,
            chat_template=chat_template,
            describe=lambda k: loaded.describe(ids[k]),
            what=what,
        )

    pool, pool_kept, pool_report = tokenize(
        records.pool_pos, f"the training records of {loaded.source!r}"
    )
    eval_set, _, eval_report = tokenize(
        records.eval_pos,
        f"the global eval set ({records.eval_pos.size} records) of {loaded.source!r}",
    )
    row_pos = records.pool_pos[pool_kept]  # position in record_ids of each pool pair
    row_labels = records.labels[row_pos]
    part = _partition_rows(
        records.groups[row_pos],
        row_labels,
        records.group_names,
        partitioner=partitioner,
        num_clients=num_clients,
        kwargs=kwargs,
        test_fraction=test_fraction,
        seed=seed,
    )
    train = _gather(pool, part.train_assign)
    client_test = _gather(pool, part.test_assign)

    info = partition_stats(
        part.assignment,
        row_labels,
        records.label_names,
        partitioner=partitioner,
        partitioner_kwargs=kwargs,
    )
    reports = (pool_report, eval_report)
    info.update(
        source=loaded.source,
        schema="preference",
        task="preference",
        exact_match_meaningful=False,
        files=len(loaded.files),
        empty_files=list(loaded.empty_files),
        num_records=int(records.record_ids.size),
        format_pool=pool_report,
        format_eval=eval_report,
        dropped_by_truncation=sum(r["dropped_too_long"] for r in reports),
        dropped_empty=0,
        truncated=sum(r["num_truncated"] for r in reports),
        dropped_clients={
            "count": len(part.dropped_names),
            "examples": part.dropped_examples,
            "names": part.dropped_names[:100],
        },
        unselected_clients=part.unselected,
        client_names=part.client_names,
        client_num_train=train.client_count.tolist(),
        client_num_test=client_test.client_count.tolist(),
        label_names=list(records.label_names),
        label_column=label_column,
        client_column=client_column if partitioner == "natural" else None,
        seq_len=seq_len,
        seed=int(seed),
        test_fraction=test_fraction,
        eval_fraction=eval_fraction,
        num_train=int(train.client_count.sum()),
        num_client_test=int(client_test.client_count.sum()),
        num_eval=eval_report["num_pairs"],
    )
    return ClientArrays(
        train.examples,
        train.client_start,
        train.client_count,
        eval=eval_set,
        client_test=client_test,
        info=info,
    )
