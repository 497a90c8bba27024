"""Evaluation of the global model: held-out loss and perplexity, exact match by greedy
decoding per task family, and the same per client (mean and worst 10% of clients, or one record
per client with `per_client_results`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.data import FederatedDataset, TokenizedExamples
from fedjax_llm.models.generation import generate, left_align_prompts
from fedjax_llm.models.trainable import Trainable
from fedjax_llm.objectives import (
    LOSS_SUM,
    LOSS_WEIGHT,
    Objective,
    next_token_loss,
    per_example_metrics,
)
from kernels.pytree import PyTree


def make_eval_step(
    trainable: Trainable,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    objective: Objective | None = None,
) -> Callable:
    """Builds the jitted per-batch evaluation.

    Args:
      trainable: what the clients train; its `model_inputs` runs the model.
      max_new_tokens: greedy decoding budget (0 skips generation and exact match).
      eos_id: end-of-sequence id.
      pad_id: padding id.
      objective: the training objective, whose per-example ``loss_sum`` and ``loss_weight`` are
        the held-out loss (default: next-token cross entropy).

    Returns:
      ``eval_step(frozen, params, tokens, loss_mask, prompt_len) -> (loss_sum [B],
      target_tokens [B], generated [B, max_new_tokens])``.
    """
    objective = objective or next_token_loss(trainable.apply, pad_id)

    @jax.jit
    def eval_step(frozen, params, tokens, loss_mask, prompt_len):
        batch = {
            "tokens": tokens,
            "loss_mask": loss_mask,
            "example_weight": jnp.ones(tokens.shape[0], jnp.float32),
        }
        sums = per_example_metrics(objective, frozen, params, batch, jax.random.key(0))
        if max_new_tokens == 0:
            generated = jnp.zeros((tokens.shape[0], 0), tokens.dtype)
        else:
            prompts, prompt_mask = left_align_prompts(tokens, prompt_len, pad_id)
            base, model_kwargs = trainable.model_inputs(frozen, params)
            generated = generate(
                trainable.config,
                base,
                prompts,
                prompt_mask,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                pad_id=pad_id,
                model_kwargs=model_kwargs,
            )
        return sums[LOSS_SUM], sums[LOSS_WEIGHT], generated

    return eval_step


def evaluate_examples(
    eval_step: Callable,
    frozen: PyTree,
    params: PyTree,
    examples: TokenizedExamples,
    tokenizer: Any,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Runs evaluation over examples in fixed-size batches (the last one padded).

    Returns:
      Per-example ``loss_sum``, ``target_tokens`` and, when the eval step generates,
      ``exact_match`` (1.0 when the greedy answer, cut at the first eos, equals the reference
      response).
    """
    n = len(examples.tokens)
    loss_sum, target_tokens, exact = [], [], []
    for begin in range(0, n, batch_size):
        idx = np.arange(begin, begin + batch_size) % n  # pad by wrapping; dropped below
        valid = min(batch_size, n - begin)
        out = eval_step(
            frozen,
            params,
            examples.tokens[idx],
            examples.loss_mask[idx],
            examples.prompt_len[idx],
        )
        ls, tt, generated = jax.device_get(out)
        loss_sum.append(ls[:valid])
        target_tokens.append(tt[:valid])
        if generated.shape[1]:
            for row, i in zip(generated[:valid], idx[:valid], strict=True):
                exact.append(float(tokenizer.decode(row.tolist()) == examples.responses[i]))
    out = {"loss_sum": np.concatenate(loss_sum), "target_tokens": np.concatenate(target_tokens)}
    if exact:
        out["exact_match"] = np.asarray(exact, np.float64)
    return out


def _loss_and_perplexity(loss_sum: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    loss = float(loss_sum.sum() / max(tokens.sum(), 1.0))
    return loss, math.exp(min(loss, 50.0))


def summarize_global(per_example: dict[str, np.ndarray], examples: TokenizedExamples) -> dict:
    """Loss, perplexity and exact match, overall and per label (task family or category).

    Labels are `examples.label_names`: the task families of the built-in data, or every value of
    the label column among the records a file run kept (training and held-out alike). A label
    with no held-out example (all its records went to training, or its held-out records were
    dropped as too long) has no per-label metrics; such labels are reported, not skipped silently.

    Args:
      per_example: from `evaluate_examples` on `examples`.
      examples: the held-out examples.

    Returns:
      A flat dict: ``eval/loss``, ``eval/perplexity``, ``eval/exact_match`` (when generated) and,
      with two or more labels, ``eval/perplexity/<label>`` and ``eval/exact_match/<label>`` per
      label with held-out examples and, when some labels have none, ``eval/num_missing_labels``
      (int) and ``eval/missing_labels`` (str: their names in label order, joined by ``", "``).
    """
    exact = per_example.get("exact_match")
    loss, perplexity = _loss_and_perplexity(per_example["loss_sum"], per_example["target_tokens"])
    out = {"eval/loss": loss, "eval/perplexity": perplexity}
    if exact is not None:
        out["eval/exact_match"] = float(exact.mean())
    if len(examples.label_names) < 2:
        return out
    missing = []
    for label, name in enumerate(examples.label_names):
        mask = examples.labels == label
        if not mask.any():
            missing.append(str(name))
            continue
        if exact is not None:
            out[f"eval/exact_match/{name}"] = float(exact[mask].mean())
        _, out[f"eval/perplexity/{name}"] = _loss_and_perplexity(
            per_example["loss_sum"][mask], per_example["target_tokens"][mask]
        )
    if missing:
        out["eval/num_missing_labels"] = len(missing)
        out["eval/missing_labels"] = ", ".join(missing)
    return out


def summarize_clients(per_example: dict[str, np.ndarray], dataset: FederatedDataset) -> dict:
    """Per-client loss, perplexity and exact match: the mean over clients and the worst 10%.

    "Worst 10%" is the mean over the tenth of clients with the highest loss or perplexity
    (lowest exact match), at least one client.
    """
    starts, counts = dataset.client_start, dataset.client_count
    loss_sum = np.add.reduceat(per_example["loss_sum"], starts)
    tokens = np.add.reduceat(per_example["target_tokens"], starts)
    client_loss = loss_sum / np.maximum(tokens, 1.0)
    client_perplexity = np.exp(np.minimum(client_loss, 50.0))
    worst = max(1, int(math.ceil(0.1 * len(starts))))
    out = {
        "client/loss_mean": float(client_loss.mean()),
        "client/loss_worst10": float(np.sort(client_loss)[-worst:].mean()),
        "client/perplexity_mean": float(client_perplexity.mean()),
        "client/perplexity_worst10": float(np.sort(client_perplexity)[-worst:].mean()),
    }
    if "exact_match" in per_example:
        client_exact = np.add.reduceat(per_example["exact_match"], starts) / counts
        out["client/exact_match_mean"] = float(client_exact.mean())
        out["client/exact_match_worst10"] = float(np.sort(client_exact)[:worst].mean())
    return out


def per_client_results(
    per_example: dict[str, np.ndarray],
    dataset: FederatedDataset,
    client_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Each client's held-out results, e.g. to save which clients the global model serves worst.

    Same definitions as `summarize_clients` (a client's loss is its summed token loss over its
    target tokens), one record per client instead of aggregates.

    Args:
      per_example: from `evaluate_examples` on ``dataset.examples``.
      dataset: the per-client held-out sets (e.g. ``TaskData.client_test``).
      client_names: optional name of each client (e.g. ``TaskData.stats["client_names"]`` of a
        natural split), added as ``name``.

    Returns:
      One JSON-serializable dict per client, in client order: ``client`` (index),
      ``name`` (with `client_names`), ``num_examples``, ``num_target_tokens``, ``loss``,
      ``perplexity`` and, when the evaluation generated, ``exact_match`` (the client's mean).
      Metrics of a client without held-out examples are None.

    Raises:
      ValueError: if `per_example` does not have one entry per example of `dataset`, or
        `client_names` not one name per client.
    """
    num_clients, n = dataset.num_clients, dataset.num_examples
    lengths = {name: len(v) for name, v in per_example.items()}
    if any(length != n for length in lengths.values()):
        raise ValueError(
            f"per_client_results: per_example has {lengths} entries but the dataset has {n} "
            "examples; evaluate dataset.examples, not another set."
        )
    if client_names is not None and len(client_names) != num_clients:
        raise ValueError(
            f"per_client_results: {len(client_names)} client_names for {num_clients} clients."
        )
    ids = dataset.client_ids

    def per_client(values: np.ndarray) -> np.ndarray:
        return np.bincount(ids, weights=values, minlength=num_clients)

    counts = np.asarray(dataset.client_count, np.int64)
    loss_sum = per_client(per_example["loss_sum"])
    tokens = per_client(per_example["target_tokens"])
    exact = per_client(per_example["exact_match"]) if "exact_match" in per_example else None
    results = []
    for m in range(num_clients):
        row: dict[str, Any] = {"client": m}
        if client_names is not None:
            row["name"] = str(client_names[m])
        row["num_examples"] = int(counts[m])
        row["num_target_tokens"] = int(round(tokens[m]))
        if counts[m] == 0:
            row.update(loss=None, perplexity=None)
            if exact is not None:
                row["exact_match"] = None
        else:
            loss, perplexity = _loss_and_perplexity(loss_sum[m : m + 1], tokens[m : m + 1])
            row.update(loss=loss, perplexity=perplexity)
            if exact is not None:
                row["exact_match"] = float(exact[m] / counts[m])
        results.append(row)
    return results


PUBLIC_PREFIX = "eval/public/"
"""Prefix of the evaluation on the server's held-out public data (`fedjax_llm.public_training`):
``eval/public/loss`` and ``eval/public/perplexity`` beside the private ``eval/...`` and
``client/...`` metrics."""


def summarize_public(per_example: dict[str, np.ndarray], examples: TokenizedExamples) -> dict:
    """`summarize_global` of the held-out public examples, its keys under `PUBLIC_PREFIX`
    (``eval/public/loss``, ``eval/public/perplexity``)."""
    return {
        PUBLIC_PREFIX + key.removeprefix("eval/"): value
        for key, value in summarize_global(per_example, examples).items()
    }


PERSONAL_PREFIX = "client/personal/"
"""Prefix of the personalized evaluation's metrics: ``client/personal/loss_mean`` beside the
global model's ``client/loss_mean`` (`summarize_clients`), on the same held-out examples."""


def make_personal_eval_step(eval_step: Callable, personal_params: Callable) -> Callable:
    """Builds the jitted evaluation of several clients, each with its own params.

    Args:
      eval_step: from `make_eval_step`.
      personal_params: ``(global_params, one_client_state) -> params`` (the algorithm's
        `fedjax_llm.Algorithm.personal_params`).

    Returns:
      ``step(frozen, global_params, client_states, tokens, loss_mask, prompt_len)`` over G
      rows: ``client_states`` holds each row's client's state (leading axis G) and the examples
      are ``[G, P, ...]``. A `jax.lax.map` over the rows builds one client's params at a time
      (memory of one personal model, whatever G) and runs `eval_step` on its P examples;
      outputs are `eval_step`'s with a leading G axis.
    """

    @jax.jit
    def step(frozen, global_params, client_states, tokens, loss_mask, prompt_len):
        def one(inputs):
            state, row_tokens, row_mask, row_prompt_len = inputs
            params = personal_params(global_params, state)
            return eval_step(frozen, params, row_tokens, row_mask, row_prompt_len)

        return jax.lax.map(one, (client_states, tokens, loss_mask, prompt_len))

    return step


def evaluate_personalized(
    step: Callable,
    frozen: PyTree,
    global_params: PyTree,
    client_states: PyTree,
    dataset: FederatedDataset,
    tokenizer: Any,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Evaluates every client's held-out examples with that client's own params.

    Every client is evaluated, sampled or not: one never sampled has its initial state (for
    the built-in algorithms its personal part or model is the global init). Each client's
    examples are cut into rows of ``P = min(largest client, batch_size)`` examples (the last
    padded with its first example, dropped after); each call evaluates
    ``max(1, batch_size // P)`` rows, so every call has one shape (one compilation).

    Args:
      step: from `make_personal_eval_step`.
      frozen: the frozen base.
      global_params: the current global trainable params.
      client_states: the algorithm's part of the client store (``ClientStates.algorithm``),
        leading axis at least ``dataset.num_clients``; device or host arrays.
      dataset: the per-client held-out sets (e.g. ``TaskData.client_test``).
      tokenizer: decodes generated answers for exact match.
      batch_size: examples per call.

    Returns:
      Per-example ``loss_sum``, ``target_tokens`` and, when the step generates,
      ``exact_match``, in ``dataset.examples`` order (as `evaluate_examples` returns).
    """
    examples = dataset.examples
    starts = np.asarray(dataset.client_start, np.int64)
    counts = np.asarray(dataset.client_count, np.int64)
    per_row = int(min(max(int(counts.max(initial=1)), 1), batch_size))
    rows_per_call = max(1, batch_size // per_row)
    clients, indices, valid = [], [], []
    for m in range(dataset.num_clients):
        for begin in range(0, int(counts[m]), per_row):
            offsets = begin + np.arange(per_row)
            ok = offsets < counts[m]
            clients.append(m)
            indices.append(starts[m] + np.where(ok, offsets, 0))
            valid.append(ok)
    pad = -len(clients) % rows_per_call
    clients += [0] * pad
    indices += [np.full(per_row, starts[0])] * pad
    valid += [np.zeros(per_row, bool)] * pad
    clients_arr, index, mask = np.asarray(clients), np.stack(indices), np.stack(valid)
    n = len(examples.tokens)
    loss_sum, target_tokens = np.zeros(n, np.float64), np.zeros(n, np.float64)
    exact: np.ndarray | None = None
    for begin in range(0, len(clients_arr), rows_per_call):
        rows = slice(begin, begin + rows_per_call)
        ids, idx, ok = clients_arr[rows], index[rows], mask[rows]
        states = jax.tree.map(lambda s, ids=ids: s[ids], client_states)
        out = step(
            frozen,
            global_params,
            states,
            examples.tokens[idx],
            examples.loss_mask[idx],
            examples.prompt_len[idx],
        )
        ls, tt, generated = jax.device_get(out)
        loss_sum[idx[ok]] = ls[ok]
        target_tokens[idx[ok]] = tt[ok]
        if generated.shape[-1]:
            exact = np.zeros(n, np.float64) if exact is None else exact
            for row, i in zip(generated[ok], idx[ok], strict=True):
                exact[i] = float(tokenizer.decode(row.tolist()) == examples.responses[i])
    out = {"loss_sum": loss_sum, "target_tokens": target_tokens}
    if exact is not None:
        out["exact_match"] = exact
    return out


def summarize_personal(per_example: dict[str, np.ndarray], dataset: FederatedDataset) -> dict:
    """`summarize_clients` of the personalized evaluation, its keys under `PERSONAL_PREFIX`
    (``client/personal/loss_mean``, ``client/personal/loss_worst10``, ...)."""
    return {
        PERSONAL_PREFIX + key.removeprefix("client/"): value
        for key, value in summarize_clients(per_example, dataset).items()
    }


def make_arrays_eval_step(objective: Objective) -> Callable:
    """The jitted per-batch evaluation of any objective: ``(frozen, params, batch) ->
    {name: [B]}`` per-example metric sums."""
    return jax.jit(
        lambda frozen, params, batch: per_example_metrics(
            objective, frozen, params, batch, jax.random.key(0)
        )
    )


def evaluate_arrays(
    step: Callable,
    frozen: PyTree,
    params: PyTree,
    examples: dict[str, np.ndarray],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per-example metric sums of any objective over a dict of per-example arrays.

    Batches are fixed-size (the last one padded by wrapping and dropped), so one compiled
    program serves the whole set.

    Args:
      step: from `make_arrays_eval_step`.
      frozen: the frozen base.
      params: the trainable params.
      examples: ``{field: [N, ...]}``.
      batch_size: examples per batch.

    Returns:
      ``{name: [N]}`` for every metric of the objective.
    """
    n = len(next(iter(examples.values())))
    out: dict[str, list[np.ndarray]] = {}
    for begin in range(0, n, batch_size):
        idx = np.arange(begin, begin + batch_size) % n
        valid = min(batch_size, n - begin)
        batch = {name: x[idx] for name, x in examples.items()}
        batch["example_weight"] = np.ones(batch_size, np.float32)
        sums = jax.device_get(step(frozen, params, batch))
        for name, value in sums.items():
            out.setdefault(name, []).append(np.asarray(value)[:valid])
    return {name: np.concatenate(parts) for name, parts in out.items()}


def summarize_arrays(
    per_example: dict[str, np.ndarray], prefix: str, means: Sequence[str] = ()
) -> dict[str, float]:
    """The mean loss (``sum loss_sum / sum loss_weight``), the ``means`` metrics per unit of
    loss weight (`Objective.means`) and the other metrics' totals."""
    weight = max(float(per_example[LOSS_WEIGHT].sum()), 1.0)
    out = {f"{prefix}/loss": float(per_example[LOSS_SUM].sum()) / weight}
    for name, value in per_example.items():
        if name not in (LOSS_SUM, LOSS_WEIGHT):
            out[f"{prefix}/{name}"] = float(value.sum()) / (weight if name in means else 1.0)
    return out


def array_client_results(
    per_example: dict[str, np.ndarray],
    client_count: np.ndarray,
    means: Sequence[str] = (),
    client_names: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each client's held-out results for any objective, and their summary.

    Args:
      per_example: from `evaluate_arrays` on the per-client held-out examples, stored client
        after client (``client_count[m]`` rows each).
      client_count: ``[M]`` held-out examples per client (0 allowed).
      means: the metrics reported per unit of loss weight (`Objective.means`).
      client_names: optional name of each client.

    Returns:
      ``client/loss_mean`` and ``client/loss_worst10`` (the mean over the tenth of clients with
      the highest loss) and ``client/<name>_mean`` for each of ``means``, over clients with
      held-out examples; and one record per client (``client``, ``name``, ``num_examples``,
      ``loss`` and each of ``means``; None for a client without held-out examples).
    """
    counts = np.asarray(client_count, np.int64)
    ids = np.repeat(np.arange(counts.size), counts)

    def per_client(values: np.ndarray) -> np.ndarray:
        return np.bincount(ids, weights=np.asarray(values, np.float64), minlength=counts.size)

    weight = np.maximum(per_client(per_example[LOSS_WEIGHT]), 1.0)
    values = {"loss": per_client(per_example[LOSS_SUM]) / weight}
    for name in means:
        values[name] = per_client(per_example[name]) / weight
    has = counts > 0
    summary: dict[str, float] = {}
    if has.any():
        loss = values["loss"][has]
        worst = max(1, int(math.ceil(0.1 * loss.size)))
        summary["client/loss_mean"] = float(loss.mean())
        summary["client/loss_worst10"] = float(np.sort(loss)[-worst:].mean())
        for name in means:
            summary[f"client/{name}_mean"] = float(values[name][has].mean())
    records = []
    for m in range(counts.size):
        row: dict[str, Any] = {"client": m}
        if client_names is not None:
            row["name"] = str(client_names[m])
        row["num_examples"] = int(counts[m])
        for name, value in values.items():
            row[name] = float(value[m]) if has[m] else None
        records.append(row)
    return summary, records
