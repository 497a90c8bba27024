"""Byte-level tokenizer for the tiny built-in models.

The built-in tasks train a model of a few hundred thousand parameters from scratch in about a minute
on a CPU. A byte vocabulary keeps the embedding table tiny, needs no vocabulary file (so it works
offline) and round-trips any unicode text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

__all__ = ["ByteTokenizer", "Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    `ByteTokenizer` implements it, and so does `HFTokenizer` (a wrapper around a Hugging Face
    tokenizer). Prompt and response are encoded separately (see `tokenize_examples`), so the loss
    mask is exact.
    """

    @property
    def pad_id(self) -> int:
        """Id used to right-pad sequences."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None for tokenizers without one (Qwen2).

        Code that prepends bos must skip it when this is None (`encode(add_bos=True)` does).
        """
        ...

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id is in `[0, vocab_size)`."""
        ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes text to ids."""
        ...

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Decodes ids to text."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes shifted past three special ids.

    Ids: 0 = pad, 1 = bos, 2 = eos, and byte `b` -> `b + 3`, so `vocab_size` is 259.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi", add_bos=True)
        [1, 107, 108]
        >>> tok.decode([1, 107, 108, 2, 107])
        'hi'
    """

    _PAD = 0
    _BOS = 1
    _EOS = 2
    _OFFSET = 3  # first id of a byte; ids below it are specials

    @property
    def pad_id(self) -> int:
        """Id used to right-pad sequences (0)."""
        return self._PAD

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token (1)."""
        return self._BOS

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token (2)."""
        return self._EOS

    @property
    def vocab_size(self) -> int:
        """Number of ids: 3 specials plus 256 bytes (259)."""
        return self._OFFSET + 256

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes text as its UTF-8 bytes, each shifted by 3.

        Args:
            text: Any unicode string.
            add_bos: Prepend the bos id.
            add_eos: Append the eos id.

        Returns:
            The list of ids.

        Raises:
            TypeError: If `text` is not a `str`.
        """
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}.")
        ids = [b + self._OFFSET for b in text.encode("utf-8")]
        if add_bos:
            ids.insert(0, self._BOS)
        if add_eos:
            ids.append(self._EOS)
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Decodes ids back to text.

        Special ids (pad, bos, and eos when not stopping at it) are skipped; byte sequences that are
        not valid UTF-8 (a model can generate those) become U+FFFD rather than raising.

        Args:
            ids: Token ids, e.g. a list or a 1-D integer array.
            stop_at_eos: Stop at the first eos id instead of skipping it, which is what generated
                sequences need (anything after eos is not part of the answer).

        Returns:
            The decoded string.

        Raises:
            ValueError: If an id is outside `[0, vocab_size)`.
        """
        data = bytearray()
        for raw in ids:
            i = int(raw)
            if i < 0 or i >= self.vocab_size:
                raise ValueError(
                    f"ByteTokenizer.decode: id {i} is outside [0, {self.vocab_size}); "
                    "the ids were not produced by this tokenizer."
                )
            if i == self._EOS and stop_at_eos:
                break
            if i >= self._OFFSET:
                data.append(i - self._OFFSET)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"
