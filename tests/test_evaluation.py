"""Tests of fedjax_llm/evaluation.py: the global and per-client summaries of per-example sums, and
evaluation of any objective over per-example arrays."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.data import FederatedDataset, TokenizedExamples
from fedjax_llm.evaluation import (
    evaluate_arrays,
    make_arrays_eval_step,
    per_client_results,
    summarize_arrays,
    summarize_clients,
    summarize_global,
)
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective


def make_examples(labels, label_names) -> TokenizedExamples:
    n = len(labels)
    return TokenizedExamples(
        tokens=np.zeros((n, 4), np.int32),
        loss_mask=np.zeros((n, 4), np.float32),
        prompt_len=np.ones(n, np.int32),
        labels=np.asarray(labels, np.int32),
        label_names=tuple(label_names),
        responses=("",) * n,
    )


def make_dataset(counts) -> FederatedDataset:
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return FederatedDataset(make_examples([0] * int(counts.sum()), ("all",)), starts, counts)


# --- summarize_global -------------------------------------------------------------------------


def test_summarize_global_overall_and_per_label():
    per_example = {
        "loss_sum": np.array([1.0, 3.0, 2.0, 6.0, 0.5]),
        "target_tokens": np.array([1.0, 2.0, 2.0, 3.0, 1.0]),
        "exact_match": np.array([1.0, 0.0, 1.0, 1.0, 0.0]),
    }
    examples = make_examples([0, 1, 0, 1, 1], ("copy", "add", "unused"))
    out = summarize_global(per_example, examples)
    # A label without held-out examples gets no metrics, but is reported.
    assert out.pop("eval/num_missing_labels") == 1
    assert out.pop("eval/missing_labels") == "unused"

    loss = 12.5 / 9.0
    copy_loss = 3.0 / 3.0
    add_loss = 9.5 / 6.0
    assert out == pytest.approx(
        {
            "eval/loss": loss,
            "eval/perplexity": math.exp(loss),
            "eval/exact_match": 3 / 5,
            "eval/exact_match/copy": 1.0,
            "eval/exact_match/add": 1 / 3,
            "eval/perplexity/copy": math.exp(copy_loss),
            "eval/perplexity/add": math.exp(add_loss),
        },
        rel=1e-12,
    )


def test_summarize_global_with_one_label_and_no_exact_match_caps_perplexity():
    per_example = {"loss_sum": np.array([300.0, 100.0]), "target_tokens": np.array([2.0, 2.0])}
    out = summarize_global(per_example, make_examples([0, 0], ("text",)))
    assert out == {"eval/loss": 100.0, "eval/perplexity": math.exp(50.0)}


def test_summarize_global_without_target_tokens_is_zero_loss():
    per_example = {"loss_sum": np.zeros(3), "target_tokens": np.zeros(3)}
    out = summarize_global(per_example, make_examples([0, 0, 0], ("text",)))
    assert out == {"eval/loss": 0.0, "eval/perplexity": 1.0}


# --- summarize_clients ------------------------------------------------------------------------


def test_summarize_clients_closed_form():
    # Three clients of 2, 1 and 3 examples: losses 4/2 = 2, 6/2 = 3 and 6/6 = 1.
    per_example = {
        "loss_sum": np.array([1.0, 3.0, 6.0, 2.0, 2.0, 2.0]),
        "target_tokens": np.array([1.0, 1.0, 2.0, 1.0, 1.0, 4.0]),
        "exact_match": np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
    }
    out = summarize_clients(per_example, make_dataset([2, 1, 3]))
    # 10% of 3 clients rounds up to one client.
    assert out == pytest.approx(
        {
            "client/loss_mean": 2.0,
            "client/loss_worst10": 3.0,
            "client/perplexity_mean": (math.e**2 + math.e**3 + math.e) / 3,
            "client/perplexity_worst10": math.e**3,
            "client/exact_match_mean": (0.5 + 1.0 + 1 / 3) / 3,
            "client/exact_match_worst10": 1 / 3,
        },
        rel=1e-12,
    )


def _random_clients(num_clients: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random example counts per client and per-example evaluation sums for them."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=num_clients)
    n = int(counts.sum())
    target_tokens = rng.integers(0, 4, size=n).astype(np.float64)
    per_example = {
        # A loss sums over target tokens: zero where an example has none.
        "loss_sum": target_tokens * rng.uniform(0, 4, size=n),
        "target_tokens": target_tokens,
        "exact_match": rng.integers(0, 2, size=n).astype(np.float64),
    }
    return counts, per_example


@pytest.mark.parametrize("num_clients, worst", [(9, 1), (10, 1), (11, 2), (20, 2), (21, 3)])
def test_summarize_clients_worst_ten_percent_is_the_mean_of_the_worst_tenth(num_clients, worst):
    counts, per_example = _random_clients(num_clients, seed=num_clients)
    out = summarize_clients(per_example, make_dataset(counts))

    # Independently: slice each client's rows.
    losses, exact = [], []
    begin = 0
    for c in counts:
        rows = slice(begin, begin + c)
        tokens = per_example["target_tokens"][rows].sum()
        losses.append(per_example["loss_sum"][rows].sum() / tokens if tokens else 0.0)
        exact.append(per_example["exact_match"][rows].mean())
        begin += c
    losses = np.array(losses)
    assert out["client/loss_mean"] == pytest.approx(losses.mean(), rel=1e-12)
    assert out["client/loss_worst10"] == pytest.approx(np.sort(losses)[-worst:].mean(), rel=1e-12)
    assert out["client/perplexity_worst10"] == pytest.approx(
        np.exp(np.sort(losses)[-worst:]).mean(), rel=1e-12
    )
    assert out["client/exact_match_mean"] == pytest.approx(np.mean(exact), rel=1e-12)
    assert out["client/exact_match_worst10"] == pytest.approx(
        np.sort(exact)[:worst].mean(), rel=1e-12
    )


def test_missing_labels_are_listed_in_label_order_and_serialize():
    per_example = {"loss_sum": np.ones(3), "target_tokens": np.ones(3)}
    names = ("open_qa", "brainstorming", "classification", "summarization")
    out = summarize_global(per_example, make_examples([1, 1, 3], names))
    assert out["eval/num_missing_labels"] == 2
    assert out["eval/missing_labels"] == "open_qa, classification"
    assert set(out) == {
        "eval/loss",
        "eval/perplexity",
        "eval/perplexity/brainstorming",
        "eval/perplexity/summarization",
        "eval/num_missing_labels",
        "eval/missing_labels",
    }
    assert json.loads(json.dumps(out)) == out  # a flat record for metrics.jsonl
    full = summarize_global(per_example, make_examples([0, 1, 2], names[:3]))
    assert not any("missing" in key for key in full)


def test_per_client_results_match_the_aggregates_client_by_client():
    counts, per_example = _random_clients(13, seed=0)
    dataset = make_dataset(counts)
    rows = per_client_results(per_example, dataset)
    assert json.loads(json.dumps(rows)) == rows
    assert [r["client"] for r in rows] == list(range(13))
    assert [r["num_examples"] for r in rows] == counts.tolist()
    begin = 0
    for row, c in zip(rows, counts, strict=True):
        part = slice(begin, begin + c)
        tokens = per_example["target_tokens"][part].sum()
        loss = per_example["loss_sum"][part].sum() / tokens if tokens else 0.0
        assert row["num_target_tokens"] == tokens
        assert row["loss"] == pytest.approx(loss, rel=1e-12)
        assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-12)
        assert row["exact_match"] == pytest.approx(per_example["exact_match"][part].mean())
        begin += c
    # The existing aggregates are the mean and worst tenth of exactly these rows.
    summary = summarize_clients(per_example, dataset)
    losses = np.array([r["loss"] for r in rows])
    assert summary["client/loss_mean"] == pytest.approx(losses.mean(), rel=1e-12)
    assert summary["client/loss_worst10"] == pytest.approx(np.sort(losses)[-2:].mean())
    worst = max(rows, key=lambda r: r["loss"])
    assert worst["loss"] == pytest.approx(losses.max())


def test_per_client_results_names_and_without_exact_match():
    per_example = {
        "loss_sum": np.array([2.0, 1.0, 3.0]),
        "target_tokens": np.array([1.0, 1.0, 1.0]),
    }
    rows = per_client_results(per_example, make_dataset([2, 1]), client_names=["ann", "bob"])
    assert rows == [
        {
            "client": 0,
            "name": "ann",
            "num_examples": 2,
            "num_target_tokens": 2,
            "loss": 1.5,
            "perplexity": pytest.approx(math.exp(1.5)),
        },
        {
            "client": 1,
            "name": "bob",
            "num_examples": 1,
            "num_target_tokens": 1,
            "loss": 3.0,
            "perplexity": pytest.approx(math.exp(3.0)),
        },
    ]


def test_per_client_results_rejects_a_mismatched_evaluation():
    dataset = make_dataset([2, 1])
    with pytest.raises(ValueError, match="3 examples"):
        per_client_results({"loss_sum": np.ones(4), "target_tokens": np.ones(4)}, dataset)
    with pytest.raises(ValueError, match="client_names"):
        per_client_results(
            {"loss_sum": np.ones(3), "target_tokens": np.ones(3)}, dataset, client_names=["a"]
        )


# --- summarize_arrays -------------------------------------------------------------------------


def test_summarize_arrays_is_the_weighted_mean_loss_and_metric_totals():
    per_example = {
        LOSS_SUM: np.array([2.0, 4.0, 0.0]),
        LOSS_WEIGHT: np.array([1.0, 3.0, 0.0]),
        "tokens": np.array([5.0, 6.0, 7.0]),
    }
    assert summarize_arrays(per_example, "val") == {"val/loss": 1.5, "val/tokens": 18.0}
    empty = {LOSS_SUM: np.zeros(2), LOSS_WEIGHT: np.zeros(2)}
    assert summarize_arrays(empty, "val") == {"val/loss": 0.0}


# --- evaluate_arrays --------------------------------------------------------------------------


def least_squares(traces: list) -> Objective:
    """Squared error of a linear model, ``(x . w + b - y)^2``, with an absolute-error metric."""

    def loss(frozen, params, batch, key):
        traces.append(1)
        err = batch["x"] @ params["w"] + frozen["b"] - batch["y"]
        w = batch["example_weight"]
        loss_sum = jnp.sum(w * err**2)
        loss_weight = jnp.sum(w)
        metrics = {LOSS_SUM: loss_sum, LOSS_WEIGHT: loss_weight, "abs_err": jnp.sum(w * abs(err))}
        return loss_sum / jnp.maximum(loss_weight, 1.0), metrics

    return Objective(loss, ("x", "y"))


@pytest.mark.parametrize("n, batch_size", [(7, 3), (6, 3), (2, 4), (1, 1)])
def test_evaluate_arrays_returns_exactly_n_per_example_rows(n, batch_size):
    rng = np.random.default_rng(n)
    examples = {
        "x": rng.normal(size=(n, 3)).astype(np.float32),
        "y": rng.normal(size=n).astype(np.float32),
    }
    frozen = {"b": jnp.float32(0.25)}
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    traces: list = []
    step = make_arrays_eval_step(least_squares(traces))
    out = evaluate_arrays(step, frozen, params, examples, batch_size)

    err = examples["x"].astype(np.float64) @ np.asarray(params["w"], np.float64) + 0.25
    err -= examples["y"]
    assert set(out) == {LOSS_SUM, LOSS_WEIGHT, "abs_err"}
    for value in out.values():
        assert value.shape == (n,)
    np.testing.assert_allclose(out[LOSS_SUM], err**2, rtol=1e-5)
    np.testing.assert_allclose(out["abs_err"], np.abs(err), rtol=1e-5)
    np.testing.assert_array_equal(out[LOSS_WEIGHT], np.ones(n))
    # Fixed-size batches: one compiled program for every batch, the padded last one included.
    assert len(traces) == 1
    assert summarize_arrays(out, "eval")["eval/loss"] == pytest.approx(np.mean(err**2), rel=1e-5)


def test_arrays_eval_step_is_jitted_and_ignores_the_batch_of_others():
    """Each example's sums are its own: changing another example changes nothing."""
    traces: list = []
    step = make_arrays_eval_step(least_squares(traces))
    frozen, params = {"b": jnp.float32(0.0)}, {"w": jnp.array([1.0, -1.0])}
    batch = {
        "x": np.array([[1.0, 2.0], [3.0, 0.0]], np.float32),
        "y": np.array([0.0, 1.0], np.float32),
        "example_weight": np.ones(2, np.float32),
    }
    out = jax.device_get(step(frozen, params, batch))
    np.testing.assert_allclose(out[LOSS_SUM], [1.0, 4.0])
    batch["x"][1] = [100.0, 100.0]
    again = jax.device_get(step(frozen, params, batch))
    assert again[LOSS_SUM][0] == out[LOSS_SUM][0]
    assert len(traces) == 1
