"""Tests for fedjax_llm.data.tasks: every family's rule is recomputed from the parsed prompt."""

import re

import numpy as np
import pytest

from fedjax_llm.data import (
    DEFAULT_FAMILIES,
    TASK_FAMILIES,
    ByteTokenizer,
    generate_examples,
    generate_examples_for_labels,
)


def _solve_add(prompt):
    a, b = re.fullmatch(r"(\d{1,2})\+(\d{1,2})=", prompt).groups()
    return str(int(a) + int(b))


def _solve_reverse(prompt):
    return re.fullmatch(r"rev ([a-z]{3,6})=", prompt).group(1)[::-1]


def _solve_sort(prompt):
    return "".join(sorted(re.fullmatch(r"sort ([a-z]{3,6})=", prompt).group(1)))


def _solve_count(prompt):
    c, s = re.fullmatch(r"count ([a-z]) in ([a-z]{3,8})=", prompt).groups()
    return str(s.count(c))


def _solve_lookup(prompt):
    pairs, query = re.fullmatch(r"((?:[a-z]:\d ){2,4})\?([a-z])=", prompt).groups()
    table = dict(p.split(":") for p in pairs.split())
    assert len(table) == len(pairs.split()), "keys must be distinct so the answer is unique"
    return table[query]


def _solve_copy(prompt):
    return re.fullmatch(r"copy ([a-z]{3,6})=", prompt).group(1)


def _solve_max(prompt):
    digits = re.fullmatch(r"max (\d(?: \d){2,4})=", prompt).group(1).split()
    return max(digits)


SOLVERS = {
    "add": _solve_add,
    "reverse": _solve_reverse,
    "sort": _solve_sort,
    "count": _solve_count,
    "lookup": _solve_lookup,
    "copy": _solve_copy,
    "max": _solve_max,
}


def test_required_families_registered():
    assert set(SOLVERS) <= set(TASK_FAMILIES)
    assert DEFAULT_FAMILIES == tuple(TASK_FAMILIES)
    for name, family in TASK_FAMILIES.items():
        assert family.name == name and family.description


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_family_rule(name):
    rng = np.random.default_rng(0)
    responses = set()
    for _ in range(500):
        prompt, response = TASK_FAMILIES[name].generate(rng)
        assert SOLVERS[name](prompt) == response, (prompt, response)
        assert 1 <= len(response) <= 8
        responses.add(response)
    assert len(responses) > 1  # not a constant answer


@pytest.mark.parametrize("name", sorted(TASK_FAMILIES))
def test_sequences_fit_32_tokens(name):
    tok = ByteTokenizer()
    rng = np.random.default_rng(1)
    for _ in range(2000):
        prompt, response = TASK_FAMILIES[name].generate(rng)
        assert 2 + len(tok.encode(prompt)) + len(tok.encode(response)) <= 32


def test_generate_examples_deterministic_and_prefix_stable():
    a = generate_examples(DEFAULT_FAMILIES, 200, seed=3)
    b = generate_examples(DEFAULT_FAMILIES, 200, seed=3)
    c = generate_examples(DEFAULT_FAMILIES, 200, seed=4)
    assert a == b
    assert a != c
    assert generate_examples(DEFAULT_FAMILIES, 50, seed=3) == a[:50]


def test_generate_examples_labels_and_mixture():
    families = ["max", "add", "copy"]
    examples = generate_examples(families, 3000, seed=0)
    labels = np.array([e.label for e in examples])
    counts = np.bincount(labels, minlength=3)
    assert counts.sum() == 3000 and np.all(np.abs(counts - 1000) < 120)  # uniform mixture
    for e in examples:
        assert SOLVERS[families[e.label]](e.prompt) == e.response


def test_generate_examples_for_labels():
    labels = np.array([2, 0, 1, 1])
    examples = generate_examples_for_labels(
        ["add", "sort", "count"], labels, np.random.default_rng(0)
    )
    assert [e.label for e in examples] == [2, 0, 1, 1]
    assert examples[0].prompt.startswith("count ")
    with pytest.raises(ValueError, match="labels"):
        generate_examples_for_labels(["add"], np.array([1]), np.random.default_rng(0))


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError, match="families.*valid names.*'add'"):
        generate_examples(["add", "nope"], 10, seed=0)


@pytest.mark.parametrize(
    "families, num_examples, seed, match",
    [
        ([], 10, 0, "families"),
        ("add", 10, 0, "families"),
        (["add", "add"], 10, 0, "families"),
        (["add"], -1, 0, "num_examples"),
        (["add"], 10, -1, "seed"),
    ],
)
def test_bad_arguments(families, num_examples, seed, match):
    with pytest.raises(ValueError, match=match):
        generate_examples(families, num_examples, seed)
