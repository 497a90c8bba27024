"""Built-in instruction-style task families for offline runs.

Each family draws `(prompt, response)` string pairs from a `numpy.random.Generator` with a simple
deterministic rule, so exact-match accuracy is a meaningful metric and a tiny byte-level model (2
layers, d=64) learns several families within about a minute of CPU training. With the default
ranges every sequence `bos + prompt + response + eos` is at most 23 tokens of `ByteTokenizer`, so a
`seq_len` of 32 always fits.

The family id of an example is its label: partitioners split clients by it to create label skew
(some clients see mostly `add`, others mostly `sort`), the federated analogue of class imbalance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_FAMILIES",
    "TASK_FAMILIES",
    "Example",
    "TaskFamily",
    "generate_examples",
    "generate_examples_for_labels",
    "get_task_families",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """A named generator of `(prompt, response)` pairs.

    Attributes:
        name: Registry name, e.g. `"add"`.
        generate: `generate(rng) -> (prompt, response)`; all randomness comes from `rng`, so a
            seeded generator gives a reproducible stream.
        description: One line with the rule and an example, for help texts.
    """

    name: str
    generate: Callable[[np.random.Generator], tuple[str, str]]
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction example.

    Attributes:
        prompt: Text the model is conditioned on (ends with `=`).
        response: Reference answer the model must generate.
        label: Index of the family in the `families` list the example was generated from.
    """

    prompt: str
    response: str
    label: int


def _letters(rng: np.random.Generator, length: int, alphabet: str = _LETTERS) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


def _gen_add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"{a}+{b}=", str(a + b)


def _gen_reverse(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, int(rng.integers(3, 7)))
    return f"rev {s}=", s[::-1]


def _gen_sort(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, int(rng.integers(3, 7)))
    return f"sort {s}=", "".join(sorted(s))


def _gen_count(rng: np.random.Generator) -> tuple[str, str]:
    # A 3-letter alphabet makes counts spread over 0..8 instead of being almost always 0 or 1.
    alphabet = "abc"
    s = _letters(rng, int(rng.integers(3, 9)), alphabet)
    c = alphabet[int(rng.integers(0, len(alphabet)))]
    return f"count {c} in {s}=", str(s.count(c))


def _gen_lookup(rng: np.random.Generator) -> tuple[str, str]:
    num_pairs = int(rng.integers(2, 5))
    # Distinct keys so the answer is unique; keys from a-h keep the prompt short and learnable.
    keys = [_LETTERS[i] for i in rng.choice(8, size=num_pairs, replace=False)]
    values = [int(v) for v in rng.integers(0, 10, size=num_pairs)]
    query = int(rng.integers(0, num_pairs))
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values, strict=True))
    return f"{pairs} ?{keys[query]}=", str(values[query])


def _gen_copy(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, int(rng.integers(3, 7)))
    return f"copy {s}=", s


def _gen_max(rng: np.random.Generator) -> tuple[str, str]:
    digits = [int(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 6)))]
    return "max " + " ".join(str(d) for d in digits) + "=", str(max(digits))


TASK_FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("add", _gen_add, "sum of two numbers in 0..99: '37+45=' -> '82'"),
        TaskFamily("reverse", _gen_reverse, "reverse 3-6 letters: 'rev abcde=' -> 'edcba'"),
        TaskFamily("sort", _gen_sort, "sort 3-6 letters: 'sort dbca=' -> 'abcd'"),
        TaskFamily(
            "count",
            _gen_count,
            "occurrences of a letter in 3-8 of a,b,c: 'count a in abacab=' -> '3'",
        ),
        TaskFamily(
            "lookup", _gen_lookup, "value of a key among 2-4 pairs: 'a:3 b:5 c:1 ?b=' -> '5'"
        ),
        TaskFamily("copy", _gen_copy, "copy 3-6 letters: 'copy xyz=' -> 'xyz'"),
        TaskFamily("max", _gen_max, "largest of 3-5 digits: 'max 3 9 4=' -> '9'"),
    )
}
"""Registry of the built-in task families by name."""

DEFAULT_FAMILIES: tuple[str, ...] = tuple(TASK_FAMILIES)
"""All built-in family names, in registry order."""


def get_task_families(families: Sequence[str]) -> list[TaskFamily]:
    """Looks up task families by name.

    Args:
        families: Family names from `TASK_FAMILIES`, without repeats.

    Returns:
        The `TaskFamily` objects, in the given order (the order defines the labels).

    Raises:
        ValueError: If `families` is empty or a string, has a repeat, or names an unknown family.
    """
    if isinstance(families, str):
        raise ValueError(
            f"families must be a list of names, got the string {families!r}; "
            f"write [{families!r}] for a single family."
        )
    families = list(families)
    if not families:
        raise ValueError(f"families is empty; choose one or more of {sorted(TASK_FAMILIES)}.")
    unknown = [f for f in families if f not in TASK_FAMILIES]
    if unknown:
        raise ValueError(
            f"families: unknown task family {unknown}; valid names are {sorted(TASK_FAMILIES)}."
        )
    if len(set(families)) != len(families):
        raise ValueError(
            f"families lists a family twice ({families}); each label must name one family."
        )
    return [TASK_FAMILIES[f] for f in families]


def generate_examples_for_labels(
    families: Sequence[str], labels: np.ndarray, rng: np.random.Generator
) -> list[Example]:
    """Generates one example per given label, drawing all randomness from `rng`.

    Used for class-balanced sets (e.g. the global eval set) where the label sequence is fixed.

    Args:
        families: Family names; label `i` means `families[i]`.
        labels: 1-D integer array of labels in `[0, len(families))`.
        rng: The random generator (advanced in place).

    Returns:
        `len(labels)` examples, in the order of `labels`.

    Raises:
        ValueError: If a family is unknown or a label is out of range.
    """
    fams = get_task_families(families)
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(fams)):
        raise ValueError(f"labels must lie in [0, {len(fams)}) for families {list(families)}.")
    examples = []
    for label in labels.tolist():
        prompt, response = fams[label].generate(rng)
        examples.append(Example(prompt, response, label))
    return examples


def generate_examples(families: Sequence[str], num_examples: int, seed: int) -> list[Example]:
    """Generates a uniform mixture of examples over task families.

    Each example first draws its family uniformly, then its content, from one generator seeded by
    `seed`; so the result is deterministic, and the first `k` examples of a call with
    `num_examples=n` equal those of a call with `num_examples=k`.

    Args:
        families: Family names from `TASK_FAMILIES`; an example's label is its family's index here.
        num_examples: Number of examples (>= 0).
        seed: Non-negative integer seed.

    Returns:
        The list of examples.

    Raises:
        ValueError: If a family is unknown (the message lists the valid names), `families` is empty
            or repeats a name, `num_examples` is negative or `seed` is negative.
    """
    fams = get_task_families(families)
    if int(num_examples) != num_examples or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}.")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    rng = np.random.default_rng(int(seed))
    examples = []
    for _ in range(int(num_examples)):
        label = int(rng.integers(0, len(fams)))
        prompt, response = fams[label].generate(rng)
        examples.append(Example(prompt, response, label))
    return examples
