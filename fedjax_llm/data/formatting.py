"""Formatting real records into fixed-shape `TokenizedExamples`: chat-templated instructions with
a loss on the response only, and plain text packed for pre-training.

**Instructions.** Alpaca and Dolly records become a two-message conversation (user: the
instruction, then a blank line and the input/context when there is one; assistant: the
output/response; an optional `system` column becomes a system message). `messages` records are
used as they are, system messages included. A conversation is rendered with the tokenizer's chat
template twice: the prompt (every message before the trained assistant turn, with
`add_generation_prompt=True`) and the conversation up to and including that turn. The prompt's
text must be a prefix of the conversation's text, which is what a template whose generation prompt
opens an assistant turn guarantees; if it is not, the loss mask has no well-defined boundary and
formatting fails with an error that says so. Prompt and response texts are then tokenized
separately and concatenated, so the tokens the model trains on after the boundary are exactly the
ones it would generate after seeing the prompt (tokenizing the whole text at once can merge a
token across the boundary, e.g. a response that starts with a newline). For ordinary examples the
ids equal `tokenizer.apply_chat_template(conversation)`.

The loss covers the response and the template's end-of-turn markup (for ChatML
`answer<|im_end|>\\n`); when that contains no eos token, eos is appended so the model learns to
stop and greedy decoding ends. With `loss_on="last"` (the default) only the last assistant turn
is trained, earlier turns are context; with `loss_on="all"` every assistant turn after the first
message is.

**Truncation.** A conversation longer than `seq_len` is cut from the right: the prompt is never
cut (cutting token ids of a rendered template leaves markup the model never sees at inference), so
the response loses its end. If fewer than `min_response_tokens` response tokens would remain, the
example is dropped instead and counted in `FormatReport.dropped_too_long`; records with an empty
response or without an assistant turn are dropped and counted too.

**Plain text.** Each document becomes `bos + text + eos` (no bos for tokenizers without one). With
packing (the default) documents are concatenated and cut into rows of exactly `seq_len` tokens;
the last row of a group is padded. Rows never mix groups (clients) or labels, so a row belongs to
one client and one label. Without packing every document is one row, cut to `seq_len`. The loss
covers every real token; `prompt_len` is 1 and `responses` are empty (exact match is meaningless
for plain text).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.data.federated_dataset import TokenizedExamples
from fedjax_llm.data.loaders import LoadedDataset
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "LOSS_ON",
    "FormatReport",
    "records_to_conversations",
    "render_chat",
    "tokenize_conversations",
    "tokenize_documents",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML as SmolLM2-Instruct and Qwen2.5-Instruct use it (without a default system message)."""

LOSS_ON = ("last", "all")
"""Which assistant turns of a conversation carry the loss."""


@dataclasses.dataclass(frozen=True, eq=False)
class FormatReport:
    """What formatting kept and dropped.

    Attributes:
        num_records: Records given.
        num_rows: Rows produced (examples, or packed blocks for plain text).
        num_truncated: Kept rows whose sequence was cut to `seq_len`.
        dropped_too_long: Records dropped because the prompt left fewer than
            `min_response_tokens` response tokens within `seq_len`.
        dropped_empty: Records dropped because the response (or the document) is empty.
        dropped_no_response: Conversations dropped because no assistant turn follows a prompt.
        row_records: [num_rows] int64 record index of each row (for a packed block: the record
            its first token comes from; every record of a block shares its group and label).
    """

    num_records: int
    num_rows: int
    num_truncated: int
    dropped_too_long: int
    dropped_empty: int
    dropped_no_response: int
    row_records: np.ndarray

    @property
    def dropped(self) -> int:
        """Records dropped for any reason."""
        return self.dropped_too_long + self.dropped_empty + self.dropped_no_response

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-serializable dict (without `row_records`)."""
        return {
            "num_records": self.num_records,
            "num_rows": self.num_rows,
            "num_truncated": self.num_truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_empty": self.dropped_empty,
            "dropped_no_response": self.dropped_no_response,
        }


# ----------------------------------------------------------------------------------------------
# Records -> conversations.
# ----------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A field as text: None and NaN (empty CSV cells) are empty, scalars are str()-ed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _check_messages(value: Any, where: Callable[[], str]) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"{where()}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts, got "
            f"{value!r:.200}."
        )
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(
                f"{where()}: message {k} is {m!r:.200}; each message needs a string 'role' "
                "(system, user or assistant) and a 'content'."
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(
                f"{where()}: message {k} has content of type {type(content).__name__}; only text "
                "content is supported."
            )
        out.append({"role": m["role"], "content": content or ""})
    return out


def records_to_conversations(loaded: LoadedDataset) -> list[list[dict[str, str]]]:
    """Turns instruction records into chat conversations.

    Alpaca: user = `instruction` (+ blank line + `input` when non-empty), assistant = `output`.
    Dolly: user = `instruction` (+ blank line + `context`), assistant = `response`. A `system`
    column, when present and non-empty, becomes a leading system message. `messages` records are
    checked and kept as they are (role and content only).

    Args:
        loaded: Records with schema `alpaca`, `dolly` or `messages`.

    Returns:
        One list of `{"role", "content"}` messages per record.

    Raises:
        ValueError: If the schema is not an instruction schema, or a `messages` value is malformed
            (the message names the record and its file).
    """
    schema = loaded.schema
    n = len(loaded)
    if schema == "messages":
        return [
            _check_messages(v, lambda i=i: loaded.describe(i))
            for i, v in enumerate(loaded.column("messages"))
        ]
    fields = {
        "alpaca": ("instruction", "input", "output"),
        "dolly": ("instruction", "context", "response"),
    }
    if schema not in fields:
        raise ValueError(
            f"records of schema {schema!r} are not instructions; use tokenize_documents for "
            "'text' (preference pairs are not trainable yet)."
        )
    instruction, extra, answer = fields[schema]
    columns = loaded.column_names
    instr = loaded.column(instruction)
    more = loaded.column(extra) if extra in columns else [None] * n
    out_col = loaded.column(answer)
    system = loaded.column("system") if "system" in columns else [None] * n
    conversations = []
    for q, x, a, s in zip(instr, more, out_col, system, strict=True):
        q, x, s = _text(q), _text(x), _text(s)
        user = f"{q}\n\n{x}" if x.strip() else q
        conv = [{"role": "system", "content": s}] if s.strip() else []
        conv += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(a)}]
        conversations.append(conv)
    return conversations


# ----------------------------------------------------------------------------------------------
# Chat rendering.
# ----------------------------------------------------------------------------------------------


def _no_template_error(tokenizer: Any) -> ValueError:
    return ValueError(
        f"tokenizer {type(tokenizer).__name__} has no chat template, so instruction records "
        "cannot be formatted. Give a Jinja chat template (config: --data.chat_template FILE; "
        "Python: chat_template=..., e.g. fedjax_llm.data.CHATML_TEMPLATE, which works for any "
        "tokenizer), or train on the records as plain text (--data.format text)."
    )


def _make_renderer(
    tokenizer: Tokenizer, chat_template: str | None
) -> Callable[[list[dict[str, str]], bool], str]:
    """`render(messages, add_generation_prompt) -> text` for `tokenizer` (checked up front)."""
    if hasattr(tokenizer, "render_chat_template"):
        if chat_template is None and not getattr(tokenizer, "has_chat_template", False):
            raise _no_template_error(tokenizer)
        return lambda m, g: tokenizer.render_chat_template(m, g, chat_template)
    if chat_template is None:
        raise _no_template_error(tokenizer)
    # Tokenizers outside transformers (e.g. ByteTokenizer): the same sandboxed Jinja setup.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(chat_template)
    specials = {"bos_token": "", "eos_token": ""}
    return lambda m, g: template.render(messages=m, add_generation_prompt=g, **specials)


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> str:
    """Renders a conversation as text with a chat template.

    Args:
        tokenizer: An `HFTokenizer` (its own template is the default) or any `Tokenizer`
            together with `chat_template`.
        messages: `[{"role": ..., "content": ...}, ...]`.
        add_generation_prompt: Append the header that opens an assistant turn.
        chat_template: Jinja template to use instead of the tokenizer's.

    Returns:
        The rendered text.

    Raises:
        ValueError: If there is no chat template to use (the message says how to fix it).
    """
    return _make_renderer(tokenizer, chat_template)(
        [dict(m) for m in messages], add_generation_prompt
    )


def _encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    return int(seq_len)


def _check_labels(labels: Any, label_names: Sequence[str], n: int) -> tuple[np.ndarray, tuple]:
    names = tuple(str(x) for x in label_names)
    if not names:
        raise ValueError("label_names is empty; give at least one label name, e.g. ('all',).")
    if labels is None:
        return np.zeros(n, dtype=np.int64), names
    labels = np.asarray(labels)
    if labels.shape != (n,) or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be {n} integers (one per record), got shape {labels.shape}.")
    if n and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)}) of label_names {names}.")
    return labels.astype(np.int64), names


def _prefix_error(prompt: str, full: str, index_text: str) -> ValueError:
    common = 0
    while common < min(len(prompt), len(full)) and prompt[common] == full[common]:
        common += 1
    return ValueError(
        f"{index_text}: the chat template does not render a conversation as its prompt (with "
        "add_generation_prompt=True) followed by the answer, so the loss mask has no boundary. "
        f"The prompt continues {prompt[common : common + 40]!r} where the conversation continues "
        f"{full[common : common + 40]!r}. Use a template whose generation prompt is exactly the "
        "opening of an assistant turn (e.g. fedjax_llm.data.CHATML_TEMPLATE)."
    )


def tokenize_conversations(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    labels: np.ndarray | Sequence[int] | None = None,
    label_names: Sequence[str] = ("all",),
    loss_on: str = "last",
    min_response_tokens: int = 1,
    chat_template: str | None = None,
    describe: Callable[[int], str] | None = None,
) -> tuple[TokenizedExamples, FormatReport]:
    """Tokenizes chat conversations with a chat template, the loss on assistant responses only.

    See the module docstring for the boundary check, the eos rule and truncation.

    Args:
        conversations: Lists of `{"role", "content"}` messages.
        tokenizer: An `HFTokenizer` with a chat template, or any `Tokenizer` with
            `chat_template` given.
        seq_len: Row length T (>= 2).
        labels: [N] label id per conversation (e.g. its category); None gives label 0.
        label_names: Name of each label id.
        loss_on: `"last"`: the loss is on the last assistant turn only (earlier turns are
            context); `"all"`: on every assistant turn after the first message. Generation
            (`prompt_len`, `responses`) always targets the last trained turn that survives
            truncation.
        min_response_tokens: Fewest response tokens a kept example has after truncation (>= 1).
        chat_template: Jinja template to use instead of the tokenizer's.
        describe: `describe(i)` names conversation i in error messages (e.g. its file).

    Returns:
        `(examples, report)`: the kept examples in record order, and what was truncated/dropped.

    Raises:
        ValueError: If there is no chat template (the message says how to fix it), the template
            breaks the prompt-prefix property, a message is malformed, an argument is invalid, or
            every record is dropped (the message gives the counts and the fix).
    """
    seq_len = _check_seq_len(seq_len)
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: unknown value {loss_on!r}; valid values are {list(LOSS_ON)}.")
    if isinstance(min_response_tokens, bool) or not isinstance(min_response_tokens, int):
        raise ValueError(
            f"min_response_tokens must be an integer >= 1, got {min_response_tokens!r}."
        )
    if min_response_tokens < 1:
        raise ValueError(
            f"min_response_tokens must be an integer >= 1, got {min_response_tokens!r}."
        )
    n = len(conversations)
    labels, names = _check_labels(labels, label_names, n)
    render = _make_renderer(tokenizer, chat_template)
    name_of = describe or (lambda i: f"conversation {i}")

    # Pass 1: render the pieces (text, is_response) of each conversation.
    piece_texts: list[str] = []
    plans: list[tuple[int, int, int, str] | None] = []  # (record, first piece, num pieces, reply)
    dropped_empty = dropped_no_response = 0
    for i, conv in enumerate(conversations):
        msgs = _check_messages(conv, lambda i=i: name_of(i))
        turns = [j for j, m in enumerate(msgs) if m["role"] == "assistant" and j > 0]
        if not turns:
            dropped_no_response += 1
            plans.append(None)
            continue
        if not msgs[turns[-1]]["content"].strip():
            dropped_empty += 1
            plans.append(None)
            continue
        targets = turns if loss_on == "all" else turns[-1:]
        first, done = len(piece_texts), ""
        for j in targets:
            prompt = render(msgs[:j], True)
            full = render(msgs[: j + 1], False)
            if not prompt.startswith(done):
                raise ValueError(
                    f"{name_of(i)}: the chat template renders earlier turns differently once "
                    "later turns follow (e.g. it strips past reasoning), so loss_on='all' cannot "
                    "mask each assistant turn; use loss_on='last'."
                )
            if not full.startswith(prompt):
                raise _prefix_error(prompt, full, name_of(i))
            piece_texts += [prompt[len(done) :], full[len(prompt) :]]
            done = full
        plans.append((i, first, len(piece_texts) - first, msgs[turns[-1]]["content"]))

    # Pass 2: tokenize every piece in one batch, then assemble and truncate.
    piece_ids = _encode_many(tokenizer, piece_texts)
    eos = tokenizer.eos_id
    rows: list[tuple[list[int], list[tuple[int, int]], int, int, str]] = []  # ids, spans, ...
    dropped_too_long = num_truncated = 0
    for plan in plans:
        if plan is None:
            continue
        i, first, count, reply = plan
        ids: list[int] = []
        spans: list[tuple[int, int]] = []  # [start, end) of each response piece
        for k in range(first, first + count):
            piece = piece_ids[k]
            if (k - first) % 2 == 1:
                if k == first + count - 1 and eos not in piece:
                    piece = [*piece, eos]  # so the model learns to stop and decoding ends
                spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        # The reference turn: the last trained turn that keeps enough tokens within seq_len.
        fits = [k for k, (s, e) in enumerate(spans) if min(e, seq_len) - s >= min_response_tokens]
        if not fits:
            dropped_too_long += 1
            continue
        ref = fits[-1]
        start, end = spans[ref]
        if ref < len(spans) - 1:  # loss_on="all": a later turn was cut away; target this one
            reply = _reply_of_span(conversations[i], ref + 1)
        num_truncated += int(len(ids) > seq_len)
        rows.append((ids[: min(end, seq_len)], spans[: ref + 1], start, i, reply))

    if not rows:
        raise ValueError(
            f"formatting dropped all {n} records ({dropped_too_long} too long for "
            f"seq_len={seq_len}, {dropped_empty} with an empty response, {dropped_no_response} "
            "without an assistant turn after a prompt); raise seq_len or check the data."
        )
    num = len(rows)
    tokens = np.full((num, seq_len), tokenizer.pad_id, dtype=np.int32)
    loss_mask = np.zeros((num, seq_len), dtype=np.float32)
    prompt_len = np.zeros(num, dtype=np.int32)
    row_records = np.zeros(num, dtype=np.int64)
    responses = []
    for r, (ids, spans, start, i, reply) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        for s, e in spans:
            loss_mask[r, s : min(e, seq_len)] = 1.0
        prompt_len[r] = start
        row_records[r] = i
        responses.append(reply)
    examples = TokenizedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        prompt_len=prompt_len,
        labels=labels[row_records].astype(np.int32),
        label_names=names,
        responses=tuple(responses),
    )
    report = FormatReport(
        num_records=n,
        num_rows=num,
        num_truncated=num_truncated,
        dropped_too_long=dropped_too_long,
        dropped_empty=dropped_empty,
        dropped_no_response=dropped_no_response,
        row_records=row_records,
    )
    return examples, report


def _reply_of_span(conversation: Sequence[Mapping[str, str]], turn: int) -> str:
    """Content of the `turn`-th (1-based) assistant message after the first message."""
    replies = [
        _text(m.get("content"))
        for j, m in enumerate(conversation)
        if m.get("role") == "assistant" and j > 0
    ]
    return replies[turn - 1]


# ----------------------------------------------------------------------------------------------
# Plain text.
# ----------------------------------------------------------------------------------------------


def tokenize_documents(
    texts: Sequence[Any],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    groups: np.ndarray | Sequence[int] | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    label_names: Sequence[str] = ("all",),
    pack: bool = True,
) -> tuple[TokenizedExamples, FormatReport]:
    """Tokenizes plain-text documents for pre-training, packed into fixed-length rows by default.

    Every document is `bos + text + eos` (no bos when the tokenizer has none). With `pack`, the
    documents of each (group, label) pair are concatenated in record order and cut into rows of
    `seq_len` tokens, the last one padded; without it each document is one row, cut to
    `seq_len`. The loss mask is 1 at every real token.

    Args:
        texts: One document per record (None counts as empty).
        tokenizer: Any `Tokenizer`.
        seq_len: Row length T (>= 2).
        groups: [N] integer group (client) id per document; rows never mix groups. None: one
            group.
        labels: [N] label id per document (e.g. its source); rows never mix labels. None gives
            label 0.
        label_names: Name of each label id.
        pack: Pack documents into full rows (True) or one document per row (False).

    Returns:
        `(examples, report)`; `report.row_records[r]` is the record row r starts with, and
        empty documents are counted in `report.dropped_empty`.

    Raises:
        ValueError: If an argument is malformed or every document is empty.
    """
    seq_len = _check_seq_len(seq_len)
    n = len(texts)
    labels, names = _check_labels(labels, label_names, n)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    if groups.shape != (n,) or (n and not np.issubdtype(groups.dtype, np.integer)):
        raise ValueError(f"groups must be {n} integers (one per document), got {groups.shape}.")
    docs = [_text(t) for t in texts]
    kept = np.array([i for i, t in enumerate(docs) if t.strip()], dtype=np.int64)
    if kept.size == 0:
        raise ValueError(f"all {n} documents are empty; there is no text to train on.")
    ids = _encode_many(tokenizer, [docs[i] for i in kept.tolist()])
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [bos + x + [tokenizer.eos_id] for x in ids]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if pack:
        # Group key per document; a stable sort keeps record order within a key.
        _, key = np.unique(
            np.stack([groups[kept], labels[kept]], axis=1), axis=0, return_inverse=True
        )
        key = key.reshape(-1)
        order = np.argsort(key, kind="stable")
        flat = np.fromiter(
            itertools.chain.from_iterable(ids[j] for j in order.tolist()),
            dtype=np.int32,
            count=int(lengths.sum()),
        )
        tok_key = np.repeat(key[order], lengths[order])
        tok_record = np.repeat(kept[order], lengths[order])
        starts_key = np.r_[True, tok_key[1:] != tok_key[:-1]]
        first = np.maximum.accumulate(np.where(starts_key, np.arange(flat.size), 0))
        pos = np.arange(flat.size) - first
        col = pos % seq_len
        new_row = col == 0
        row = np.cumsum(new_row) - 1
        num = int(new_row.sum())
        tokens = np.full((num, seq_len), tokenizer.pad_id, dtype=np.int32)
        loss_mask = np.zeros((num, seq_len), dtype=np.float32)
        tokens[row, col] = flat
        loss_mask[row, col] = 1.0
        row_records = tok_record[new_row]
        num_truncated = 0
    else:
        num = kept.size
        tokens = np.full((num, seq_len), tokenizer.pad_id, dtype=np.int32)
        loss_mask = np.zeros((num, seq_len), dtype=np.float32)
        for r, x in enumerate(ids):
            tokens[r, : min(len(x), seq_len)] = x[:seq_len]
            loss_mask[r, : min(len(x), seq_len)] = 1.0
        row_records = kept
        num_truncated = int((lengths > seq_len).sum())
    examples = TokenizedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        prompt_len=np.ones(num, dtype=np.int32),
        labels=labels[row_records].astype(np.int32),
        label_names=names,
        responses=("",) * num,
    )
    report = FormatReport(
        num_records=n,
        num_rows=num,
        num_truncated=num_truncated,
        dropped_too_long=0,
        dropped_empty=int(n - kept.size),
        dropped_no_response=0,
        row_records=row_records.astype(np.int64),
    )
    return examples, report
