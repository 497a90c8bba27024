"""Tests for fedjax_llm.data.loaders: every file format, schema detection and error path."""

import json
import re

import pytest

pytest.importorskip("datasets")

import pandas as pd  # noqa: E402

from fedjax_llm.data import (  # noqa: E402
    FILE_COLUMN,
    LoadedDataset,
    load_preference_pairs,
    load_records,
)

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "user": "ann"},
    {"instruction": "Name a color.", "input": "", "output": "Blue.", "user": "bob"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "user": "ann"},
]
DOLLY = [
    {
        "instruction": "Who wrote it?",
        "context": "Hamlet is a play.",
        "response": "Shakespeare.",
        "category": "closed_qa",
    },
    {
        "instruction": "Write a line.",
        "context": "",
        "response": "The sea is wide.",
        "category": "creative_writing",
    },
]
MESSAGES = [
    {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "language": "en",
    },
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "yo"},
            {"role": "assistant", "content": "hey"},
        ],
        "language": "fr",
    },
]
TEXT = [{"text": "first document", "source": "web"}, {"text": "second one", "source": "books"}]
PREFERENCE = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
]


def write(path, records, kind=None):
    """Writes records as jsonl/json/parquet/csv by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = kind or path.suffix[1:]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "parquet":
        pd.DataFrame(records).to_parquet(path)
    elif kind == "csv":
        pd.DataFrame(records).to_csv(path, index=False)
    return path


def load(path, **kwargs):
    kwargs.setdefault(
        "cache_dir", str(path.parent / ".hf_cache") if hasattr(path, "parent") else None
    )
    return load_records(path, **kwargs)


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv"])
def test_formats_and_alpaca_detection(tmp_path, ext):
    path = write(tmp_path / f"data.{ext}", ALPACA)
    loaded = load(path)
    assert isinstance(loaded, LoadedDataset)
    assert loaded.schema == "alpaca" and len(loaded) == 3
    assert set(loaded.column_names) == {"instruction", "input", "output", "user", FILE_COLUMN}
    assert loaded.column("output") == ["5", "Blue.", "Hi!"]
    assert loaded.column("user") == ["ann", "bob", "ann"]  # other columns are kept
    assert loaded.column(FILE_COLUMN) == [f"data.{ext}"] * 3
    assert loaded.files == (f"data.{ext}",) and loaded.empty_files == ()


@pytest.mark.parametrize(
    "records, schema",
    [(DOLLY, "dolly"), (MESSAGES, "messages"), (TEXT, "text"), (PREFERENCE, "preference")],
)
def test_schema_detection(tmp_path, records, schema):
    loaded = load(write(tmp_path / "d.jsonl", records))
    assert loaded.schema == schema
    if schema == "messages":
        assert loaded.column("messages")[1][0] == {"role": "system", "content": "Be kind."}
        assert loaded.column("language") == ["en", "fr"]
    if schema == "dolly":
        assert loaded.column("category") == ["closed_qa", "creative_writing"]


def test_messages_in_parquet(tmp_path):
    loaded = load(write(tmp_path / "chat.parquet", MESSAGES))
    assert loaded.schema == "messages"
    assert loaded.column("messages")[0][1] == {"role": "assistant", "content": "hello"}


def test_forced_format_and_text_column(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"body": "abc", "instruction": "x", "output": "y"}])
    assert load(path).schema == "alpaca"
    forced = load(path, format="text", text_column="body")
    assert forced.schema == "text" and forced.text_column == "body"
    # Alpaca and text columns both present: auto picks the instruction schema first.
    assert load(path, text_column="body").schema == "alpaca"


def test_txt_one_document_per_file(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("another document")
    (tmp_path / "docs" / ".hidden.txt").write_text("skipped")
    loaded = load(tmp_path / "docs")
    assert loaded.schema == "text"
    assert loaded.column("text") == ["first line\nsecond line\n", "another document"]
    assert loaded.column(FILE_COLUMN) == ["a.txt", "sub/b.txt"]
    by_line = load(tmp_path / "docs", sample_by="line")
    assert by_line.column("text")[:2] == ["first line", "second line"]
    assert by_line.column(FILE_COLUMN) == ["a.txt", "a.txt", "sub/b.txt"]


def test_folder_glob_and_list_tag_files(tmp_path):
    write(tmp_path / "users" / "ann.jsonl", ALPACA[:2])
    write(tmp_path / "users" / "bob.jsonl", ALPACA[2:])
    write(tmp_path / "users" / "carl.jsonl", ALPACA)
    (tmp_path / "users" / "notes.md").write_text("not data")
    folder = load(tmp_path / "users")
    assert folder.files == ("ann.jsonl", "bob.jsonl", "carl.jsonl")
    assert folder.column(FILE_COLUMN) == ["ann.jsonl"] * 2 + ["bob.jsonl"] + ["carl.jsonl"] * 3
    assert folder.column("instruction")[2] == ALPACA[2]["instruction"]
    glob = load_records(str(tmp_path / "users" / "[ab]*.jsonl"), cache_dir=str(tmp_path / "c"))
    assert glob.files == ("ann.jsonl", "bob.jsonl") and len(glob) == 3
    listed = load_records(
        [tmp_path / "users" / "bob.jsonl", tmp_path / "users" / "ann.jsonl"],
        cache_dir=str(tmp_path / "c"),
    )
    assert listed.column(FILE_COLUMN) == ["bob.jsonl", "ann.jsonl", "ann.jsonl"]
    assert listed.describe(2) == "record 1 of 'ann.jsonl'"


def test_select(tmp_path):
    loaded = load(write(tmp_path / "d.jsonl", ALPACA))
    sub = loaded.select([2, 0])
    assert sub.column("output") == ["Hi!", "5"] and sub.schema == "alpaca"


def test_empty_files_skipped_and_reported(tmp_path):
    write(tmp_path / "f" / "a.jsonl", ALPACA)
    (tmp_path / "f" / "b.jsonl").write_text("")
    (tmp_path / "f" / "c.json").write_text("[]")
    loaded = load(tmp_path / "f")
    assert len(loaded) == 3 and loaded.files == ("a.jsonl",)
    assert loaded.empty_files == ("b.jsonl", "c.json")


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]"), ("head.csv", "a,b\n")],
)
def test_empty_dataset_names_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"empty.*'{name}'"):
        load(tmp_path / name)


def test_empty_parquet(tmp_path):
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="empty.*none.parquet"):
        load(tmp_path / "none.parquet")


def test_missing_columns_name_found_and_expected(tmp_path):
    path = write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError,
        match=r"columns are \['answer', 'question'\].*schemas expect: messages \['messages'\]"
        r".*alpaca \['instruction', 'output'\].*dolly.*text \['text'\]",
    ):
        load(path)
    with pytest.raises(
        ValueError,
        match=r"format='dolly' needs.*lacks \['instruction', "
        r"'response'\].*\['answer', 'question'\]",
    ):
        load(path, format="dolly")
    with pytest.raises(ValueError, match=r"format='text'.*lacks \['body'\]"):
        load(path, format="text", text_column="body")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "chatml"}, "format.*valid values"),
        ({"sample_by": "word"}, "sample_by"),
        ({"text_column": ""}, "text_column"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load(write(tmp_path / "d.jsonl", ALPACA), **kwargs)


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder.*missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no data files.*readme\.md"):
        load_records(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="glob.*matches no files"):
        load_records(str(tmp_path / "*.parquet"))
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_records(tmp_path / "x.xlsx")


def test_mixed_formats_rejected(tmp_path):
    write(tmp_path / "m" / "a.jsonl", ALPACA)
    write(tmp_path / "m" / "b.csv", ALPACA)
    with pytest.raises(ValueError, match=r"mix formats \['.csv', '.jsonl'\]"):
        load(tmp_path / "m")


def test_malformed_file_is_named(tmp_path):
    write(tmp_path / "m" / "a.jsonl", ALPACA)
    (tmp_path / "m" / "b.jsonl").write_text('{"instruction": "x", "output": \n')
    with pytest.raises(ValueError, match="could not read 'b.jsonl'"):
        load(tmp_path / "m")
    with pytest.raises(ValueError, match="could not read 'b.jsonl'"):
        load(tmp_path / "m" / "b.jsonl")


def test_files_with_different_columns_are_named(tmp_path):
    write(tmp_path / "m" / "a.jsonl", [{"instruction": "x", "output": "y"}])
    write(tmp_path / "m" / "b.jsonl", [{"instruction": "x", "output": "y", "category": "c"}])
    with pytest.raises(ValueError, match=r"same columns.*a\.jsonl.*b\.jsonl.*category"):
        load(tmp_path / "m")


def test_reserved_file_column(tmp_path):
    with pytest.raises(ValueError, match="__file__.*reserved"):
        load(write(tmp_path / "d.jsonl", [{"text": "a", FILE_COLUMN: "x"}]))


def test_column_error_lists_columns(tmp_path):
    loaded = load(write(tmp_path / "d.jsonl", ALPACA))
    with pytest.raises(ValueError, match=r"'category' is not in.*\['__file__', 'input'"):
        loaded.column("category")


def test_hub_names_route_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        if name == "nobody/missing":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list(DOLLY)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_records("databricks/databricks-dolly-15k", split="train[:2]")
    assert calls == [("databricks/databricks-dolly-15k", "train[:2]")]
    assert loaded.schema == "dolly" and loaded.files == ()
    assert loaded.column(FILE_COLUMN) == ["databricks/databricks-dolly-15k"] * 2
    with pytest.raises(ValueError, match=r"'nobody/missing'.*no local file.*hub.*offline"):
        load_records("nobody/missing")


def test_preference_pairs(tmp_path):
    rows = PREFERENCE + [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        }
    ]
    loaded = load_preference_pairs(write(tmp_path / "p.json", rows[:2]), cache_dir=str(tmp_path))
    assert loaded.schema == "preference" and len(loaded) == 2
    assert loaded.column("chosen") == ["4", "Paris"]
    chat = load_preference_pairs(write(tmp_path / "c.jsonl", rows[2:]), cache_dir=str(tmp_path))
    assert chat.column("rejected")[0][0]["content"] == "go away"


def test_preference_pairs_errors(tmp_path):
    bad = write(
        tmp_path / "bad.jsonl", PREFERENCE + [{"prompt": "q", "chosen": " ", "rejected": "r"}]
    )
    with pytest.raises(ValueError, match=r"'chosen' of record 2 of 'bad.jsonl' is empty"):
        load_preference_pairs(bad, cache_dir=str(tmp_path))
    missing = write(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"lacks \['rejected'\]"):
        load_preference_pairs(missing, cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Text that is not UTF-8 (Latin-1 bytes such as b"\xe9", or b"\xff\xfe").
# ------------------------------------------------------------------------------------------------

BAD = b"caf\xe9 \xff\xfe bad"  # Latin-1 'é' and a stray UTF-16 BOM inside a value


def _jsonl_line(record):
    return json.dumps(record).encode()


def _bad_parquet(path, nested=False):
    """A Parquet file whose string column holds bytes that are not UTF-8 in row 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array([b"fine", b"also fine", BAD, b"ok"], pa.binary()).view(pa.string())
    if nested:
        role = pa.array(["user"] * 4)
        turns = pa.StructArray.from_arrays([role, values], names=["role", "content"])
        column = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4], pa.int32()), turns)
        pq.write_table(pa.table({"messages": column}), path)
    else:
        pq.write_table(pa.table({"text": values, "n": [0, 1, 2, 3]}), path)


NON_UTF8 = {
    # name: (file name, content bytes or writer, load kwargs, where the message must point)
    "jsonl": (
        "d.jsonl",
        b"\n".join(
            [
                _jsonl_line({"text": "one"}),
                _jsonl_line({"text": "two"}),
                b'{"text": "' + BAD + b'"}',
                _jsonl_line({"text": "four"}),
            ]
        )
        + b"\n",
        {},
        r"line 3\b",
    ),
    "jsonl_messages": (
        "chat.jsonl",
        _jsonl_line(MESSAGES[0])
        + b'\n{"messages": [{"role": "user", "content": "'
        + BAD
        + b'"}, {"role": "assistant", "content": "x"}]}\n',
        {},
        r"line 2\b",
    ),
    "json_array": (
        "d.json",
        b'[\n {"text": "one"},\n {"text": "two"},\n {"text": "' + BAD + b'"}\n]',
        {},
        r"record 2 \(counted from 0; line 4\)",
    ),
    "json_lines_in_json": (
        "d.json",
        _jsonl_line({"text": "one"}) + b'\n{"text": "' + BAD + b'"}\n',
        {},
        r"line 2\b",
    ),
    "txt_document": ("d.txt", b"first line\nsecond " + BAD + b"\nthird\n", {}, r"line 2\b"),
    "txt_line": (
        "d.txt",
        b"first line\nsecond line\n" + BAD + b"\n",
        {"sample_by": "line"},
        r"line 3\b",
    ),
    "csv": (
        "d.csv",
        b'text,category\none,a\n"multi\nline two",b\n' + BAD + b",c\n",
        {},
        r"row 2 \(data rows counted from 0; line 5\)",
    ),
    "csv_header": ("d.csv", b"t\xe9xt,category\none,a\n", {"format": "auto"}, "header row"),
    "parquet": ("d.parquet", _bad_parquet, {}, r"record 2 \(counted from 0\), column 'text'"),
    "parquet_nested": (
        "d.parquet",
        lambda path: _bad_parquet(path, nested=True),
        {},
        r"record 2 \(counted from 0\), column 'messages'",
    ),
}


@pytest.mark.parametrize("case", sorted(NON_UTF8))
def test_non_utf8_record_is_named_with_the_fix(tmp_path, case):
    name, content, kwargs, where = NON_UTF8[case]
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        loaded = load(path, **kwargs)
        loaded.column(loaded.column_names[0])  # a silently kept bad record would fail here
    err = info.value
    # Not a bare UnicodeDecodeError (a ValueError subclass) from deep inside Arrow.
    assert type(err) is ValueError, repr(err)
    message = str(err)
    assert message.startswith(f"{name!r} is not valid UTF-8"), message
    assert re.search(where, message), message
    assert "iconv -f" in message and "-t utf-8" in message


def test_non_utf8_file_among_good_ones_is_the_one_named(tmp_path):
    write(tmp_path / "m" / "a.jsonl", ALPACA)
    (tmp_path / "m" / "b.jsonl").write_bytes(
        _jsonl_line(ALPACA[0]) + b'\n{"instruction": "' + BAD + b'", "output": "y"}\n'
    )
    write(tmp_path / "m" / "c.jsonl", ALPACA)
    with pytest.raises(ValueError, match=r"^'b\.jsonl' is not valid UTF-8: line 2\b"):
        load(tmp_path / "m")


def test_utf16_file_gets_the_utf16_hint(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("hello\nworld\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"line 1\b.*iconv -f utf-16 -t utf-8"):
        load(path)


def test_valid_non_ascii_utf8_is_kept_exactly(tmp_path):
    texts = ["café ☕", "naïve 東京", "emoji 🙂 ok"]
    for ext in ("jsonl", "json", "csv", "parquet"):
        loaded = load(write(tmp_path / ext / f"d.{ext}", [{"text": t} for t in texts]))
        assert loaded.column("text") == texts, ext
    (tmp_path / "d.txt").write_text("\n".join(texts), encoding="utf-8")
    assert load(tmp_path / "d.txt", sample_by="line").column("text") == texts


def test_utf8_scan_is_exact_across_chunk_boundaries(tmp_path, monkeypatch):
    from fedjax_llm.data import loaders

    # Chunks of 5 bytes cut multi-byte characters and lines anywhere.
    monkeypatch.setattr(loaders, "_SCAN_CHUNK", 5)
    good = "ab\ncafé ☕ long line without a newline for a while\n東京\n\nend".encode()
    path = tmp_path / "d.txt"
    path.write_bytes(good)
    assert loaders._first_invalid_utf8(str(path)) is None
    path.write_bytes(good + b"\nx\xe9y")
    assert loaders._first_invalid_utf8(str(path)) == (len(good) + 2, 6, b"\xe9")
    path.write_bytes(b"\xff" + good)
    assert loaders._first_invalid_utf8(str(path)) == (0, 1, b"\xff")
