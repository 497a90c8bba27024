"""A Hugging Face tokenizer behind the data pipeline's `Tokenizer` protocol, and its loader.

Real checkpoints (SmolLM2, Qwen2.5, Llama 3.x) ship their tokenizer as files next to the weights
(`tokenizer.json`, `tokenizer_config.json`, often a `chat_template.jinja`). `load_tokenizer` reads
such a directory strictly offline; `HFTokenizer` adapts the result to what `tokenize_examples` and
`fedjax_llm.data.formatting` need: ids of the special tokens, plain encoding without the
tokenizer's automatic special tokens (the pipeline places bos/eos itself, or the chat template
does), decoding that stops at eos, and chat-template rendering.

`transformers` is imported lazily, so importing `fedjax_llm.data` stays cheap for runs that use
the built-in byte tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["HFTokenizer", "load_tokenizer"]

# Any of these files in a directory means it holds a tokenizer transformers can read.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


class HFTokenizer:
    """Wraps a `transformers` tokenizer so it implements the `Tokenizer` protocol.

    Special ids follow the wrapped tokenizer, with two fallbacks real checkpoints need: `pad_id` is
    the eos id when the tokenizer defines no pad token (Llama), and `bos_id` is None when it has no
    bos token (Qwen2); `encode(add_bos=True)` then adds nothing.

    Attributes:
        tokenizer: The wrapped `transformers.PreTrainedTokenizerBase`.

    Example:
        >>> tok = load_tokenizer("checkpoints/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], True)  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        """Wraps `tokenizer`.

        Args:
            tokenizer: A `transformers` tokenizer (e.g. from `AutoTokenizer.from_pretrained`).
            chat_template: Jinja chat template that replaces the tokenizer's own (e.g. for a base
                model without one); None keeps the tokenizer's.

        Raises:
            ValueError: If the tokenizer has no eos token (the pipeline ends every sequence with
                one), or `chat_template` is not a non-empty string.
        """
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos token; the data pipeline ends "
                "every sequence with eos. Set one before wrapping it, e.g. "
                "`tokenizer.eos_token = '</s>'` (a token of its vocabulary)."
            )
        if chat_template is not None and (
            not isinstance(chat_template, str) or not chat_template.strip()
        ):
            raise ValueError(
                f"chat_template must be a non-empty Jinja template string, got {chat_template!r}."
            )
        self.tokenizer = tokenizer
        self._chat_template = chat_template

    # -- Tokenizer protocol ------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        """Id used to right-pad sequences: the pad token's, else the eos token's."""
        pad = self.tokenizer.pad_token_id
        return int(self.eos_id if pad is None else pad)

    @property
    def bos_id(self) -> int | None:
        """Id of the bos token, or None when the tokenizer has none (e.g. Qwen2)."""
        bos = self.tokenizer.bos_token_id
        return None if bos is None else int(bos)

    @property
    def eos_id(self) -> int:
        """Id of the eos token (for instruct checkpoints usually the end-of-turn token)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens, `len(tokenizer)`."""
        return len(self.tokenizer)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes text without the tokenizer's automatic special tokens.

        Special-token text inside `text` (e.g. `<|im_end|>`) maps to its special id, as it does
        when `transformers` tokenizes a rendered chat template.

        Args:
            text: Any unicode string.
            add_bos: Prepend the bos id (nothing is added when the tokenizer has no bos).
            add_eos: Append the eos id.

        Returns:
            The list of ids.

        Raises:
            TypeError: If `text` is not a `str`.
        """
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects a str, got {type(text).__name__}.")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._add_specials(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encodes many texts at once (the fast tokenizer's batch path; same ids as `encode`).

        Args:
            texts: Strings to encode.
            add_bos: Prepend the bos id to each (nothing when the tokenizer has no bos).
            add_eos: Append the eos id to each.

        Returns:
            One list of ids per text.
        """
        if len(texts) == 0:
            return []
        batch = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self._add_specials(list(ids), add_bos, add_eos) for ids in batch]

    def _add_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Decodes ids to text, skipping special tokens.

        Args:
            ids: Token ids, e.g. a list or a 1-D integer array.
            stop_at_eos: Stop at the first eos id, which is what generated sequences need
                (anything after eos is not part of the answer).

        Returns:
            The decoded string.

        Raises:
            ValueError: If an id is outside `[0, vocab_size)`.
        """
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        arr = arr.reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(
                f"HFTokenizer.decode: id {bad} is outside [0, {self.vocab_size}); the ids were not "
                "produced by this tokenizer (is model.vocab_size larger than the tokenizer's?)."
            )
        if stop_at_eos:
            hits = np.flatnonzero(arr == self.eos_id)
            if hits.size:
                arr = arr[: hits[0]]
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=True)

    # -- Chat templates ----------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in use (the override if one was given), or None."""
        return self._chat_template or getattr(self.tokenizer, "chat_template", None) or None

    @property
    def has_chat_template(self) -> bool:
        """Whether a chat template is available to format conversations."""
        return self.chat_template is not None

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
    ) -> str:
        """Renders a conversation with the chat template as text.

        Args:
            messages: `[{"role": ..., "content": ...}, ...]`.
            add_generation_prompt: Append the header that opens an assistant turn (what a model
                is given before it generates).
            chat_template: Template to use instead of `self.chat_template`.

        Returns:
            The rendered text, special tokens written out (e.g. `<|im_start|>`).

        Raises:
            ValueError: If no chat template is available.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                f"tokenizer {type(self.tokenizer).__name__} has no chat template; give one "
                "(config: --data.chat_template FILE; Python: chat_template=... to "
                "load_tokenizer / HFTokenizer, e.g. fedjax_llm.data.CHATML_TEMPLATE), or train "
                "on the data as plain text (--data.format text)."
            )
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> list[int]:
        """Renders a conversation with the chat template and tokenizes it.

        The ids equal `transformers`' own `apply_chat_template(..., tokenize=True)`: the rendered
        text tokenized without automatic special tokens (the template writes them itself).

        Args:
            messages: `[{"role": ..., "content": ...}, ...]`.
            add_generation_prompt: Append the header that opens an assistant turn.

        Returns:
            The token ids.

        Raises:
            ValueError: If no chat template is available.
        """
        return self.encode(self.render_chat_template(messages, add_generation_prompt))

    def __repr__(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        return (
            f"HFTokenizer({name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, chat_template={self.has_chat_template})"
        )


def load_tokenizer(path: str | os.PathLike[str], chat_template: str | None = None) -> HFTokenizer:
    """Loads a tokenizer from a local Hugging Face-format directory, never from the network.

    Args:
        path: Directory with `tokenizer.json` / `tokenizer_config.json` (what `save_pretrained`
            writes, and what a downloaded checkpoint holds).
        chat_template: Jinja chat template to use instead of the directory's (e.g. for a base
            model that ships none).

    Returns:
        The wrapped tokenizer.

    Raises:
        FileNotFoundError: If `path` is not a directory or holds no tokenizer files (the message
            lists what it found and how to fix it).
        ValueError: If `transformers` cannot read the files, or the tokenizer has no eos token.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"load_tokenizer: {path!r} is not a directory; pass the folder of a Hugging Face "
            "checkpoint (with tokenizer.json / tokenizer_config.json), e.g. one written by "
            "scripts/fetch_model.py or tokenizer.save_pretrained(folder)."
        )
    found = sorted(os.listdir(path))
    if not any(name in found for name in _TOKENIZER_FILES):
        shown = found[:20] + (["..."] if len(found) > 20 else [])
        raise FileNotFoundError(
            f"load_tokenizer: directory {path!r} has no tokenizer files (expected one of "
            f"{list(_TOKENIZER_FILES)}; found {shown}). Copy the tokenizer files of the checkpoint "
            "into it, or save one with tokenizer.save_pretrained(folder)."
        )
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"load_tokenizer: transformers could not read the tokenizer in {path!r} ({err}). "
            "Check that tokenizer.json / tokenizer_config.json are complete and were written by a "
            "compatible transformers version."
        ) from err
    return HFTokenizer(tokenizer, chat_template=chat_template)
