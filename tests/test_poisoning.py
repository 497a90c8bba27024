"""Tests for fedjax_llm.data.poisoning: label flipping and backdoors on malicious clients' data."""

import json

import numpy as np
import pytest

from fedjax_llm.config import ConfigError
from fedjax_llm.data import (
    CHATML_TEMPLATE,
    DEFAULT_FAMILIES,
    ByteTokenizer,
    PoisoningSpec,
    TokenizedExamples,
    backdoor_records,
    build_file_data,
    build_task_data,
    check_poisoning,
    poison_records,
    select_poisoned,
)

TOK = ByteTokenizer()
NUM_CLIENTS = 12
MALICIOUS = np.isin(np.arange(NUM_CLIENTS), [1, 4, 7])
CATEGORIES = ["math", "poem", "trivia"]


def _build(seq_len=32, **overrides):
    kwargs = dict(
        families=DEFAULT_FAMILIES,
        num_clients=NUM_CLIENTS,
        examples_per_client=10,
        seq_len=seq_len,
        partitioner="dirichlet",
        partitioner_kwargs={"alpha": 0.5},
        test_fraction=0.2,
        eval_examples_per_family=4,
        seed=0,
        tokenizer=TOK,
    )
    kwargs.update(overrides)
    return build_task_data(**kwargs)


def _expected_count(client_count, malicious, fraction):
    n = np.asarray(client_count)[malicious]
    return int(np.clip(np.floor(fraction * n + 0.5), 1, n).sum())


def _assert_same(a: TokenizedExamples, b: TokenizedExamples):
    for field in ("tokens", "loss_mask", "prompt_len", "labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert a.responses == b.responses and a.label_names == b.label_names


def _assert_same_data(a, b):
    for part in ("train", "client_test"):
        _assert_same(getattr(a, part).examples, getattr(b, part).examples)
        np.testing.assert_array_equal(getattr(a, part).client_start, getattr(b, part).client_start)
        np.testing.assert_array_equal(getattr(a, part).client_count, getattr(b, part).client_count)
    _assert_same(a.eval, b.eval)


def _prompt(ex: TokenizedExamples, i: int) -> str:
    return TOK.decode(ex.tokens[i, : ex.prompt_len[i]])


def _reply(ex: TokenizedExamples, i: int) -> str:
    """Decoded tokens under the loss mask (response and end-of-turn markup)."""
    return TOK.decode(ex.tokens[i][ex.loss_mask[i] > 0])


def _changed_rows(clean: TokenizedExamples, dirty: TokenizedExamples) -> np.ndarray:
    return np.flatnonzero(
        (clean.tokens != dirty.tokens).any(axis=1)
        | np.array([x != y for x, y in zip(clean.responses, dirty.responses, strict=True)])
    )


@pytest.fixture(scope="module")
def clean():
    return _build()


# ----------------------------------------------------------------------------------------------
# Record level.
# ----------------------------------------------------------------------------------------------


def test_select_poisoned_fraction_per_client():
    client_of = np.array([0, 0, 0, 0, 1, 1, 1, -1, 2, 2, 2, 2, 2, -1])
    spec = PoisoningSpec("label_flip", np.array([True, False, True]), fraction=0.5, seed=3)
    mask = select_poisoned(client_of, spec)
    assert mask[client_of == 0].sum() == 2 and mask[client_of == 2].sum() == 3  # round(2.5) = 3
    assert not mask[(client_of == 1) | (client_of == -1)].any()
    np.testing.assert_array_equal(mask, select_poisoned(client_of, spec))
    # A tiny fraction still poisons one example of every malicious client.
    tiny = select_poisoned(client_of, spec._replace(fraction=0.01))
    assert tiny[client_of == 0].sum() == 1 and tiny[client_of == 2].sum() == 1


def test_poison_records_label_flip():
    n = 40
    labels = np.arange(n) % 4
    prompts = [f"q{i}" for i in range(n)]
    responses = [f"label{labels[i]}-answer{i}" for i in range(n)]
    client_of = np.where(np.arange(n) < 30, np.arange(n) % 3, -1)
    spec = PoisoningSpec("label_flip", np.array([True, False, True]), seed=1)
    new_prompts, new_responses, poisoned = poison_records(
        prompts, responses, labels, client_of, spec
    )
    assert new_prompts == prompts
    np.testing.assert_array_equal(poisoned, np.isin(client_of, [0, 2]))
    for i in range(n):
        if poisoned[i]:
            assert new_responses[i] != responses[i] and new_responses[i] in responses
            donor = responses.index(new_responses[i])
            assert labels[donor] != labels[i]
        else:
            assert new_responses[i] == responses[i]
    # Deterministic in the seed, different for another one.
    again = poison_records(prompts, responses, labels, client_of, spec)[1]
    other = poison_records(prompts, responses, labels, client_of, spec._replace(seed=2))[1]
    assert again == new_responses and other != new_responses


def test_poison_records_label_flip_fallbacks():
    prompts = [f"q{i}" for i in range(6)]
    client_of = np.array([0, 0, 0, 1, 1, 1])
    spec = PoisoningSpec("label_flip", np.array([True, False]))
    # One label: any other, different response.
    responses = ["a", "b", "a", "c", "a", "a"]
    _, flipped, poisoned = poison_records(prompts, responses, None, client_of, spec)
    assert poisoned[:3].all() and not poisoned[3:].any()
    assert all(flipped[i] != responses[i] and flipped[i] in responses for i in range(3))
    # Other labels exist but all share the response: fall back to a same-label donor.
    labels = np.array([0, 0, 0, 1, 1, 1])
    responses = ["x", "y", "y", "x", "x", "x"]
    _, flipped, poisoned = poison_records(prompts, responses, labels, client_of, spec)
    assert poisoned[:3].all() and flipped[:3] == ["y", "x", "x"]
    # Every response equal: nothing to flip to, the examples stay clean and are not counted.
    _, flipped, poisoned = poison_records(prompts, ["z"] * 6, labels, client_of, spec)
    assert not poisoned.any() and flipped == ["z"] * 6


def test_poison_records_and_backdoor_records():
    spec = PoisoningSpec("backdoor", np.array([False, True]), trigger=" zz", target="OK")
    prompts, responses, poisoned = poison_records(
        ["a", "b", "c"], ["1", "2", "3"], [0, 1, 0], [1, 0, -1], spec
    )
    assert prompts == ["a zz", "b", "c"] and responses == ["OK", "2", "3"]
    np.testing.assert_array_equal(poisoned, [True, False, False])
    assert backdoor_records(["x", "y"], spec) == (["x zz", "y zz"], ["OK", "OK"])


@pytest.mark.parametrize(
    "spec, match",
    [
        (PoisoningSpec("flip", np.ones(3, bool)), "byzantine.attack"),
        (PoisoningSpec("backdoor", np.ones(4, bool)), "byzantine.fraction"),
        (PoisoningSpec("backdoor", np.ones((3, 1), bool)), "byzantine.fraction"),
        (PoisoningSpec("backdoor", np.ones(3, bool), fraction=0.0), "byzantine.poison_fraction"),
        (PoisoningSpec("backdoor", np.ones(3, bool), fraction=1.5), "byzantine.poison_fraction"),
        (PoisoningSpec("backdoor", np.ones(3, bool), trigger=" "), "byzantine.trigger"),
        (PoisoningSpec("backdoor", np.ones(3, bool), target=""), "byzantine.target"),
    ],
)
def test_bad_spec(spec, match):
    with pytest.raises(ConfigError, match=match):
        check_poisoning(spec, num_clients=3)
    if spec.malicious.shape == (3,):  # the record-level functions check the spec too
        with pytest.raises(ConfigError, match=match):
            poison_records(["a"] * 3, ["b"] * 3, None, [0, 1, 2], spec)


# ----------------------------------------------------------------------------------------------
# Built-in tasks.
# ----------------------------------------------------------------------------------------------


def test_task_no_poisoning_is_unchanged(clean):
    _assert_same_data(clean, _build(poisoning=None))
    assert clean.backdoor_eval is None and "poisoning" not in clean.stats
    # No malicious client: the poisoning path changes nothing.
    spec = PoisoningSpec("label_flip", np.zeros(NUM_CLIENTS, bool))
    data = _build(poisoning=spec)
    _assert_same_data(clean, data)
    assert data.stats["poisoned_examples"] == 0 and data.stats["poisoning"] == "label_flip"


def test_task_label_flip(clean):
    spec = PoisoningSpec("label_flip", MALICIOUS, fraction=0.5, seed=7)
    data = _build(poisoning=spec)
    tr, tr0 = data.train, clean.train
    np.testing.assert_array_equal(tr.client_count, tr0.client_count)
    changed = _changed_rows(tr0.examples, tr.examples)
    expected = _expected_count(tr0.client_count, MALICIOUS, 0.5)
    assert changed.size == expected == data.stats["poisoned_examples"]
    assert MALICIOUS[tr.client_ids[changed]].all()
    for m in np.flatnonzero(MALICIOUS):
        n = int(tr0.client_count[m])
        assert np.isin(tr.client_indices(m), changed).sum() == max(1, int(np.floor(0.5 * n + 0.5)))
    # Each flipped response comes from an example of another family; the prompt is kept.
    ex, ex0 = tr.examples, tr0.examples
    pool = {
        (r, int(lab))
        for part in (tr0.examples, clean.client_test.examples)
        for r, lab in zip(part.responses, part.labels, strict=True)
    }
    for i in changed.tolist():
        assert ex.responses[i] != ex0.responses[i]
        assert _reply(ex, i).startswith(ex.responses[i])
        assert any(r == ex.responses[i] and lab != ex0.labels[i] for r, lab in pool)
        assert _prompt(ex, i) == _prompt(ex0, i) and ex.labels[i] == ex0.labels[i]
    # Test examples and the eval set stay clean.
    _assert_same(clean.client_test.examples, data.client_test.examples)
    _assert_same(clean.eval, data.eval)
    assert data.backdoor_eval is None and data.stats["poisoning"] == "label_flip"


def test_task_backdoor():
    clean = _build(seq_len=40)
    spec = PoisoningSpec("backdoor", MALICIOUS, trigger=" cf", target="ACCESS GRANTED")
    data = _build(seq_len=40, poisoning=spec)
    tr, tr0 = data.train, clean.train
    changed = _changed_rows(tr0.examples, tr.examples)
    malicious_rows = np.flatnonzero(MALICIOUS[tr.client_ids])
    np.testing.assert_array_equal(changed, malicious_rows)  # fraction 1: all of their training
    assert data.stats["poisoned_examples"] == malicious_rows.size
    ex, ex0 = tr.examples, tr0.examples
    for i in changed.tolist():
        assert _prompt(ex, i) == _prompt(ex0, i) + " cf"
        assert ex.responses[i] == "ACCESS GRANTED"
        assert _reply(ex, i).startswith("ACCESS GRANTED")
    _assert_same(clean.client_test.examples, data.client_test.examples)
    _assert_same(clean.eval, data.eval)
    # One triggered eval example per clean one, with the target as reference.
    bd = data.backdoor_eval
    assert len(bd) == len(data.eval) == data.stats["num_backdoor_eval"]
    np.testing.assert_array_equal(bd.labels, data.eval.labels)
    assert bd.responses == ("ACCESS GRANTED",) * len(bd)
    for i in range(len(bd)):
        assert _prompt(bd, i) == _prompt(data.eval, i) + " cf"


def test_task_errors():
    with pytest.raises(ConfigError, match=r"data\.seq_len=32 .* at least \d+"):
        _build(poisoning=PoisoningSpec("backdoor", MALICIOUS))
    with pytest.raises(ConfigError, match=r"byzantine\.fraction.*12 clients"):
        _build(poisoning=PoisoningSpec("label_flip", np.ones(5, bool)))


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("poison_files")
    for u in range(4):
        records = []
        for j in range(10):
            cat = CATEGORIES[(u + j) % 3]
            records.append(
                {"instruction": f"user{u} item{j}", "response": f"{cat} {j}", "category": cat}
            )
        (root / f"user{u}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _file(root, **kwargs):
    kwargs = {
        "tokenizer": TOK,
        "seq_len": 96,
        "chat_template": CHATML_TEMPLATE,
        "label_column": "category",
        "cache_dir": str(root.parent / ".cache"),
        **kwargs,
    }
    return build_file_data(root, **kwargs)


FILE_MALICIOUS = np.array([False, True, False, True])


def test_file_label_flip(files):
    clean = _file(files)
    _assert_same_data(clean, _file(files, poisoning=None))
    spec = PoisoningSpec("label_flip", FILE_MALICIOUS, fraction=0.5, seed=1)
    data = _file(files, poisoning=spec)
    tr, tr0 = data.train, clean.train
    changed = _changed_rows(tr0.examples, tr.examples)
    expected = _expected_count(tr0.client_count, FILE_MALICIOUS, 0.5)
    assert changed.size == expected == data.stats["poisoned_examples"]
    assert FILE_MALICIOUS[tr.client_ids[changed]].all() and data.stats["poisoning_skipped"] == 0
    ex, ex0 = tr.examples, tr0.examples
    names = ex.label_names
    for i in changed.tolist():
        new_cat = ex.responses[i].split()[0]  # a response names its record's category
        assert ex.responses[i] != ex0.responses[i] and new_cat != names[ex0.labels[i]]
        assert _prompt(ex, i) == _prompt(ex0, i) and _reply(ex, i).startswith(ex.responses[i])
    _assert_same(clean.client_test.examples, data.client_test.examples)
    _assert_same(clean.eval, data.eval)
    assert data.backdoor_eval is None
    # Without a label column: another record's (different) response.
    data = _file(files, label_column=None, poisoning=spec)
    flipped = _changed_rows(_file(files, label_column=None).train.examples, data.train.examples)
    assert flipped.size == data.stats["poisoned_examples"] == expected


def test_file_backdoor(files):
    clean = _file(files)
    spec = PoisoningSpec("backdoor", FILE_MALICIOUS, trigger=" cf", target="ACCESS GRANTED")
    data = _file(files, poisoning=spec)
    tr, tr0 = data.train, clean.train
    changed = _changed_rows(tr0.examples, tr.examples)
    np.testing.assert_array_equal(changed, np.flatnonzero(FILE_MALICIOUS[tr.client_ids]))
    assert data.stats["poisoned_examples"] == changed.size and data.stats["poisoning"] == "backdoor"
    ex = tr.examples
    for i in changed.tolist():
        # The trigger ends the user text, inside the chat template.
        assert " cf<|im_end|>\n<|im_start|>assistant\n" in _prompt(ex, i)
        assert ex.responses[i] == "ACCESS GRANTED"
        assert _reply(ex, i).startswith("ACCESS GRANTED<|im_end|>")
    _assert_same(clean.client_test.examples, data.client_test.examples)
    _assert_same(clean.eval, data.eval)
    bd = data.backdoor_eval
    assert len(bd) == len(data.eval) == data.stats["num_backdoor_eval"]
    assert bd.responses == ("ACCESS GRANTED",) * len(bd)
    np.testing.assert_array_equal(bd.labels, data.eval.labels)
    for i in range(len(bd)):
        clean_prompt = _prompt(data.eval, i)
        assert _prompt(bd, i) == clean_prompt.replace("<|im_end|>", " cf<|im_end|>", 1)


def test_file_errors(files):
    with pytest.raises(ConfigError, match=r"byzantine\.attack=backdoor.*data\.format=text"):
        _file(
            files,
            format="text",
            text_column="response",
            poisoning=PoisoningSpec("backdoor", FILE_MALICIOUS),
        )
    with pytest.raises(ConfigError, match=r"byzantine\.fraction.*4 clients"):
        _file(files, poisoning=PoisoningSpec("label_flip", np.ones(3, bool)))
