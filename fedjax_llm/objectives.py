"""Objectives: what a batch of a client's data means and the loss it is trained on.

Client data are a dict of per-example arrays (``tokens`` and ``loss_mask`` for language
modelling; pairs of rows for preference losses; features and targets for anything else). The
round gathers a batch of each field by example index and adds ``example_weight`` ``[B]`` (0 for
padding examples past a client's budget); the objective decides what the rest means.

An objective's loss returns ``(loss, metrics)``: ``loss`` is the scalar the client
differentiates, ``metrics`` a dict of scalar *sums* over the batch. Two sums are required:
``loss_sum`` and ``loss_weight`` with ``loss == loss_sum / max(loss_weight, 1)`` for a full
batch, so the round can report a properly weighted mean over clients and steps. Evaluation
runs the same loss one example at a time (under `jax.vmap`) to get per-example sums.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.pytree import PyTree

LOSS_SUM = "loss_sum"
LOSS_WEIGHT = "loss_weight"


class Objective(NamedTuple):
    """A training objective.

    Attributes:
      loss: ``(frozen, params, batch, key) -> (loss, metrics)``; ``batch`` holds ``fields``
        (each ``[B, ...]``) and ``example_weight`` ``[B]``; ``metrics`` are scalar sums
        including ``loss_sum`` and ``loss_weight``.
      fields: the per-example fields ``loss`` reads; a run whose data lack one fails before
        compiling, naming it.
      means: metrics reported as a mean per unit of ``loss_weight`` (per preference pair, say)
        rather than as a total: training records and evaluations divide their sums by the
        summed ``loss_weight``.
    """

    loss: Callable[[PyTree, PyTree, dict, jax.Array], tuple[jax.Array, dict]]
    fields: tuple[str, ...]
    means: tuple[str, ...] = ()


def next_token_loss(apply_fn: Callable, pad_id: int, block_rows: int = 64) -> Objective:
    """Next-token cross entropy on the positions a loss mask selects (the default).

    The per-token losses come from `next_token_losses` (fused with the output projection when
    ``apply_fn`` takes ``head=``).

    Args:
      apply_fn: ``(frozen, params, tokens) -> logits``, optionally taking ``head=``.
      pad_id: padding token id (for counting processed tokens).
      block_rows: rows (token positions of one sequence batch) per block of the fused loss.

    Returns:
      An `Objective` over ``tokens`` ``[B, T]`` int and ``loss_mask`` ``[B, T]`` (1 at positions
      whose token is a target). Metrics: ``loss_sum``, ``loss_weight`` (target tokens) and
      ``tokens`` (non-pad tokens processed).
    """

    def loss(frozen, params, batch, key):
        del key  # the model has no dropout
        tokens = batch["tokens"]
        ce = next_token_losses(apply_fn, frozen, params, tokens, block_rows)
        weight = batch["loss_mask"][:, 1:] * batch["example_weight"][:, None]
        loss_sum = jnp.sum(ce * weight)
        target_tokens = jnp.sum(weight)
        processed = jnp.sum((tokens != pad_id) * batch["example_weight"][:, None])
        mean = loss_sum / jnp.maximum(target_tokens, 1.0)
        return mean, {LOSS_SUM: loss_sum, LOSS_WEIGHT: target_tokens, "tokens": processed}

    return Objective(loss, ("tokens", "loss_mask"))


def next_token_losses(
    apply_fn: Callable,
    frozen: PyTree,
    params: PyTree,
    tokens: jax.Array,
    block_rows: int = 64,
    **kwargs: Any,
) -> jax.Array:
    """Cross entropy of each next token, float32 [B, T - 1] (position t predicts token t + 1).

    When ``apply_fn`` takes a ``head`` keyword (as `Trainable.apply` does), the output
    projection is fused with the cross entropy (`kernels.linear_cross_entropy`): the logits are
    made ``block_rows`` rows at a time and never exist whole. Otherwise ``apply_fn``'s logits
    are used.

    Args:
      apply_fn: ``(frozen, params, tokens, **kwargs) -> logits``, optionally taking ``head=``.
      frozen: the frozen part of the model.
      params: the trained part.
      tokens: int [B, T].
      block_rows: rows (token positions) per block of the fused loss.
      **kwargs: further arguments of ``apply_fn`` (e.g. ``adapter=False``).
    """
    if _takes_head(apply_fn):
        # Every position's target is the next token (the last position's is a dummy whose loss
        # is dropped): the hidden states are used whole, never sliced.
        targets = jnp.roll(tokens, -1, axis=1)

        def head(hidden, kernel):
            return linear_cross_entropy(hidden, kernel, targets, block_rows)

        return apply_fn(frozen, params, tokens, head=head, **kwargs)[:, :-1]
    logits = apply_fn(frozen, params, tokens, **kwargs)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def _takes_head(apply_fn: Callable) -> bool:
    try:
        return "head" in inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False


def check_fields(objective: Objective, examples: Mapping[str, Any], where: str) -> None:
    """Checks that data provide every field an objective reads.

    Raises:
      ValueError: naming the missing fields and the ones present.
    """
    missing = [f for f in objective.fields if f not in examples]
    if missing:
        raise ValueError(
            f"the objective reads fields {missing} that {where} lacks (it has "
            f"{sorted(examples)}); give the data those fields or choose another objective."
        )


def per_example_metrics(
    objective: Objective, frozen: PyTree, params: PyTree, batch: dict, key: jax.Array
) -> dict[str, jax.Array]:
    """The objective's metric sums of each example of a batch, ``{name: [B]}``.

    Runs the loss on one example at a time under `jax.vmap` (one batched program), so
    evaluation and training share one definition of the loss.
    """

    def one(example, k):
        single = jax.tree.map(lambda x: x[None], example)
        return objective.loss(frozen, params, single, k)[1]

    keys = jax.random.split(key, batch["example_weight"].shape[0])
    return jax.vmap(one)(batch, keys)


def _dpo(apply_fn: Callable, pad_id: int, config: Any) -> Objective:
    from fedjax_llm.dpo import dpo_loss  # it builds on this module

    del pad_id
    return dpo_loss(apply_fn, config.dpo.beta, config.dpo.loss)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "next_token": lambda apply_fn, pad_id, config: next_token_loss(apply_fn, pad_id),
    "dpo": _dpo,
}
"""Objectives by config name: ``name -> builder(apply_fn, pad_id, ExperimentConfig)``."""


def register_objective(name: str, builder: Callable[..., Objective]) -> None:
    """Registers an objective so configs can select it with ``client.objective``.

    Args:
      name: the name configs use.
      builder: ``(apply_fn, pad_id, ExperimentConfig) -> Objective``.
    """
    OBJECTIVES[name] = builder
