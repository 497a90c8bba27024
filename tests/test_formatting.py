"""Tests for fedjax_llm.data.formatting: chat-template loss masks, truncation, text packing."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_fixtures import write_tiny_tokenizer  # noqa: E402

from fedjax_llm.data import (  # noqa: E402
    CHATML_TEMPLATE,
    ByteTokenizer,
    load_records,
    load_tokenizer,
    records_to_conversations,
    render_chat,
    tokenize_conversations,
    tokenize_documents,
)


def conv(*pairs, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        out.append({"role": "user", "content": user})
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
    return out


CONVS = [
    conv(("What is the capital of France?", "Paris is the capital of France.")),
    conv(("Say hello", "hello world"), system="Be brief."),
    conv(("one", "two"), ("three", "four five")),
    conv(("newline first", "\n\nstarts with a blank line")),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("qwen"), bos=False))


def real_length(tx, r, tok):
    return int(np.flatnonzero(tx.tokens[r] != tok.pad_id).max()) + 1


def test_records_to_conversations(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Math."},
        {"instruction": "Hi.", "input": None, "output": "Hello", "system": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = records_to_conversations(load_records(path, cache_dir=str(tmp_path / "c")))
    assert convs == [
        [
            {"role": "system", "content": "Math."},
            {"role": "user", "content": "Add.\n\n2 and 3"},
            {"role": "assistant", "content": "5"},
        ],
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello"}],
    ]
    dolly = tmp_path / "d.csv"
    dolly.write_text("instruction,context,response,category\nWho?,A text.,Me.,qa\nWhy?,,So.,qa\n")
    convs = records_to_conversations(load_records(dolly, cache_dir=str(tmp_path / "c")))
    assert convs[0][0] == {"role": "user", "content": "Who?\n\nA text."}
    assert convs[1] == [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "So."},
    ]


def test_loss_mask_token_by_token(tok):
    tx, report = tokenize_conversations(CONVS, tok, 64, labels=[0, 1, 0, 1], label_names=["a", "b"])
    assert report.num_rows == 4 and report.dropped == 0 and report.num_truncated == 0
    np.testing.assert_array_equal(report.row_records, [0, 1, 2, 3])
    np.testing.assert_array_equal(tx.labels, [0, 1, 0, 1])
    assert tx.label_names == ("a", "b")
    for r, c in enumerate(CONVS):
        prompt_ids = tok.encode(render_chat(tok, c[:-1], add_generation_prompt=True))
        full_text = render_chat(tok, c)
        response_ids = tok.encode(full_text[len(render_chat(tok, c[:-1], True)) :])
        length = real_length(tx, r, tok)
        assert tx.prompt_len[r] == len(prompt_ids)
        np.testing.assert_array_equal(tx.tokens[r, : len(prompt_ids)], prompt_ids)
        np.testing.assert_array_equal(tx.tokens[r, len(prompt_ids) : length], response_ids)
        # The mask is exactly the response, its <|im_end|> (eos) and the template's newline.
        np.testing.assert_array_equal(
            np.flatnonzero(tx.loss_mask[r]), np.arange(len(prompt_ids), length)
        )
        assert tok.decode(tx.tokens[r][tx.loss_mask[r] > 0]) == c[-1]["content"]
        assert tx.tokens[r, length - 2] == tok.eos_id  # "<|im_end|>", then "\n"
        assert tx.responses[r] == c[-1]["content"]
        assert np.all(tx.tokens[r, length:] == tok.pad_id)
    # Ordinary examples tokenize exactly as transformers' apply_chat_template.
    for r in range(3):
        ids = tok.apply_chat_template(CONVS[r])
        np.testing.assert_array_equal(tx.tokens[r, : len(ids)], ids)


def test_loss_on_all_turns(tok):
    c = CONVS[2]
    tx, _ = tokenize_conversations([c], tok, 64, loss_on="all")
    spans = []
    for j in (1, 3):  # assistant turns
        start = len(tok.apply_chat_template(c[:j], add_generation_prompt=True))
        spans += list(range(start, len(tok.apply_chat_template(c[: j + 1]))))
    np.testing.assert_array_equal(np.flatnonzero(tx.loss_mask[0]), spans)
    last, _ = tokenize_conversations([c], tok, 64, loss_on="last")
    np.testing.assert_array_equal(last.tokens, tx.tokens)
    assert last.loss_mask.sum() < tx.loss_mask.sum()
    assert tx.prompt_len[0] == last.prompt_len[0] and tx.responses == ("four five",)


def test_trailing_user_turn_and_no_response(tok):
    trailing = conv(("a", "b"), ("c", None))
    no_reply = conv(("only a question", None))
    empty = conv(("q", "  "))
    tx, report = tokenize_conversations([trailing, no_reply, empty, CONVS[0]], tok, 64)
    assert report.num_rows == 2 and report.dropped_no_response == 1 and report.dropped_empty == 1
    np.testing.assert_array_equal(report.row_records, [0, 3])
    assert tx.responses[0] == "b"


def test_no_bos_tokenizer(qwen_tok):
    tx, _ = tokenize_conversations(CONVS[:1], qwen_tok, 64)
    assert qwen_tok.bos_id is None
    ids = qwen_tok.apply_chat_template(CONVS[0])
    np.testing.assert_array_equal(tx.tokens[0, : len(ids)], ids)


def test_truncation_cuts_response_and_drops_when_empty(tok):
    c = CONVS[0]
    prompt_len = len(tok.apply_chat_template(c[:-1], add_generation_prompt=True))
    full_len = len(tok.apply_chat_template(c))
    # Room for 3 response tokens: kept, cut from the right.
    tx, report = tokenize_conversations([c], tok, prompt_len + 3)
    assert report.num_truncated == 1 and report.dropped_too_long == 0
    assert tx.loss_mask[0].sum() == 3 and tx.prompt_len[0] == prompt_len
    np.testing.assert_array_equal(tx.tokens[0], tok.apply_chat_template(c)[: prompt_len + 3])
    # min_response_tokens=4 > 3 tokens left: dropped.
    with pytest.raises(ValueError, match=r"dropped all 1 records \(1 too long"):
        tokenize_conversations([c], tok, prompt_len + 3, min_response_tokens=4)
    # The prompt fills seq_len: no response token left, dropped and counted.
    tx, report = tokenize_conversations([c, conv(("hi", "yo"))], tok, prompt_len)
    assert report.dropped_too_long == 1 and report.num_rows == 1
    np.testing.assert_array_equal(report.row_records, [1])
    # Exactly fits: not truncated.
    _, report = tokenize_conversations([c], tok, full_len)
    assert report.num_truncated == 0


def test_truncation_with_all_turns_targets_last_surviving_turn(tok):
    c = CONVS[2]
    first_end = len(tok.apply_chat_template(c[:2]))
    tx, report = tokenize_conversations([c], tok, first_end + 2, loss_on="all")
    assert report.num_truncated == 1 and tx.responses == ("two",)
    assert tx.prompt_len[0] == len(tok.apply_chat_template(c[:1], add_generation_prompt=True))
    assert tx.loss_mask[0, first_end:].sum() == 0  # nothing after the surviving turn


def test_eos_appended_when_template_turn_has_none(tok):
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tx, _ = tokenize_conversations(CONVS[:1], tok, 64, chat_template=plain)
    length = real_length(tx, 0, tok)
    assert tx.tokens[0, length - 1] == tok.eos_id and tx.loss_mask[0, length - 1] == 1
    assert tok.decode(tx.tokens[0, : tx.prompt_len[0]]).endswith("assistant: ")


def test_template_breaking_prefix_is_a_clear_error(tok):
    broken = CHATML_TEMPLATE.replace(
        "'<|im_start|>' + message['role']",
        "'<|im_start|>' + ('model' if message['role'] == 'assistant' else message['role'])",
    )
    with pytest.raises(
        ValueError,
        match=r"conversation 0: the chat template does not render.*"
        r"prompt.*followed by the answer.*'assistant\\n'.*'model",
    ):
        tokenize_conversations(CONVS[:1], tok, 64, chat_template=broken)


def test_template_rewriting_history_refuses_all_turns(tok):
    strips = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n(earlier)<|im_end|>\n{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="earlier turns differently.*loss_on='last'"):
        tokenize_conversations(CONVS[2:3], tok, 64, chat_template=strips, loss_on="all")
    tx, _ = tokenize_conversations(CONVS[2:3], tok, 64, chat_template=strips, loss_on="last")
    assert tx.responses == ("four five",)


def test_no_chat_template_error(tmp_path):
    base = load_tokenizer(write_tiny_tokenizer(tmp_path / "base", chat_template=False))
    for t in (base, ByteTokenizer()):
        with pytest.raises(ValueError, match=r"no chat template.*chat_template=.*format text"):
            tokenize_conversations(CONVS, t, 64)


def test_byte_tokenizer_with_template():
    tok = ByteTokenizer()
    tx, _ = tokenize_conversations(CONVS[:1], tok, 160, chat_template=CHATML_TEMPLATE)
    p = tx.prompt_len[0]
    assert tok.decode(tx.tokens[0, :p]).endswith("<|im_start|>assistant\n")
    # Byte-level "<|im_end|>" is not the eos id, so eos is appended after the turn.
    masked = tx.tokens[0][tx.loss_mask[0] > 0]
    assert masked[-1] == tok.eos_id
    assert tok.decode(masked) == "Paris is the capital of France.<|im_end|>\n"


@pytest.mark.parametrize(
    "convs, match",
    [
        ([[]], "non-empty list"),
        (["not a list"], "non-empty list"),
        ([[{"content": "x"}]], "message 0.*string 'role'"),
        ([[{"role": "user", "content": ["a", "b"]}]], "only text content"),
    ],
)
def test_malformed_messages(tok, convs, match):
    with pytest.raises(ValueError, match=f"conversation 0: .*{match}"):
        tokenize_conversations(convs, tok, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"loss_on": "first"}, "loss_on"),
        ({"min_response_tokens": 0}, "min_response_tokens"),
        ({"labels": [0, 5, 0, 0], "label_names": ["a"]}, "labels must lie"),
        ({"labels": [0]}, "labels must be 4"),
    ],
)
def test_bad_arguments(tok, kwargs, match):
    kwargs = {"seq_len": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        tokenize_conversations(CONVS, tok, **kwargs)


DOCS = ["the quick brown fox", "", "jumps over the lazy dog " * 3, "hello world", "one two"]


def test_packing_layout(tok):
    groups = np.array([0, 0, 1, 0, 1])
    labels = np.array([0, 0, 0, 0, 1])
    tx, report = tokenize_documents(DOCS, tok, 8, groups=groups, labels=labels, label_names="xy")
    assert report.dropped_empty == 1 and report.num_records == 5
    docs = {i: [tok.bos_id] + tok.encode(DOCS[i]) + [tok.eos_id] for i in (0, 2, 3, 4)}
    # Streams per (group, label) in record order: (0,0): docs 0, 3; (1,0): doc 2; (1,1): doc 4.
    streams = [docs[0] + docs[3], docs[2], docs[4]]
    expected_rows = sum(-(-len(s) // 8) for s in streams)
    assert tx.num_examples == report.num_rows == expected_rows
    rebuilt, r = [], 0
    for s in streams:
        n = -(-len(s) // 8)
        real = tx.tokens[r : r + n][tx.loss_mask[r : r + n] > 0]
        rebuilt.append(real.tolist())
        r += n
    assert rebuilt == streams
    assert np.all(tx.tokens[tx.loss_mask == 0] == tok.pad_id)
    # Only each stream's last row has padding.
    full = tx.loss_mask.sum(1) == 8
    assert full.sum() == tx.num_examples - 3
    np.testing.assert_array_equal(tx.prompt_len, 1)
    assert set(tx.responses) == {""}
    # Row -> first record: rows never mix groups or labels.
    rows_per_stream = [-(-len(s) // 8) for s in streams]
    np.testing.assert_array_equal(groups[report.row_records], np.repeat([0, 1, 1], rows_per_stream))
    np.testing.assert_array_equal(tx.labels, labels[report.row_records])


def test_no_packing_truncates(tok, qwen_tok):
    tx, report = tokenize_documents(DOCS, tok, 10, pack=False)
    assert tx.num_examples == 4 and report.dropped_empty == 1
    lengths = [len(tok.encode(DOCS[i])) + 2 for i in (0, 2, 3, 4)]
    assert report.num_truncated == sum(n > 10 for n in lengths)
    np.testing.assert_array_equal(tx.loss_mask.sum(1), np.minimum(lengths, 10))
    np.testing.assert_array_equal(report.row_records, [0, 2, 3, 4])
    row = [tok.bos_id] + tok.encode(DOCS[3]) + [tok.eos_id]
    np.testing.assert_array_equal(tx.tokens[2, : len(row)], row)
    assert tx.tokens[1, -1] != tok.eos_id  # cut from the right
    # No bos for tokenizers without one.
    q, _ = tokenize_documents(DOCS[:1], qwen_tok, 16, pack=False)
    assert q.tokens[0, 0] == qwen_tok.encode(DOCS[0])[0]


def test_documents_errors(tok):
    with pytest.raises(ValueError, match="all 2 documents are empty"):
        tokenize_documents(["", None], tok, 8)
    with pytest.raises(ValueError, match="groups must be"):
        tokenize_documents(DOCS, tok, 8, groups=[0, 1])
