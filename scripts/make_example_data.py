"""Writes small offline example datasets in the formats real data comes in.

  python scripts/make_example_data.py                  # -> data/example/
  python scripts/make_example_data.py --out /tmp/ex --users 100 --examples 4000 --pairs 2000

Four datasets, so the real-data configs run on a machine without internet:

- ``instructions.jsonl``: Dolly-schema records (instruction / context / response / category /
  user). The tasks are the built-in task families phrased as natural-language requests (add two
  numbers, reverse or sort letters, count a letter, look up a key, copy a word, find a maximum).
  Each user has their own mix of categories (Dirichlet with concentration ``--alpha``) and their
  own number of records (lognormal), so splitting by ``user`` is a natural non-IID split.
- ``preferences.jsonl``: preference pairs for DPO (prompt / chosen / rejected / category /
  user) from the same task families: the prompt is the request (and its context), ``chosen``
  the correct answer and ``rejected`` in half of the pairs a plausible wrong one (a sum or count
  off by one, the word left unreversed or unsorted, another value of the table or the list), in
  the other half an unhelpful one (a refusal, a hedge, chatter). Users again have their
  own category mix and size (drawn independently of the instruction file), so splitting by
  ``user`` is a natural non-IID split; ``data.format: preference`` (or ``auto``) reads it.
- ``texts/<module>.txt``: plain English text for pre-training, one file per Python standard
  library module (its documentation strings), so splitting by file gives clients that each write
  about their own topic.
- ``public/<module>.txt``: the server's public text for pre-training with public and private
  data (``public.path``), written the same way from other standard-library modules, so the
  public text differs from every client's private text.

Replace them with your own files: `configs/smollm2_lora_instruct.yaml` and
`configs/pretrain_text.yaml` read them through ``data.path``, and
`configs/pretrain_public_private.yaml` the public text through ``public.path``. ``--pairs`` sets
the number of preference pairs; the instruction and text files do not depend on it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.data.tasks import TASK_FAMILIES, generate_examples_for_labels

FAMILIES = ("add", "reverse", "sort", "count", "lookup", "copy", "max")
TEXT_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "csv", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "http.client", "itertools", "json",
    "logging", "math", "pathlib", "random", "re", "shutil", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip
PUBLIC_MODULES = (
    "array", "base64", "codecs", "configparser", "contextlib", "dataclasses", "enum",
    "ipaddress", "locale", "optparse", "smtplib", "socketserver", "tempfile", "timeit", "uuid",
    "wave",
)  # fmt: skip
"""The modules of the public text: none of them is in `TEXT_MODULES`."""


def _instruction(family: str, prompt: str) -> tuple[str, str]:
    """Phrases a built-in task prompt as a request; returns (instruction, context)."""
    body = prompt.rstrip("=")
    if family == "add":
        return f"What is {body.replace('+', ' + ')}? Answer with the number only.", ""
    if family == "reverse":
        return "Reverse the letters of the word below.", body.removeprefix("rev ")
    if family == "sort":
        return "Sort the letters of the word below alphabetically.", body.removeprefix("sort ")
    if family == "count":
        match = re.fullmatch(r"count (\w) in (\w+)", body)
        letter, word = match.groups() if match else ("?", body)
        return f"How many times does the letter {letter} occur in {word}?", ""
    if family == "lookup":
        table, _, key = body.rpartition(" ?")
        return f"In the table below, what is the value of {key}?", table
    if family == "copy":
        return "Repeat the word below exactly.", body.removeprefix("copy ")
    if family == "max":
        return "What is the largest number in the list below?", body.removeprefix("max ")
    raise ValueError(f"no phrasing for task family {family!r}")


def write_instructions(path: str, num_users: int, num_examples: int, alpha: float, seed: int):
    """Writes the Dolly-schema instruction file; returns the number of records per user."""
    rng = np.random.default_rng(seed)
    preferences = rng.dirichlet(np.full(len(FAMILIES), alpha), size=num_users)
    sizes = rng.lognormal(0.0, 0.8, num_users)
    user_of = rng.choice(num_users, size=num_examples, p=sizes / sizes.sum())
    labels = np.array([rng.choice(len(FAMILIES), p=preferences[u]) for u in user_of])
    examples = generate_examples_for_labels(list(FAMILIES), labels, rng)
    with open(path, "w") as f:
        for user, example in zip(user_of, examples, strict=True):
            family = FAMILIES[example.label]
            instruction, context = _instruction(family, example.prompt)
            record = {
                "instruction": instruction,
                "context": context,
                "response": example.response,
                "category": family,
                "user": f"user{user:03d}",
            }
            f.write(json.dumps(record) + "\n")
    return np.bincount(user_of, minlength=num_users)


def _other_letter(word: str) -> str:
    """`word` with its last letter replaced by the next one of the alphabet (always differs)."""
    return word[:-1] + chr((ord(word[-1]) - ord("a") + 1) % 26 + ord("a"))


def _wrong_answer(family: str, prompt: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer to a built-in task prompt (never equal to `answer`)."""
    body = prompt.rstrip("=")
    if family in ("add", "count"):
        value = int(answer) + int(rng.choice([-1, 1]))
        wrong = str(value if value >= 0 else int(answer) + 1)
    elif family == "reverse":
        wrong = body.removeprefix("rev ")  # left unreversed
    elif family == "sort":
        wrong = body.removeprefix("sort ")  # left unsorted
    elif family == "copy":
        wrong = answer[::-1]
    elif family == "lookup":
        table = body.rpartition(" ?")[0]
        others = sorted({v for v in re.findall(r":(\d+)", table) if v != answer})
        wrong = str(rng.choice(others)) if others else str(int(answer) + 1)
    elif family == "max":
        others = sorted({d for d in body.removeprefix("max ").split() if d != answer})
        wrong = others[-1] if others else str(int(answer) - 1 if int(answer) > 0 else 1)
    else:
        raise ValueError(f"no wrong answer for task family {family!r}")
    if wrong == answer:  # a palindrome, or letters already in order
        wrong = _other_letter(answer)
    return wrong


UNHELPFUL = (
    "Sorry, I cannot help with that.",
    "I think it might be {wrong}, but I am not sure. You should check it yourself.",
    "That is an interesting question! Many people wonder about this. The answer is {wrong}.",
)
"""Unhelpful rejected answers (a refusal, a hedge, chatter), as preference data also rank
style and helpfulness, not only correctness; ``{wrong}`` is a wrong answer."""


def _rejected(family: str, prompt: str, answer: str, rng: np.random.Generator) -> str:
    """Half of the pairs reject a plausible wrong answer, half an unhelpful one."""
    wrong = _wrong_answer(family, prompt, answer, rng)
    if rng.random() < 0.5:
        return wrong
    return UNHELPFUL[int(rng.integers(len(UNHELPFUL)))].format(wrong=wrong)


def write_preferences(path: str, num_users: int, num_pairs: int, alpha: float, seed: int):
    """Writes the preference-pair file; returns the number of pairs per user.

    Its random stream is its own (seeded by `seed`), so the instruction file is the same with or
    without it.
    """
    rng = np.random.default_rng([seed, 1])
    preferences = rng.dirichlet(np.full(len(FAMILIES), alpha), size=num_users)
    sizes = rng.lognormal(0.0, 0.8, num_users)
    user_of = rng.choice(num_users, size=num_pairs, p=sizes / sizes.sum())
    labels = np.array([rng.choice(len(FAMILIES), p=preferences[u]) for u in user_of], dtype=int)
    examples = generate_examples_for_labels(list(FAMILIES), labels, rng)
    with open(path, "w") as f:
        for user, example in zip(user_of, examples, strict=True):
            family = FAMILIES[example.label]
            instruction, context = _instruction(family, example.prompt)
            record = {
                "prompt": f"{instruction}\n\n{context}" if context else instruction,
                "chosen": example.response,
                "rejected": _rejected(family, example.prompt, example.response, rng),
                "category": family,
                "user": f"user{user:03d}",
            }
            f.write(json.dumps(record) + "\n")
    return np.bincount(user_of, minlength=num_users)


def module_text(name: str) -> str:
    """The documentation strings of a standard-library module and its public members."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for member_name, member in sorted(vars(module).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(member)
        if doc:
            parts.append(f"{member_name}: {doc}")
    return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n"


def write_texts(folder: str, modules: Sequence[str] = TEXT_MODULES) -> dict[str, int]:
    """Writes one text file per module; returns the characters per file."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name in modules:
        text = module_text(name)
        file = os.path.join(folder, f"{name.replace('.', '_')}.txt")
        with open(file, "w") as f:
            f.write(text)
        written[os.path.basename(file)] = len(text)
    return written


def _make(argv: list[str] | None, context: ScriptContext) -> int:
    del context  # no run directory: an unexpected error's log goes to the temporary folder
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/example")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=1000, help="preference pairs")
    parser.add_argument("--alpha", type=float, default=0.3, help="users' category concentration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    assert set(FAMILIES) <= set(TASK_FAMILIES)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "instructions.jsonl")
    counts = write_instructions(path, args.users, args.examples, args.alpha, args.seed)
    print(
        f"{path}: {args.examples} records from {np.count_nonzero(counts)} users "
        f"({counts.min()}-{counts.max()} each), categories {', '.join(FAMILIES)}"
    )
    path = os.path.join(args.out, "preferences.jsonl")
    counts = write_preferences(path, args.users, args.pairs, args.alpha, args.seed)
    print(
        f"{path}: {args.pairs} preference pairs from {np.count_nonzero(counts)} users "
        f"({counts.min()}-{counts.max()} each), categories {', '.join(FAMILIES)}"
    )
    texts = write_texts(os.path.join(args.out, "texts"))
    print(f"{args.out}/texts: {len(texts)} files, {sum(texts.values()):,} characters")
    public = write_texts(os.path.join(args.out, "public"), PUBLIC_MODULES)
    print(f"{args.out}/public: {len(public)} files, {sum(public.values()):,} characters")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("make_example_data", _make, argv)


if __name__ == "__main__":
    exit_process(main())
