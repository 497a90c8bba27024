"""Tests for fedjax_llm.data.tokenizer."""

import numpy as np
import pytest

from fedjax_llm.data import ByteTokenizer, Tokenizer

TEXTS = [
    "",
    "hello world",
    "37+45=82",
    "café naïve",
    "中文字符",
    "emoji 🙂🚀",
    "tab\tnew\nline",
    "\x00",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text


def test_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.encode("a") == [ord("a") + 3]
    assert tok.encode("é") == [b + 3 for b in "é".encode()]  # two UTF-8 bytes
    assert tok.encode("ab", add_bos=True) == [1, 100, 101]
    assert tok.encode("ab", add_eos=True) == [100, 101, 2]
    assert isinstance(tok, Tokenizer)


def test_decode_skips_specials_and_stops_at_eos():
    tok = ByteTokenizer()
    ids = [1, 0] + tok.encode("ab") + [2] + tok.encode("cd") + [0, 0]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, stop_at_eos=False) == "abcd"
    assert tok.decode(np.array(ids, dtype=np.int32)) == "ab"


def test_decode_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    # A lone continuation byte is not valid UTF-8: generated ids may contain such sequences.
    assert tok.decode([0x80 + 3, ord("a") + 3]) == "\ufffda"


@pytest.mark.parametrize("bad", [-1, 259, 1000])
def test_decode_out_of_range_raises(bad):
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([bad])


def test_encode_rejects_non_str():
    with pytest.raises(TypeError):
        ByteTokenizer().encode(b"bytes")
