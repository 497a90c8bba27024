"""Evaluation of the global model: held-out loss and perplexity, exact match by greedy
decoding per task family, and the same per client (mean and worst 10% of clients)."""

from __future__ import annotations

import math
from collections.abc import Callable
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
    """Loss, perplexity and exact match, overall and per label (task family or category)."""
    exact = per_example.get("exact_match")
    loss, perplexity = _loss_and_perplexity(per_example["loss_sum"], per_example["target_tokens"])
    out = {"eval/loss": loss, "eval/perplexity": perplexity}
    if exact is not None:
        out["eval/exact_match"] = float(exact.mean())
    if len(examples.label_names) < 2:
        return out
    for label, name in enumerate(examples.label_names):
        mask = examples.labels == label
        if not mask.any():
            continue
        if exact is not None:
            out[f"eval/exact_match/{name}"] = float(exact[mask].mean())
        _, out[f"eval/perplexity/{name}"] = _loss_and_perplexity(
            per_example["loss_sum"][mask], per_example["target_tokens"][mask]
        )
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


def summarize_arrays(per_example: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """The mean loss (``sum loss_sum / sum loss_weight``) and the other metrics' totals."""
    weight = max(float(per_example[LOSS_WEIGHT].sum()), 1.0)
    out = {f"{prefix}/loss": float(per_example[LOSS_SUM].sum()) / weight}
    for name, value in per_example.items():
        if name not in (LOSS_SUM, LOSS_WEIGHT):
            out[f"{prefix}/{name}"] = float(value.sum())
    return out
