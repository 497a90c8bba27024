"""Tests for fedjax_llm.data.file_data: real files -> TaskData, natural and label-skew splits."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_fixtures import write_tiny_tokenizer  # noqa: E402

from fedjax_llm.data import (  # noqa: E402
    CHATML_TEMPLATE,
    ByteTokenizer,
    TaskData,
    TokenizedExamples,
    build_file_data,
    format_partition_stats,
    load_tokenizer,
)

CATEGORIES = ["open_qa", "creative_writing", "classification"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dolly_users(root, sizes):
    """One Dolly file per user; every instruction names its user and category."""
    for u, n in enumerate(sizes):
        write_jsonl(
            root / f"user{u}.jsonl",
            [
                {
                    "instruction": f"user{u} asks {CATEGORIES[(u + j) % 3]} number {j}",
                    "context": "some context" if j % 2 else "",
                    "response": f"answer {j}",
                    "category": CATEGORIES[(u + j) % 3],
                    "user": f"person{u % 3}",
                }
                for j in range(n)
            ],
        )
    return root


def build(path, tok, **kwargs):
    kwargs = {"seq_len": 96, "cache_dir": str(path.parent / ".cache"), **kwargs}
    return build_file_data(path, tokenizer=tok, **kwargs)


def prompts(tok, examples: TokenizedExamples):
    return [
        tok.decode(row[:p]) for row, p in zip(examples.tokens, examples.prompt_len, strict=True)
    ]


def test_natural_one_client_per_file(tmp_path, tok):
    data = build(dolly_users(tmp_path / "users", [6, 8, 10, 12]), tok, label_column="category")
    assert isinstance(data, TaskData)
    stats = data.stats
    assert stats["client_names"] == [f"user{u}.jsonl" for u in range(4)]
    assert data.train.num_clients == data.client_test.num_clients == 4
    assert stats["num_records"] == 36 and stats["num_eval"] == round(0.1 * 36)
    assert stats["num_train"] + stats["num_client_test"] + stats["num_eval"] == 36
    for m in range(4):
        for part in (data.train, data.client_test):
            texts = prompts(tok, part.client_slice(m))
            assert texts and all(f"user{m} asks" in t for t in texts)
    np.testing.assert_array_equal(stats["client_num_train"], data.train.client_count)
    np.testing.assert_array_equal(stats["client_num_test"], data.client_test.client_count)
    # Labels are the categories; eval reports per category.
    assert data.eval.label_names == tuple(sorted(CATEGORIES))
    for part in (data.train.examples, data.client_test.examples, data.eval):
        for text, label in zip(prompts(tok, part), part.labels, strict=True):
            assert f"asks {part.label_names[label]} number" in text
    json.dumps(stats)
    assert stats["schema"] == "dolly" and stats["task"] == "instruction"
    assert stats["exact_match_meaningful"] is True
    text = format_partition_stats(stats)
    assert "4 clients" in text and "dropped: 0 records too long" in text


def test_natural_drops_and_reports_small_clients(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [6, 6, 1])
    seen_drop = False
    for seed in range(4):
        data = build(root, tok, seed=seed)
        dropped = data.stats["dropped_clients"]
        small_in_eval = any("user2 asks" in t for t in prompts(tok, data.eval))
        assert "user2.jsonl" not in data.stats["client_names"]
        if small_in_eval:
            assert dropped == {"count": 0, "examples": 0, "names": []}
        else:
            assert dropped == {"count": 1, "examples": 1, "names": ["user2.jsonl"]}
            assert "1 clients with < 2 examples (1 examples)" in format_partition_stats(data.stats)
            seen_drop = True
    assert seen_drop


def test_natural_by_column_and_subset(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [6, 6, 6, 6, 6, 6])
    data = build(root, tok, client_column="user")
    assert data.stats["client_names"] == ["person0", "person1", "person2"]
    for m, name in enumerate(data.stats["client_names"]):
        users = {int(name[-1]), int(name[-1]) + 3}
        for t in prompts(tok, data.train.client_slice(m)):
            assert any(f"user{u} asks" in t for u in users)
    sub = build(root, tok, client_column="user", num_clients=2, seed=1)
    assert sub.train.num_clients == 2 and sub.stats["unselected_clients"] == 1


def test_nothing_left_for_natural_is_an_error(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="none of the .* groups has min_examples=2"):
        build(root, tok, eval_fraction=0.2)


@pytest.mark.parametrize(
    "partitioner, kwargs",
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"classes_per_client": 1})],
)
def test_label_partitioners_on_real_data(tmp_path, tok, partitioner, kwargs):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {
                "instruction": f"item {i} about {CATEGORIES[i % 3]}",
                "input": "",
                "output": str(i),
                "category": CATEGORIES[i % 3],
            }
            for i in range(90)
        ],
    )
    data = build(
        path,
        tok,
        partitioner=partitioner,
        partitioner_kwargs=kwargs,
        num_clients=6,
        label_column="category",
    )
    assert data.train.num_clients == 6 and data.stats["partitioner"] == partitioner
    assert data.stats["client_names"] is None and data.stats["schema"] == "alpaca"
    if partitioner == "pathological":
        for m in range(6):
            labels = set(data.train.client_slice(m).labels.tolist())
            labels |= set(data.client_test.client_slice(m).labels.tolist())
            assert len(labels) == 1
    for text, label in zip(
        prompts(tok, data.train.examples), data.train.examples.labels, strict=True
    ):
        assert f"about {data.eval.label_names[label]}" in text


def test_no_label_column_single_label(tmp_path, tok):
    data = build(dolly_users(tmp_path / "u", [5, 5]), tok)
    assert data.eval.label_names == ("all",)
    assert set(data.train.examples.labels.tolist()) == {0}


def test_responses_and_loss_mask(tmp_path, tok):
    data = build(dolly_users(tmp_path / "u", [6, 6]), tok, label_column="category")
    ex = data.train.examples
    for r in range(len(ex)):
        masked = ex.tokens[r][ex.loss_mask[r] > 0]
        assert tok.decode(masked) == ex.responses[r]
        assert ex.responses[r].startswith("answer ")
        assert ex.loss_mask[r, : ex.prompt_len[r]].sum() == 0


def test_text_packing_by_file(tmp_path, tok):
    docs = tmp_path / "docs"
    docs.mkdir()
    words = {"a": "the quick brown fox ", "b": "one two three four ", "c": "hello world please "}
    for name, phrase in words.items():
        for k in range(4):
            (docs / f"{name}{k}.txt").write_text(phrase * (3 + k))
    data = build(
        docs,
        tok,
        seq_len=16,
        label_column="__file__",
        partitioner="iid",
        num_clients=3,
        eval_fraction=0.1,
    )
    assert data.stats["task"] == "text" and data.stats["exact_match_meaningful"] is False
    assert data.eval.label_names == tuple(sorted(f"{n}{k}.txt" for n in words for k in range(4)))
    ex = data.train.examples
    np.testing.assert_array_equal(ex.loss_mask, (ex.tokens != tok.pad_id).astype(np.float32))
    for row, label in zip(ex.tokens, ex.labels, strict=True):
        text = tok.decode(row, stop_at_eos=False)
        assert text in words[data.eval.label_names[label][0]] * 20  # rows never mix files
    assert set(ex.responses) == {""} and np.all(ex.prompt_len == 1)
    unpacked = build(
        docs, tok, seq_len=16, label_column="__file__", partitioner="iid", num_clients=3, pack=False
    )
    assert unpacked.stats["truncated"] > 0
    assert unpacked.stats["num_train"] + unpacked.stats["num_client_test"] < (
        data.stats["num_train"] + data.stats["num_client_test"]
    )


def test_text_natural_rows_stay_in_their_client(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"text": f"user{i % 3} " * 9, "user": f"u{i % 3}"} for i in range(30)],
    )
    data = build(path, tok, seq_len=8, client_column="user")
    for m, name in enumerate(data.stats["client_names"]):
        for row in data.train.client_slice(m).tokens:
            assert tok.decode(row, stop_at_eos=False) in f"user{name[-1]} " * 100


def test_deterministic_by_seed(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [8, 8, 8])
    kwargs = {
        "label_column": "category",
        "partitioner": "dirichlet",
        "num_clients": 3,
        "partitioner_kwargs": {"alpha": 0.5},
    }
    a, b, c = (
        build(root, tok, seed=5, **kwargs),
        build(root, tok, seed=5, **kwargs),
        build(root, tok, seed=6, **kwargs),
    )
    for x, y in [(a.train, b.train), (a.client_test, b.client_test)]:
        np.testing.assert_array_equal(x.examples.tokens, y.examples.tokens)
        np.testing.assert_array_equal(x.client_count, y.client_count)
    np.testing.assert_array_equal(a.eval.tokens, b.eval.tokens)
    assert a.stats == b.stats
    assert not np.array_equal(a.train.examples.tokens, c.train.examples.tokens)


def test_max_examples(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [10, 10, 10])
    data = build(root, tok, max_examples=12)
    assert data.stats["num_records"] == 12
    assert data.stats["num_train"] + data.stats["num_client_test"] + data.stats["num_eval"] == 12


def test_truncation_drops_are_counted(tmp_path, tok):
    rows = [{"instruction": "short", "output": "ok"} for _ in range(10)]
    rows += [{"instruction": "long " * 40, "output": "ok"} for _ in range(5)]
    data = build(write_jsonl(tmp_path / "a.jsonl", rows), tok, seq_len=24)
    stats = data.stats
    assert stats["dropped_by_truncation"] == 5
    assert stats["format_pool"]["dropped_too_long"] + stats["format_eval"]["dropped_too_long"] == 5
    assert "dropped: 5 records too long" in format_partition_stats(stats)


def test_byte_tokenizer_with_template(tmp_path):
    data = build(
        dolly_users(tmp_path / "users", [6, 6]),
        ByteTokenizer(),
        seq_len=128,
        chat_template=CHATML_TEMPLATE,
    )
    assert data.train.num_clients == 2
    tok = ByteTokenizer()
    ex = data.train.examples
    assert tok.decode(ex.tokens[0, : ex.prompt_len[0]]).endswith("<|im_start|>assistant\n")


def test_missing_template_error(tmp_path):
    base = load_tokenizer(write_tiny_tokenizer(tmp_path / "base", chat_template=False))
    root = dolly_users(tmp_path / "users", [6, 6])
    with pytest.raises(ValueError, match=r"no chat template.*format text"):
        build(root, base)
    # The suggested fix: train on a text column instead.
    data = build(root, base, format="text", text_column="response", pack=False)
    assert data.stats["task"] == "text"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"label_column": "topic"},
            r"label_column='topic' is not a column.*\['__file__', "
            r"'category', 'context'",
        ),
        ({"client_column": "author"}, r"client_column='author' is not a column.*'user'"),
        ({"client_column": None}, "natural' needs client_column"),
        ({"partitioner": "iid"}, "num_clients is required by partitioner 'iid'"),
        ({"partitioner": "nope"}, "partitioner.*valid names.*'natural'"),
        ({"format": "sharegpt"}, "format.*valid values"),
        ({"format": "alpaca"}, r"format='alpaca' needs.*lacks \['output'\]"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"eval_fraction": 0}, "eval_fraction"),
        ({"max_examples": 2}, "max_examples"),
        ({"seed": -1}, "seed"),
        ({"loss_on": "every"}, "loss_on"),
        ({"partitioner_kwargs": {"min_examples": 1}}, "min_examples"),
        ({"seq_len": 12}, "dropped all"),
    ],
)
def test_bad_arguments(tmp_path, tok, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(dolly_users(tmp_path / "users", [6, 6]), tok, **overrides)


def test_preference_data_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4)
    with pytest.raises(ValueError, match="preference pairs.*load_preference_pairs"):
        build(path, tok)


def test_non_utf8_record_fails_with_file_and_line(tmp_path, tok):
    root = dolly_users(tmp_path / "users", [6, 6])
    lines = (root / "user1.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"answer", b"r\xe9ponse")  # a Latin-1 byte in record 4
    (root / "user1.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"'user1\.jsonl' is not valid UTF-8: line 4\b.*iconv"):
        build(root, tok, label_column="category")


@pytest.mark.parametrize("over", ["labels", "clients"])
def test_dirichlet_convention_from_the_data_config(tmp_path, tok, over):
    from fedjax_llm.config import DataConfig

    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": f"item {i}", "output": str(i), "category": CATEGORIES[i % 3]}
            for i in range(300)
        ],
    )
    config = DataConfig(partitioner="dirichlet", dirichlet_alpha=0.5, dirichlet_over=over)
    data = build(
        path,
        tok,
        partitioner="dirichlet",
        partitioner_kwargs=config.partitioner_kwargs(),
        num_clients=8,
        label_column="category",
    )
    stats = data.stats
    assert stats["partitioner_kwargs"]["over"] == over
    assert stats["convention"].startswith(f"dirichlet over {over}")
    assert f"convention: dirichlet over {over}" in format_partition_stats(stats)
    sizes = data.train.client_count + data.client_test.client_count
    assert sizes.sum() == stats["num_examples"]
    if over == "labels":
        assert sizes.max() - sizes.min() <= 1
    else:
        assert sizes.max() > 2 * sizes.min()
