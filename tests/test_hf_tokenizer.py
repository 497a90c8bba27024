"""Tests for fedjax_llm.data.hf_tokenizer (with tiny tokenizers built offline by hf_fixtures)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_fixtures import CHATML_TEMPLATE, SPECIAL_TOKENS, write_tiny_tokenizer  # noqa: E402

from fedjax_llm.data import (  # noqa: E402
    Example,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenize_examples,
)

TEXTS = [
    "",
    "hello world",
    "the quick brown fox",
    "café naïve",
    "中文字符",
    "emoji 🙂🚀",
    "tab\tnew\nline  two spaces",
    "\x00",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "smollm": write_tiny_tokenizer(root / "smollm"),
        "qwen": write_tiny_tokenizer(root / "qwen", bos=False),
        "llama": write_tiny_tokenizer(root / "llama", pad=False),
        "base": write_tiny_tokenizer(root / "base", chat_template=False),
    }


@pytest.fixture(scope="module")
def tok(tok_dirs):
    return load_tokenizer(tok_dirs["smollm"])


def test_fixture_writes_hf_files(tok_dirs):
    files = os.listdir(tok_dirs["smollm"])
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert "tokenizer.json" in os.listdir(tok_dirs["base"])


def test_fixture_is_deterministic(tmp_path, tok_dirs):
    again = write_tiny_tokenizer(tmp_path / "again")
    with (
        open(os.path.join(again, "tokenizer.json")) as f,
        open(os.path.join(tok_dirs["smollm"], "tokenizer.json")) as g,
    ):
        assert json.load(f)["model"] == json.load(g)["model"]


def test_protocol_and_special_ids(tok):
    assert isinstance(tok, Tokenizer)
    hf = tok.tokenizer
    assert tok.pad_id == hf.convert_tokens_to_ids(SPECIAL_TOKENS["pad"]) == hf.pad_token_id
    assert tok.bos_id == hf.convert_tokens_to_ids(SPECIAL_TOKENS["bos"]) == hf.bos_token_id
    assert tok.eos_id == hf.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"]) == hf.eos_token_id
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.vocab_size == len(hf) > 300
    assert "HFTokenizer" in repr(tok)


def test_qwen_style_has_no_bos(tok_dirs):
    tok = load_tokenizer(tok_dirs["qwen"])
    assert tok.bos_id is None
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")
    assert tok.encode("hi", add_bos=True, add_eos=True)[-1] == tok.eos_id


def test_llama_style_pad_falls_back_to_eos(tok_dirs):
    tok = load_tokenizer(tok_dirs["llama"])
    assert tok.tokenizer.pad_token_id is None
    assert tok.pad_id == tok.eos_id


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.asarray(tok.encode(text), dtype=np.int32)) == text


def test_encode_adds_no_automatic_specials_and_batch_matches(tok):
    assert tok.encode("the fox") == tok.tokenizer.encode("the fox", add_special_tokens=False)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(["a"], add_bos=True, add_eos=True) == [
        tok.encode("a", add_bos=True, add_eos=True)
    ]
    assert tok.encode_batch([]) == []
    # Special-token text maps to its id, as when transformers tokenizes a rendered template.
    assert tok.encode("<|im_end|>") == [tok.eos_id]
    with pytest.raises(TypeError, match="str"):
        tok.encode(3)


def test_decode_stops_at_eos_and_checks_range(tok):
    ids = tok.encode("paris") + [tok.eos_id] + tok.encode(" junk") + [tok.pad_id]
    assert tok.decode(ids) == "paris"
    assert tok.decode(ids, stop_at_eos=False) == "paris junk"
    with pytest.raises(ValueError, match=r"id 100000 is outside \[0, "):
        tok.decode([1, 100000])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


def test_apply_chat_template_matches_transformers(tok):
    assert tok.has_chat_template and tok.chat_template == CHATML_TEMPLATE
    for gen, messages in [(False, CHAT), (True, CHAT[:2])]:
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = tok.tokenizer.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=True, return_dict=True
        )["input_ids"]
        assert ours == list(theirs)
    text = tok.render_chat_template(CHAT[:2], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT)
    assert full[: len(prompt)] == prompt
    assert tok.decode(full[len(prompt) :]) == "Paris."


def test_no_chat_template_is_a_clear_error(tok_dirs):
    tok = load_tokenizer(tok_dirs["base"])
    assert not tok.has_chat_template and tok.chat_template is None
    with pytest.raises(ValueError, match=r"no chat template.*chat_template=.*format text"):
        tok.apply_chat_template(CHAT)
    # The fix the message names works.
    fixed = load_tokenizer(tok_dirs["base"], chat_template=CHATML_TEMPLATE)
    assert fixed.has_chat_template
    assert fixed.apply_chat_template(CHAT) == load_tokenizer(
        tok_dirs["smollm"]
    ).apply_chat_template(CHAT)


def test_tokenize_examples_without_bos(tok_dirs):
    # The built-in pipeline places bos itself; a tokenizer without one starts with the prompt.
    tok = load_tokenizer(tok_dirs["qwen"])
    tx = tokenize_examples([Example("2+2=", "4", 0)], tok, 16, ["add"])
    p = tx.prompt_len[0]
    assert p == len(tok.encode("2+2="))
    np.testing.assert_array_equal(tx.tokens[0, :p], tok.encode("2+2="))
    assert tok.decode(tx.tokens[0, p:]) == "4"


def test_load_tokenizer_errors(tmp_path, tok_dirs):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*model\.safetensors"):
        load_tokenizer(tmp_path / "weights")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="could not read the tokenizer"):
        load_tokenizer(broken)
    with pytest.raises(ValueError, match="chat_template"):
        load_tokenizer(tok_dirs["base"], chat_template="")


def test_wrapper_requires_eos(tok):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos token"):
        HFTokenizer(NoEos())
