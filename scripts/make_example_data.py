"""Writes small offline example datasets in the formats real data comes in.

  python scripts/make_example_data.py                  # -> data/example/
  python scripts/make_example_data.py --out /tmp/ex --users 100 --examples 4000

Two datasets, so the real-data configs run on a machine without internet:

- ``instructions.jsonl``: Dolly-schema records (instruction / context / response / category /
  user). The tasks are the built-in task families phrased as natural-language requests (add two
  numbers, reverse or sort letters, count a letter, look up a key, copy a word, find a maximum).
  Each user has their own mix of categories (Dirichlet with concentration ``--alpha``) and their
  own number of records (lognormal), so splitting by ``user`` is a natural non-IID split.
- ``texts/<module>.txt``: plain English text for pre-training, one file per Python standard
  library module (its documentation strings), so splitting by file gives clients that each write
  about their own topic.

Replace them with your own files: `configs/smollm2_lora_instruct.yaml` and
`configs/pretrain_text.yaml` read them through ``data.path``.
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


def write_texts(folder: str) -> dict[str, int]:
    """Writes one text file per module; returns the characters per file."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name in TEXT_MODULES:
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
    texts = write_texts(os.path.join(args.out, "texts"))
    print(f"{args.out}/texts: {len(texts)} files, {sum(texts.values()):,} characters")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("make_example_data", _make, argv)


if __name__ == "__main__":
    exit_process(main())
