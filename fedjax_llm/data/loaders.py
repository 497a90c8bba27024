"""Loading real datasets through Hugging Face `datasets`: local files, folders, globs, hub names.

`load_records` reads JSON / JSONL / Parquet / CSV / plain-text files (one file, a folder searched
recursively, a glob, or a list of them) or routes a hub dataset name to
`datasets.load_dataset(name, split=...)` (which needs internet). It detects the schema of the
records, or checks the one asked for:

| schema       | required columns                          | optional columns       |
|--------------|-------------------------------------------|------------------------|
| `messages`   | `messages` (list of `{role, content}`)    |                        |
| `preference` | `prompt`, `chosen`, `rejected`            |                        |
| `alpaca`     | `instruction`, `output`                   | `input`                |
| `dolly`      | `instruction`, `response`                 | `context`, `category`  |
| `text`       | `text` (or the `text_column` given)       |                        |

Auto-detection tries them in that order. Every record keeps all of its columns (category, user,
source, language, ...) for partitioning and per-category evaluation, plus `__file__`, the path of
the file it came from relative to the folder searched (one-client-per-file splits use it).

Each file is loaded as its own split of one `datasets` build, so rows are tagged with their file
without reading anything twice; that costs about 10 ms per file. Empty files among non-empty ones
are skipped and listed in `LoadedDataset.empty_files`; if every file is empty the load fails.

Text must be UTF-8. Bytes that are not are never replaced: the load fails with a `ValueError`
naming the file, the record (line for JSONL and text files, row for CSV, record for JSON arrays,
Parquet and hub data) and the fix (re-encode the file, e.g. with `iconv -f latin1 -t utf-8`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "FILE_COLUMN",
    "FORMATS",
    "SCHEMA_COLUMNS",
    "LoadedDataset",
    "load_preference_pairs",
    "load_records",
]

FILE_COLUMN = "__file__"
"""Column added to every record: the file it came from (the dataset name for hub datasets)."""

# Required and optional columns per schema; `text` uses the caller's `text_column`.
SCHEMA_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context", "category")),
    "text": (("text",), ()),
}
"""Schema name -> (required columns, optional columns), in auto-detection order."""

FORMATS = ("auto", "alpaca", "dolly", "messages", "text")
"""Values of `format` that `load_records` and `build_file_data` accept."""

_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
_TEXT_SAMPLE_BY = ("document", "paragraph", "line")
# Errors that mean a bug or a broken install, never a bad data file: not re-worded as file errors.
_BUGS = (AttributeError, NameError, ImportError, TypeError)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedDataset:
    """Records read from files or the hub, with their detected schema.

    Attributes:
        dataset: The `datasets.Dataset`: every original column plus `__file__`.
        schema: One of `SCHEMA_COLUMNS` (`messages`, `preference`, `alpaca`, `dolly`, `text`).
        source: The path or hub name as given.
        files: Files read (relative names, as in `__file__`); empty for hub datasets.
        empty_files: Files skipped because they hold no records.
        text_column: Column holding the text of `text` records.
    """

    dataset: Any
    schema: str
    source: str
    files: tuple[str, ...]
    empty_files: tuple[str, ...] = ()
    text_column: str = "text"

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        """Column names, `__file__` included."""
        return list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        """All values of one column as a Python list.

        Args:
            name: Column name.

        Returns:
            One value per record.

        Raises:
            ValueError: If there is no such column (the message lists the columns found).
        """
        if name not in self.dataset.column_names:
            raise ValueError(
                f"column {name!r} is not in {self.source!r}; its columns are "
                f"{sorted(self.dataset.column_names)} ({FILE_COLUMN!r} is the source file)."
            )
        # One arrow slice: much faster than iterating a datasets Column row by row.
        return self.dataset.select_columns([name])[:][name]

    def describe(self, index: int) -> str:
        """Names record `index` for error messages: its position within its file and the file.

        Args:
            index: Record index in the dataset.

        Returns:
            E.g. `"record 3 of 'users/alice.jsonl'"`.
        """
        files = self.column(FILE_COLUMN)
        name = files[index]
        first = index
        while first > 0 and files[first - 1] == name:
            first -= 1
        return f"record {index - first} of {name!r}"

    def select(self, indices: np.ndarray | Sequence[int]) -> LoadedDataset:
        """The records at `indices`, in that order.

        Args:
            indices: Record indices.

        Returns:
            A `LoadedDataset` with the same schema and source.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(self, dataset=self.dataset.select(idx.tolist()))


# ----------------------------------------------------------------------------------------------
# Finding files.
# ----------------------------------------------------------------------------------------------


def _supported(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in _BUILDERS


def _walk(folder: str) -> list[str]:
    """Supported files under `folder`, recursively, sorted, hidden files and folders skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in names if not n.startswith(".") and _supported(n)]
    return sorted(found)


def _looks_like_hub_name(path: str) -> bool:
    """`name` or `owner/name`, no file extension, not a relative or absolute path."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        return False
    return not os.path.splitext(path)[1] and os.sep not in path.replace("/", "")


def _resolve_files(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expands a file, folder, glob or list of them into supported files (absolute paths).

    Returns an empty list when `path` is a single string that names no local file, folder or glob
    match but could be a hub dataset name.
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths:
        raise ValueError("path is empty; give a file, a folder, a glob or a hub dataset name.")
    files: list[str] = []
    for p in paths:
        p = os.path.expanduser(os.fspath(p))
        if os.path.isfile(p):
            if not _supported(p):
                raise ValueError(
                    f"{p!r} has an unsupported extension; supported are {sorted(_BUILDERS)} "
                    "(json and jsonl: one record per object/line, txt: one document per file)."
                )
            files.append(p)
        elif os.path.isdir(p):
            found = _walk(p)
            if not found:
                some = sorted(os.listdir(p))[:10]
                raise FileNotFoundError(
                    f"folder {p!r} holds no data files with a supported extension "
                    f"{sorted(_BUILDERS)}; it contains {some}."
                )
            files += found
        elif any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            found = [f for f in found if _supported(f)]
            if not found:
                raise FileNotFoundError(
                    f"the glob {p!r} matches no files with a supported extension "
                    f"{sorted(_BUILDERS)}."
                )
            files += found
        elif len(paths) == 1 and _looks_like_hub_name(p):
            return []
        else:
            raise FileNotFoundError(
                f"no such file or folder: {p!r}. Give a file, a folder, a glob such as "
                "'data/*.jsonl', or a hub dataset name such as 'databricks/databricks-dolly-15k' "
                "(hub names need internet)."
            )
    files = [os.path.abspath(f) for f in files]
    duplicate = sorted({f for f in files if files.count(f) > 1})
    if duplicate:
        raise ValueError(f"these files were given more than once: {duplicate[:5]}.")
    return files


def _relative_names(files: Sequence[str]) -> list[str]:
    """Names relative to the deepest folder holding all files (a lone file: its base name)."""
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [os.path.relpath(f, root) for f in files]


def _is_empty(path: str) -> bool:
    """True for a file that certainly holds no records (cheap: small files are read)."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    if size > 4096:
        return False
    # Bytes, not text: deciding emptiness must neither fail on nor hide bytes that are not UTF-8
    # (those are reported with their line by `_invalid_utf8_error`).
    with open(path, "rb") as f:
        content = f.read().strip()
    if not content:
        return True
    if ext in (".json", ".jsonl"):
        return content in (b"[]", b"{}")
    if ext == ".csv":
        return len([line for line in content.splitlines() if line.strip()]) <= 1  # header only
    return False


# ----------------------------------------------------------------------------------------------
# Text that is not UTF-8.
# ----------------------------------------------------------------------------------------------

_TEXT_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")
_SCAN_CHUNK = 1 << 24  # bytes read at a time when looking for bytes that are not UTF-8
_SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a bad byte


def _first_invalid_utf8(path: str) -> tuple[int, int, bytes] | None:
    """(byte offset, 1-based line, offending bytes) of the first invalid UTF-8, or None.

    Reads the file in chunks cut after a newline (a newline byte never occurs inside a UTF-8
    sequence), so memory stays bounded and line numbers are exact.
    """
    offset, line, carry = 0, 1, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            data = carry + chunk
            if not data:
                return None
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if cut == 0:  # no newline yet: read on
                carry = data
                continue
            piece, carry = data[:cut], data[cut:]
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as err:
                where = line + piece.count(b"\n", 0, err.start)
                return offset + err.start, where, piece[err.start : err.end]
            offset += len(piece)
            line += piece.count(b"\n")
            if not chunk:
                return None


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _record_of_line(path: str, ext: str, line: int) -> str:
    """Names the record holding the first bad byte, found at `line`, as a reader counts them."""
    if ext in (".jsonl", ".txt"):
        return f"line {line}"
    if ext == ".csv":
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for row, fields in enumerate(csv.reader(f)):
                if any(_has_surrogate(x) for x in fields):
                    if row == 0:
                        return f"the header row (line {line})"
                    return f"row {row - 1} (data rows counted from 0; line {line})"
        return f"line {line}"
    # .json: an array of records (read whole, as `datasets` does), or JSON lines.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        try:
            document = json.load(f)
        except ValueError:
            return f"line {line}"
    if isinstance(document, list):
        for row, value in enumerate(document):
            if _has_surrogate(value):
                return f"record {row} (counted from 0; line {line})"
    return f"line {line}"


def _reencode_hint(path: str, offset: int) -> str:
    stem, ext = os.path.splitext(path)
    utf16 = False
    if offset == 0:
        with open(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    source = "utf-16" if utf16 else "latin1"
    guess = "it starts with a UTF-16 byte-order mark" if utf16 else "if it is Latin-1"
    return (
        f"re-encode the file as UTF-8, e.g. `iconv -f {source} -t utf-8 {path} > "
        f"{stem}.utf8{ext}` ({guess}; `file -i {path}` guesses the encoding) and load that"
    )


def _invalid_utf8_error(path: str, name: str) -> ValueError | None:
    """A ValueError naming the file, record and fix if `path` is not UTF-8 text, else None."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _TEXT_EXTENSIONS:
        return None
    found = _first_invalid_utf8(path)
    if found is None:
        return None
    offset, line, bad = found
    return ValueError(
        f"{name!r} is not valid UTF-8: {_record_of_line(path, ext, line)} holds the bytes "
        f"{bad!r} (byte offset {offset}), which are not UTF-8 text; "
        f"{_reencode_hint(path, offset)}."
    )


def _check_arrow_text(part: Any, path: str | None, name: str) -> None:
    """Raises a clear ValueError if loaded records hold strings that are not valid UTF-8.

    Arrow's JSON-lines and Parquet readers keep such bytes in string columns unchecked; they would
    fail later, deep inside formatting, with a bare UnicodeDecodeError. One full validation of the
    Arrow table is cheap (C++, no Python objects); only on failure is the record looked for.
    """
    import pyarrow as pa

    table = getattr(part.data, "table", part.data)
    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid as err:
        problem = str(err)
    if path is not None:
        text_error = _invalid_utf8_error(path, name)
        if text_error is not None:
            raise text_error
    for column in table.column_names:
        values = table.column(column)
        try:
            values.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        # Bisect with Python conversion (it decodes every string, nested ones too); error path only.
        lo, hi = 0, len(values)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                values.slice(lo, mid - lo).to_pylist()
                lo = mid
            except UnicodeDecodeError:
                hi = mid
        try:
            values.slice(lo, 1).to_pylist()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{name!r} is not valid UTF-8: record {lo} (counted from 0), column {column!r}, "
                f"holds the bytes {err.object[err.start : err.end]!r}, which are not UTF-8 text; "
                "re-encode the data as UTF-8 (e.g. `iconv -f latin1 -t utf-8` on the file it was "
                "made from) and write it again."
            ) from None
    raise ValueError(f"{name!r} holds data Arrow cannot read ({problem}); fix or remove it.")


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------


def _load_builder(builder: str, data_files: dict[str, list[str]], **kwargs: Any) -> Any:
    """`datasets.load_dataset` with its progress bars off for this call only."""
    import datasets
    import datasets.utils as ds_utils

    was_disabled = ds_utils.are_progress_bars_disabled()
    ds_utils.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    finally:
        if not was_disabled:
            ds_utils.enable_progress_bars()


def _diagnose(builder: str, files: list[str], names: list[str], err: Exception, **kwargs) -> None:
    """Finds which file made a multi-file load fail and raises a clear error about it."""
    columns: dict[str, list[str]] = {}
    for file, name in zip(files, names, strict=True):
        try:
            one = _load_builder(builder, {"f": [file]}, **kwargs)["f"]
        except _BUGS:
            raise
        except Exception as file_err:
            raise ValueError(
                f"could not read {name!r} as {builder} ({_root_cause(file_err)}); fix or remove "
                "that file."
            ) from file_err
        columns[name] = sorted(one.column_names)
    if len({tuple(c) for c in columns.values()}) > 1:
        shown = "; ".join(f"{n}: {c}" for n, c in list(columns.items())[:6])
        raise ValueError(
            f"the files do not all have the same columns ({shown}); give every file the same "
            "columns (write missing values as null) or load the groups of files separately."
        ) from err
    raise ValueError(
        f"could not load the {builder} files together ({_root_cause(err)}); each loads alone, so "
        "their column types probably differ (e.g. a number in one file, text in another)."
    ) from err


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def _load_files(files: list[str], sample_by: str, cache_dir: str | None) -> tuple[Any, list, list]:
    """Loads local files into one `datasets.Dataset` with a `__file__` column."""
    import datasets

    names = _relative_names(files)
    builders = sorted({_BUILDERS[os.path.splitext(f)[1].lower()] for f in files})
    if len(builders) > 1:
        exts = sorted({os.path.splitext(f)[1].lower() for f in files})
        raise ValueError(
            f"the files mix formats {exts}; point path at files of one format, e.g. a glob such "
            f"as 'folder/*{exts[0]}'."
        )
    builder = builders[0]
    empty = [n for f, n in zip(files, names, strict=True) if _is_empty(f)]
    keep = [(f, n) for f, n in zip(files, names, strict=True) if n not in set(empty)]
    if not keep:
        raise ValueError(
            f"the dataset is empty: {', '.join(repr(n) for n in empty[:10])} "
            f"{'holds' if len(empty) == 1 else 'hold'} no records."
        )
    files, names = [f for f, _ in keep], [n for _, n in keep]
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if builder == "text":
        kwargs["sample_by"] = sample_by
    # One split per file: rows come back grouped by file without reading anything twice.
    data_files = {f"f{i}": [f] for i, f in enumerate(files)}
    try:
        splits = _load_builder(builder, data_files, **kwargs)
    except _BUGS:
        raise
    except Exception as err:
        for file, name in zip(files, names, strict=True):
            text_error = _invalid_utf8_error(file, name)
            if text_error is not None:
                raise text_error from None
        if len(files) == 1:
            raise ValueError(
                f"could not read {names[0]!r} as {builder} ({_root_cause(err)}); fix the file "
                "or check that its extension matches its content."
            ) from err
        _diagnose(builder, files, names, err, **kwargs)
    parts = [splits[f"f{i}"] for i in range(len(files))]
    for part, file, name in zip(parts, files, names, strict=True):
        _check_arrow_text(part, file, name)
    sizes = [len(p) for p in parts]
    empty += [n for n, s in zip(names, sizes, strict=True) if s == 0]
    if sum(sizes) == 0:
        raise ValueError(f"the dataset is empty: {names[:10]} hold no records.")
    try:
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as err:
        _diagnose(builder, files, names, err, **kwargs)
    if FILE_COLUMN in dataset.column_names:
        raise ValueError(
            f"the data has a column named {FILE_COLUMN!r}, which is reserved for the source file "
            "name; rename that column."
        )
    dataset = dataset.add_column(FILE_COLUMN, np.repeat(np.array(names), sizes).tolist())
    return dataset, names, empty


def _load_hub(name: str, split: str, cache_dir: str | None) -> Any:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise ValueError(
            f"could not load {name!r}: no local file or folder has that name, and loading it as "
            f"a Hugging Face hub dataset (split {split!r}) failed ({_root_cause(err)}). Hub "
            "datasets need internet; on an offline machine copy the files here and pass their "
            "path."
        ) from err
    _check_arrow_text(dataset, None, name)
    if FILE_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(FILE_COLUMN, [name] * len(dataset))
    if len(dataset) == 0:
        raise ValueError(f"the dataset is empty: {name!r} split {split!r} has no records.")
    return dataset


def _expected(text_column: str) -> str:
    parts = []
    for schema, (required, optional) in SCHEMA_COLUMNS.items():
        req = (text_column,) if schema == "text" else required
        extra = f" (optional {list(optional)})" if optional else ""
        parts.append(f"{schema} {list(req)}{extra}")
    return "; ".join(parts)


def _detect_schema(columns: Sequence[str], format: str, text_column: str, source: str) -> str:
    """Returns the schema of `columns`, checking the one asked for, with clear errors."""
    found = sorted(c for c in columns if c != FILE_COLUMN)
    if format == "auto":
        for schema, (required, _) in SCHEMA_COLUMNS.items():
            req = (text_column,) if schema == "text" else required
            if all(c in columns for c in req):
                return schema
        raise ValueError(
            f"cannot tell the schema of {source!r}: its columns are {found}, but the schemas "
            f"expect: {_expected(text_column)}. Rename the columns, or pass format='text' with "
            "text_column=<your text column>."
        )
    if format not in SCHEMA_COLUMNS:
        raise ValueError(
            f"format: unknown value {format!r}; valid values are {list(FORMATS)} (preference "
            "pairs load with load_preference_pairs)."
        )
    required = (text_column,) if format == "text" else SCHEMA_COLUMNS[format][0]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"format={format!r} needs columns {list(required)}, but {source!r} lacks {missing}; "
            f"its columns are {found}. The schemas expect: {_expected(text_column)}."
        )
    return format


def load_records(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    format: str = "auto",
    *,
    text_column: str = "text",
    sample_by: str = "document",
    split: str = "train",
    cache_dir: str | None = None,
) -> LoadedDataset:
    """Loads records from local files or a hub dataset and detects or checks their schema.

    Args:
        path: A file (`.json`, `.jsonl`, `.parquet`, `.csv`, `.txt`), a folder (searched
            recursively, hidden files skipped), a glob such as `'data/**/*.jsonl'`, a list of
            these, or a hub dataset name such as `'databricks/databricks-dolly-15k'` (only when no
            local path of that name exists; needs internet).
        format: `'auto'` to detect the schema, or one of `'alpaca'`, `'dolly'`, `'messages'`,
            `'text'` to require it (`'preference'` is what `load_preference_pairs` uses).
        text_column: Column holding the text of plain-text records (`.txt` files give `text`).
        sample_by: For `.txt` files: `'document'` (one record per file), `'paragraph'` or
            `'line'`.
        split: Split of a hub dataset, e.g. `'train'` or `'train[:1000]'`; local files are read
            whole.
        cache_dir: Cache folder of `datasets` (its default cache when None).

    Returns:
        The `LoadedDataset`: records with every column plus `__file__`, and the schema.

    Raises:
        FileNotFoundError: If a path does not exist or a folder/glob holds no supported file.
        ValueError: If the files mix formats, a file cannot be parsed or files disagree on
            columns (the message names the file), a record is not valid UTF-8 (it names the
            file, the line or record, and how to re-encode it), every file is empty (it names
            them), the columns fit no schema or lack what `format` needs (it lists the columns
            found and those each schema expects), or an argument is invalid.
    """
    if format not in FORMATS and format != "preference":
        raise ValueError(f"format: unknown value {format!r}; valid values are {list(FORMATS)}.")
    if sample_by not in _TEXT_SAMPLE_BY:
        raise ValueError(
            f"sample_by: unknown value {sample_by!r}; valid values are {list(_TEXT_SAMPLE_BY)}."
        )
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column must be a non-empty column name, got {text_column!r}.")
    source = os.fspath(path) if isinstance(path, str | os.PathLike) else str(list(path))
    files = _resolve_files(path)
    if files:
        dataset, names, empty = _load_files(files, sample_by, cache_dir)
    else:
        dataset, names, empty = _load_hub(source, split, cache_dir), [], []
    schema = _detect_schema(dataset.column_names, format, text_column, source)
    return LoadedDataset(
        dataset=dataset,
        schema=schema,
        source=source,
        files=tuple(names),
        empty_files=tuple(empty),
        text_column=text_column,
    )


def _check_preference_value(value: Any, column: str, where: Any) -> None:
    """Raises a clear error unless `value` is non-empty text or a list of messages.

    `where()` names the record; it is only called on the error path (it scans the file column).
    """
    if isinstance(value, str):
        if value.strip():
            return
        problem = "is empty"
    elif isinstance(value, list) and value:
        bad = [m for m in value if not (isinstance(m, dict) and {"role", "content"} <= set(m))]
        if not bad:
            return
        problem = f"has a message without role/content: {bad[0]!r}"
    else:
        problem = f"is {value!r}, not a string or a list of messages"
    raise ValueError(
        f"preference pairs: {column!r} of {where()} {problem}; every pair needs a non-empty "
        "prompt, chosen and rejected (text, or lists of {'role', 'content'} messages)."
    )


def load_preference_pairs(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    split: str = "train",
    cache_dir: str | None = None,
) -> LoadedDataset:
    """Loads and validates preference pairs (`prompt`, `chosen`, `rejected`) for later use.

    Each of the three values is text, or a list of `{role, content}` messages (the conversational
    form TRL uses). Other columns are kept, as in `load_records`.

    Args:
        path: As in `load_records`.
        split: Split of a hub dataset.
        cache_dir: Cache folder of `datasets`.

    Returns:
        A `LoadedDataset` with schema `'preference'`.

    Raises:
        FileNotFoundError: As in `load_records`.
        ValueError: As in `load_records`, or if a value is empty or malformed (the message names
            the record, its file and the column).
    """
    loaded = load_records(path, "preference", split=split, cache_dir=cache_dir)
    _check_preference_pairs(loaded)
    return loaded


def _check_preference_pairs(loaded: LoadedDataset) -> None:
    """Checks every prompt, chosen and rejected value (see `_check_preference_value`)."""
    for column in SCHEMA_COLUMNS["preference"][0]:
        for i, value in enumerate(loaded.column(column)):
            _check_preference_value(value, column, lambda i=i: loaded.describe(i))
