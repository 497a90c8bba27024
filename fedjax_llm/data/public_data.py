"""Public server data: plain text the server holds beside the clients' private data.

`build_public_data` reads text as a run reads ``data.source: file`` with ``format: text``
(`load_records`: a local ``.txt`` file, a folder or a glob of them, or JSON/JSONL/Parquet/CSV
records with a text column), keeps a seeded random subset of ``max_examples`` records, holds out
``eval_fraction`` of the records for the public perplexity (whole records, so no document is
split between training and evaluation) and packs each part into rows of ``seq_len`` tokens with
`tokenize_documents`, the packing `build_file_data` uses for text.

Only local paths are read: a public corpus that does not exist is an error, never a hub lookup.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import numpy as np

from fedjax_llm.data.federated_dataset import TokenizedExamples
from fedjax_llm.data.formatting import tokenize_documents
from fedjax_llm.data.loaders import load_records
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = ["PublicData", "build_public_data"]

_SEED_STREAM = 0x7075626C  # "publ": the public split's random stream, apart from the clients'


@dataclasses.dataclass(frozen=True, eq=False)
class PublicData:
    """The server's public text, tokenized and packed.

    Attributes:
      train: the rows the server trains on.
      eval: the held-out rows of the public perplexity.
      stats: ``source``, ``files``, ``num_records`` (records with text, after ``max_examples``),
        ``num_train_records``, ``num_eval_records``, ``num_train_rows``, ``num_eval_rows`` and
        ``train_tokens`` (real tokens of the training rows).
    """

    train: TokenizedExamples
    eval: TokenizedExamples
    stats: dict[str, Any]

    def train_arrays(self) -> dict[str, np.ndarray]:
        """The training rows as the per-example fields an objective reads (``tokens`` int32,
        ``loss_mask`` float32)."""
        return {"tokens": self.train.tokens, "loss_mask": self.train.loss_mask}


def _check_local(path: str) -> None:
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded) and not glob.glob(expanded, recursive=True):
        raise FileNotFoundError(
            f"{path!r} does not exist; give a local text file, a folder or a glob of them."
        )


def build_public_data(
    path: str,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    sample_by: str = "document",
    text_column: str = "text",
    eval_fraction: float = 0.1,
    max_examples: int | None = None,
    seed: int = 0,
) -> PublicData:
    """Loads, splits and packs the server's public text.

    Args:
      path: a local ``.txt`` file, folder or glob (or JSON/JSONL/Parquet/CSV files with
        ``text_column``).
      tokenizer: the run's tokenizer.
      seq_len: row length T (the clients' ``data.seq_len``).
      sample_by: for ``.txt`` files, a record is the whole ``document``, a ``paragraph`` or a
        ``line``.
      text_column: the text column of structured files.
      eval_fraction: share of the records held out, in (0, 1); at least one record is held out
        and at least one kept for training.
      max_examples: keep a random subset of this many records (chosen by ``seed``); None: all.
      seed: seed of the subset and of the held-out split.

    Returns:
      The `PublicData`.

    Raises:
      FileNotFoundError: if ``path`` names no local file, folder or glob match.
      ValueError: if the files hold no usable text (every record empty), fewer than two
        records with text (one to train on, one to hold out), or lack ``text_column``.
    """
    _check_local(path)
    loaded = load_records(path, "text", text_column=text_column, sample_by=sample_by)
    texts = ["" if t is None else str(t) for t in loaded.column(loaded.text_column)]
    records = np.array([i for i, t in enumerate(texts) if t.strip()], dtype=np.int64)
    if records.size == 0:
        raise ValueError(f"{path!r} holds no usable text: all {len(texts)} records are empty.")
    rng = np.random.default_rng([seed, _SEED_STREAM])
    if max_examples is not None and max_examples < records.size:
        records = np.sort(rng.permutation(records)[:max_examples])
    if records.size < 2:
        raise ValueError(
            f"{path!r} holds {records.size} record with text; training and the held-out "
            "public perplexity need at least 2 (with sample_by document a .txt file is one "
            "record: use paragraph or line, or add files)."
        )
    num_eval = int(min(max(1, round(eval_fraction * records.size)), records.size - 1))
    is_eval = np.zeros(records.size, dtype=bool)
    is_eval[rng.permutation(records.size)[:num_eval]] = True

    def pack(ids: np.ndarray) -> TokenizedExamples:
        return tokenize_documents([texts[i] for i in ids.tolist()], tokenizer, seq_len)[0]

    train, held_out = pack(records[~is_eval]), pack(records[is_eval])
    stats = {
        "source": loaded.source,
        "files": len(loaded.files),
        "num_records": int(records.size),
        "num_train_records": int(records.size - num_eval),
        "num_eval_records": num_eval,
        "num_train_rows": len(train),
        "num_eval_rows": len(held_out),
        "train_tokens": int(train.loss_mask.sum()),
    }
    return PublicData(train=train, eval=held_out, stats=stats)
