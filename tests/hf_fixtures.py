"""Test helpers that build small but real Hugging Face artifacts offline.

A plain module (not a conftest), imported as `from hf_fixtures import write_tiny_tokenizer` by any
test (pytest puts `tests/` on `sys.path`). Keep `write_tiny_tokenizer`'s signature stable: tests of
the data pipeline and of model loading both use it.
"""

from __future__ import annotations

import os

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "TRAINING_TEXT", "write_tiny_tokenizer"]

# ChatML as SmolLM2-Instruct renders it, without SmolLM2's default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens in id order (ids 0-3 when all are present).
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",  # also eos, as in SmolLM2-Instruct and Qwen2.5-Instruct
}

# A few hundred words; the BPE merges learnt from it make ids shorter than bytes for English.
_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire "
    "federated learning trains one model on many clients whose data never leaves the device "
    "each client computes an update and the server averages them into the global model "
    "instruction tuning teaches a language model to follow requests and answer questions "
    "what is the capital of france paris is the capital of france and a large city "
    "write a short poem about the sea the sea is blue and wide and deep "
    "summarize the text below classify the sentiment of this review brainstorm ideas "
    "open question closed question information extraction creative writing general qa "
    "one two three four five six seven eight nine ten hello world thank you please "
)
TRAINING_TEXT = " ".join([_WORDS] * 3)


def write_tiny_tokenizer(
    directory: str | os.PathLike[str],
    chat_template: bool | str = True,
    bos: bool = True,
    *,
    pad: bool = True,
    vocab_size: int = 384,
) -> str:
    """Builds a small byte-level BPE tokenizer offline and saves it in Hugging Face format.

    The tokenizer is a `tokenizers` BPE over the 256 byte symbols (so any unicode text
    round-trips through encode/decode), trained on `TRAINING_TEXT`, wrapped in
    `transformers.PreTrainedTokenizerFast` and written with `save_pretrained(directory)`, so
    `AutoTokenizer.from_pretrained(directory, local_files_only=True)` loads it. Training is
    deterministic: the same arguments give the same ids.

    Special tokens, in id order (absent ones are skipped): `<pad>` (pad token), `<|endoftext|>`
    (bos token), `<|im_start|>`, `<|im_end|>` (eos token, the end of a ChatML turn, as in
    SmolLM2-Instruct). Encoding adds no special tokens by itself.

    Args:
        directory: Folder to write (created if missing).
        chat_template: True for the ChatML template `CHATML_TEMPLATE`
            (`<|im_start|>role\\ncontent<|im_end|>\\n`, generation prompt
            `<|im_start|>assistant\\n`), False for none, or a Jinja template string of your own.
        bos: Whether the tokenizer has a bos token; False mimics Qwen2 (`bos_token_id` is None).
        pad: Whether it has a pad token; False mimics Llama (no pad token).
        vocab_size: Target vocabulary size of the BPE training (>= 260: bytes plus specials).

    Returns:
        `str(directory)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS["pad"]] if pad else []
    specials += [SPECIAL_TOKENS["bos"]] if bos else []
    specials += [SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TRAINING_TEXT], trainer)
    kwargs = {"eos_token": SPECIAL_TOKENS["im_end"]}
    if bos:
        kwargs["bos_token"] = SPECIAL_TOKENS["bos"]
    if pad:
        kwargs["pad_token"] = SPECIAL_TOKENS["pad"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[SPECIAL_TOKENS["im_start"]],
        **kwargs,
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE if chat_template is True else chat_template
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(os.fspath(directory))
    return os.fspath(directory)
