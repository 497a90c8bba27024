"""Client contribution scores: how much each sampled client's upload helped its round.

The incentive problem of federated learning asks which clients to reward (or to distrust).
After every round the simulator scores each sampled client whose upload counted (weight > 0)
from the round's uploads, the global params ``theta`` before the round and a small fixed
held-out evaluation set, with the training objective's loss ``L``:

* **cosine**: the cosine similarity of the client's update ``delta_i`` with the round's
  aggregate update (what the aggregator returned, robust or not).
* **leave-one-out influence, first order** (``loo``): the change of held-out loss that the
  round's server step would see without client i, to first order,
  ``loo_i = g . (step_{-i} - step_all) ~= L(theta + step_{-i}) - L(theta + step_all)``, with
  ``g`` the gradient of the held-out loss at ``theta`` and ``step_S = server_lr * sum_{j in S}
  w_j delta_j / sum_{j in S} w_j`` the FedAvg server step of the clients S (the weights
  renormalized without i; no step when nobody is left). **Positive: client i helped** (its
  removal would raise the held-out loss).
* **GTG-Shapley** (``shapley``): the Shapley value of the round's cooperative game whose value
  of a set S of its clients is ``v(S) = -L(theta + step_S)`` (``v({}) = -L(theta)``), estimated
  by Monte Carlo over permutations of the clients with GTG-Shapley's guided sampling (each
  client first in turn) and truncation: a permutation stops (its remaining marginals are 0)
  once ``|v(all) - v(prefix)| < truncation x |v(all)|``, and a round with ``|v(all) - v({})| <
  truncation x |v(all)|`` is not scored at all (its values are 0). Both tests use the same
  relative tolerance, so skipping the round is exactly what every permutation would do at its
  empty prefix; a relative tolerance keeps the rule free of the loss's units. The subsets of
  one position of all permutations are evaluated together, as one batched evaluation of
  candidate params. Per-round values add up over rounds (GTG-Shapley's per-round
  reconstruction, without retraining). The permutations are drawn from the round's key and
  the clients' ids, so no score depends on the slots the clients sit in (chunk size, devices,
  engine).

Every value is measured with the FedAvg step of the weighted mean, whatever the aggregator or
server optimizer (a robust aggregator's or Adam's leave-one-out is not linear in the
uploads); with an adaptive server optimizer it is a proxy of the real step.

The round exposes its uploads through `with_upload_record`, which makes the aggregator
gathering and returns the per-slot uploads and weights and the aggregate as metrics under
`fedjax_llm.pipeline.RECORD_PREFIX`. Memory: the round then holds every slot's upload (``slots
x upload bytes``, LoRA- or prompt-sized; for full fine-tuning slots x the trainable params),
and they stay on the device until the round's scores are computed; the scorer holds one
candidate params per permutation while it evaluates a position, ``permutations x params``, and
a copy of the pre-round params.

References:
  Liu, Chen, Yu, Liu and Cui 2022, "GTG-Shapley: Efficient and Accurate Participant
  Contribution Evaluation in Federated Learning" (ACM TIST).
  Koh and Liang 2017, "Understanding Black-box Predictions via Influence Functions" (ICML).
  Shapley 1953, "A Value for n-Person Games".
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm import distributed
from fedjax_llm.metrics import read_jsonl
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective
from fedjax_llm.pipeline import RECORD_PREFIX, Aggregator
from kernels.pytree import PyTree

CONTRIBUTION_STREAM = 2**32 - 3
"""``fold_in`` data of a round's contribution key (its Shapley permutations), from the round's
key; client ids and the round's other streams (`fedjax_llm.round`) never use it."""
RECORD_UPLOADS = RECORD_PREFIX + "uploads"
"""The recorded per-slot uploads ``[C, ...]`` (the transformed `ClientOutput` of every slot)."""
RECORD_WEIGHTS = RECORD_PREFIX + "weights"
"""The recorded per-slot aggregation weights ``[C]`` (0: the slot did not count)."""
RECORD_AGGREGATE = RECORD_PREFIX + "aggregate"
"""The recorded aggregate (what the wrapped aggregator returned)."""
RECORD_CLIENT_IDS = RECORD_PREFIX + "client_ids"
"""The recorded per-slot client ids ``[C]`` (absent where the round gave none)."""
CONTRIBUTIONS = "contributions.jsonl"
"""Per-round scores in a run directory: one line per round and sampled client."""
CONTRIBUTION_TOTALS = "contributions.json"
"""Per-client totals over the run and the ranking, written at the end of a run."""


# --------------------------------------------------------------------------- the recording
class UploadRecord(NamedTuple):
    """A round's recorded uploads.

    Attributes:
      uploads: per-slot uploads ``[C, ...]`` (padding slots hold zeros or garbage).
      weights: ``[C]`` aggregation weights (0 for padding, lost uploads and clients that took
        no step).
      aggregate: the round's aggregate, shaped like one upload.
      client_ids: ``[C]`` int32 the slots' client ids (None where the round gave none).
    """

    uploads: PyTree
    weights: jax.Array
    aggregate: PyTree
    client_ids: jax.Array | None = None


def with_upload_record(aggregator: Aggregator, clients_per_chunk: int | None = None) -> Aggregator:
    """Makes an aggregator gathering and records the round's uploads beside its aggregate.

    The wrapper computes ``aggregator``'s aggregate exactly as it would: a gathering one gets
    the `Gathered` as is; a streaming one gets its ``start`` and ``accumulate`` over the
    gathered uploads, ``clients_per_chunk`` of them at a time in slot order (as the one-device
    compiled round adds its chunks, so the sums are the same floats), then ``finalize``.
    Its metrics add the uploads, weights, aggregate and the slots' client ids under
    `RECORD_UPLOADS`, `RECORD_WEIGHTS`, `RECORD_AGGREGATE` and `RECORD_CLIENT_IDS` (see
    `upload_record`). Wrapped in `fedjax_llm.robustness.with_attack`, it records the
    attacked uploads (what the server receives).

    Memory: the round holds every slot's upload (``slots x upload bytes``) and returns them.

    Args:
      aggregator: the aggregator to record (streaming or gathering).
      clients_per_chunk: the round's chunk size on one device (None: all slots in one
        ``accumulate``; the sums then differ from a chunked round's by float rounding only).

    Returns:
      A gathering `Aggregator` with the same state, hyperparameters and aggregate.
    """

    def accumulate_all(state, uploads, weights, hparams):
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), uploads)
        acc = aggregator.start(state, like)
        slots = weights.shape[0]
        chunk = clients_per_chunk or slots
        if chunk >= slots or slots % chunk:
            return aggregator.accumulate(acc, uploads, weights, state, hparams)

        def chunked(x):
            return x.reshape((slots // chunk, chunk) + x.shape[1:])

        def add(acc, xs):
            return aggregator.accumulate(acc, *xs, state, hparams), None

        acc, _ = jax.lax.scan(add, acc, jax.tree.map(chunked, (uploads, weights)))
        return acc

    def finalize(state, gathered, key, hparams, **extra):
        if aggregator.gathers:
            inner = gathered
        else:
            inner = accumulate_all(state, gathered.uploads, gathered.weights, hparams)
        out, new_state, metrics = aggregator.finalize(state, inner, key, hparams, **extra)
        recorded = {
            RECORD_UPLOADS: gathered.uploads,
            RECORD_WEIGHTS: gathered.weights,
            RECORD_AGGREGATE: out,
        }
        if gathered.client_ids is not None:
            recorded[RECORD_CLIENT_IDS] = gathered.client_ids
        return out, new_state, {**metrics, **recorded}

    return aggregator._replace(
        start=lambda state, like: (),
        accumulate=lambda acc, uploads, weights, state, hparams: acc,
        finalize=finalize,
        gathers=True,
    )


def upload_record(recorded: Mapping[str, Any]) -> UploadRecord | None:
    """The `UploadRecord` in a round's recorded metrics (None if nothing was recorded).

    Args:
      recorded: the round's pipeline metrics (or their `fedjax_llm.pipeline.split_recorded`
        part).
    """
    if RECORD_UPLOADS not in recorded:
        return None
    return UploadRecord(
        recorded[RECORD_UPLOADS],
        recorded[RECORD_WEIGHTS],
        recorded[RECORD_AGGREGATE],
        recorded.get(RECORD_CLIENT_IDS),
    )


# ------------------------------------------------------------------------------- the scores
class ContributionScores(NamedTuple):
    """One round's scores of its slots.

    Attributes:
      cosine: ``[C]`` cosine of each slot's update with the aggregate update.
      loo: ``[C]`` first-order leave-one-out influence (positive: the client helped).
      shapley: ``[C]`` GTG-Shapley value (0 in a skipped round).
      value_before: ``v({}) = -L(theta)``, minus the held-out loss before the round.
      value_after: ``v(all)``, minus the held-out loss after the FedAvg step of every client.
      shapley_skipped: whether between-round truncation skipped the Shapley computation.
      evaluations: held-out evaluations of candidate params (``v({})``, ``v(all)`` and the
        Shapley prefixes; a batch evaluates every permutation's prefix, truncated or not).
    """

    cosine: jax.Array
    loo: jax.Array
    shapley: jax.Array
    value_before: jax.Array
    value_after: jax.Array
    shapley_skipped: jax.Array
    evaluations: jax.Array


def _masked(tree: PyTree, mask: jax.Array) -> PyTree:
    """Zeros the rows of a per-slot pytree where ``mask`` is False (garbage cannot leak)."""

    def one(x):
        keep = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x.astype(jnp.float32), 0.0)

    return jax.tree.map(one, tree)


def _row_dots(stacked: PyTree, other: PyTree) -> jax.Array:
    """``[C]`` dot products of each row of ``stacked`` with the params-shaped ``other``."""
    parts = [
        jnp.sum(
            (x.astype(jnp.float32) * y.astype(jnp.float32)[None]).reshape(x.shape[0], -1), axis=1
        )
        for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(other), strict=True)
    ]
    return functools.reduce(jnp.add, parts)


def cosine_scores(deltas: PyTree, aggregate_delta: PyTree, counted: jax.Array) -> jax.Array:
    """The cosine of each slot's update with the aggregate update.

    Args:
      deltas: per-slot updates ``[C, ...]``.
      aggregate_delta: the round's aggregate update (params-shaped).
      counted: ``[C]`` bool, the slots whose upload counted; the others score 0.

    Returns:
      ``[C]`` float32 ``<delta_i, a> / (|delta_i| |a|)`` (0 where either norm is 0).
    """
    deltas = _masked(deltas, counted)
    dots = _row_dots(deltas, aggregate_delta)
    norms = jnp.sqrt(
        functools.reduce(
            jnp.add,
            [
                jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)
                for x in jax.tree.leaves(deltas)
            ],
        )
    )
    norm_a = jnp.sqrt(
        functools.reduce(
            jnp.add,
            [jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(aggregate_delta)],
        )
    )
    denom = norms * norm_a
    return jnp.where(counted & (denom > 0), dots / jnp.where(denom > 0, denom, 1.0), 0.0)


def loo_scores(grad: PyTree, deltas: PyTree, weights: jax.Array, server_lr: jax.Array) -> jax.Array:
    """First-order leave-one-out influence of each slot on the held-out loss.

    ``loo_i = g . (step_{-i} - step_all)`` with ``step_S = server_lr * sum_{j in S} w_j
    delta_j / sum_{j in S} w_j`` (no step, 0, for an empty S). Only ``g . delta_j`` is
    needed, so it costs one pass over the uploads.

    Args:
      grad: ``g``, the held-out loss's gradient at the pre-round params.
      deltas: per-slot updates ``[C, ...]``.
      weights: ``[C]`` aggregation weights (0: not counted; scores 0).
      server_lr: the round's server learning rate.

    Returns:
      ``[C]`` float32; positive where the client helped (its removal raises the loss).
    """
    weights = jnp.asarray(weights, jnp.float32)
    counted = weights > 0
    w = jnp.where(counted, weights, 0.0)
    dots = _row_dots(_masked(deltas, counted), grad)
    total_w = jnp.sum(w)
    total = jnp.sum(w * dots)
    step_all = jnp.where(total_w > 0, total / jnp.where(total_w > 0, total_w, 1.0), 0.0)
    rest_w = total_w - w
    step_without = jnp.where(
        rest_w > 0, (total - w * dots) / jnp.where(rest_w > 0, rest_w, 1.0), 0.0
    )
    return jnp.where(counted, server_lr * (step_without - step_all), 0.0)


def guided_permutations(
    key: jax.Array, counted: jax.Array, client_ids: jax.Array, num_permutations: int
) -> jax.Array:
    """GTG-Shapley's guided permutations of a round's counted slots.

    Permutation p starts with the counted client ``(offset + p) mod n`` in the order of
    client ids (a random offset), so that every client is first equally often (its marginal
    against the empty set, the largest, is always sampled); the rest of the counted slots
    follow in a random order, then the other slots. Each client's random priorities are drawn
    from its id, so the permutations of clients do not depend on the slots they sit in (the
    chunk size, devices or engine).

    Args:
      key: the round's contribution key.
      counted: ``[C]`` bool, the slots whose upload counted.
      client_ids: ``[C]`` int the slots' client ids.
      num_permutations: P (static).

    Returns:
      ``[P, C]`` int32 slot indices.
    """
    client_ids = jnp.asarray(client_ids, jnp.int32)
    n = jnp.maximum(jnp.sum(counted), 1)
    members = jnp.argsort(jnp.where(counted, client_ids, jnp.iinfo(jnp.int32).max), stable=True)
    offset_key, order_key = jax.random.split(key)
    offset = jax.random.randint(offset_key, (), 0, n)
    first = members[(offset + jnp.arange(num_permutations)) % n]
    priority = jax.vmap(
        lambda i: jax.random.uniform(jax.random.fold_in(order_key, i), (num_permutations,))
    )(client_ids).T
    priority = jnp.where(counted[None, :], priority, 2.0)
    priority = priority.at[jnp.arange(num_permutations), first].set(-1.0)
    return jnp.argsort(priority, axis=1).astype(jnp.int32)


def gtg_shapley(
    values: Callable[[jax.Array], jax.Array],
    counted: jax.Array,
    order: jax.Array,
    truncation: jax.Array,
    value_before: jax.Array,
    value_after: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Monte Carlo Shapley values over given permutations, with GTG-Shapley's truncations.

    Position by position (a `jax.lax.while_loop`), the next prefix of every permutation is
    evaluated in one batched call of ``values``; a permutation whose previous prefix's value
    is within ``truncation x |v(all)|`` of ``v(all)`` keeps that value (its marginals from
    there on are 0). The loop ends when every permutation is truncated or only the last
    position is left, whose prefix is the whole set (``v(all)``, known).

    Args:
      values: ``(masks [K, C] bool) -> [K]`` the value of each subset (jittable).
      counted: ``[C]`` bool, the players (the slots whose upload counted).
      order: ``[P, C]`` permutations of slot indices (counted slots are moved to the front,
        keeping their order).
      truncation: the relative tolerance (0: none).
      value_before: ``v({})``.
      value_after: ``v(all)``.

    Returns:
      ``(shapley [C], evaluations, skipped)``: the mean marginal of each slot over the
      permutations (0 for slots that did not count and in a skipped round), the number of
      subsets evaluated, and whether the round was skipped (``|v(all) - v({})| <
      truncation x |v(all)|``, or nobody counted).

    References:
      Liu et al. 2022, "GTG-Shapley: Efficient and Accurate Participant Contribution
      Evaluation in Federated Learning", Algorithm 1.
    """
    num_permutations, c = order.shape
    n = jnp.sum(counted).astype(jnp.int32)
    late = jnp.logical_not(counted[order])
    order = jnp.take_along_axis(order, jnp.argsort(late, axis=1, stable=True), axis=1)
    rank = jnp.argsort(order, axis=1)
    tol = truncation * jnp.abs(value_after)
    skipped = jnp.logical_or(n == 0, jnp.abs(value_after - value_before) < tol)
    rows = jnp.arange(num_permutations)

    def open_(prev):
        return jnp.abs(value_after - prev) >= tol

    def cond(carry):
        size, prev, _, _ = carry
        return (size < n - 1) & jnp.any(open_(prev)) & jnp.logical_not(skipped)

    def body(carry):
        size, prev, marginals, evaluations = carry
        new = jnp.where(open_(prev), values(rank <= size), prev)
        marginals = marginals.at[rows, order[:, size]].add(new - prev)
        return size + 1, new, marginals, evaluations + num_permutations

    init = (
        jnp.int32(0),
        jnp.full((num_permutations,), value_before, jnp.float32),
        jnp.zeros((num_permutations, c), jnp.float32),
        jnp.int32(0),
    )
    _, prev, marginals, evaluations = jax.lax.while_loop(cond, body, init)
    # The last position's prefix is the whole set, whose value is known.
    last = order[:, jnp.maximum(n - 1, 0)]
    marginals = marginals.at[rows, last].add(jnp.where(open_(prev), value_after - prev, 0.0))
    shapley = jnp.sum(marginals, axis=0) / max(num_permutations, 1)
    return jnp.where(skipped | jnp.logical_not(counted), 0.0, shapley), evaluations, skipped


def make_contribution_scorer(objective: Objective, batch_size: int | None = None) -> Callable:
    """Builds the jitted scorer of a round's uploads.

    Args:
      objective: the training objective; its loss on the evaluation batch is the held-out
        loss ``L`` (``sum loss_sum / sum loss_weight``).
      batch_size: rows (candidate params x examples) one evaluation call processes; None:
        every candidate of a position and every example at once (one `jax.vmap`).

    Returns:
      ``scorer(frozen, params, deltas, weights, aggregate_delta, eval_batch, order,
      server_lr, truncation) -> ContributionScores``, pure and jitted: ``params`` the global
      trainable params before the round, ``deltas`` the per-slot updates ``[C, ...]`` and
      ``weights`` ``[C]`` (`UploadRecord`), ``aggregate_delta`` the aggregate update,
      ``eval_batch`` ``{field: [E, ...]}`` with ``example_weight`` ``[E]``
      (`contribution_eval_batch`), ``order`` ``[P, C]`` permutations (`guided_permutations`),
      ``server_lr`` and ``truncation`` scalars (arrays, so that changing them never
      recompiles).
    """

    def scorer(
        frozen, params, deltas, weights, aggregate_delta, eval_batch, order, server_lr, truncation
    ):
        weights = jnp.asarray(weights, jnp.float32)
        counted = weights > 0
        w = jnp.where(counted, weights, 0.0)
        deltas = _masked(deltas, counted)
        num_examples = eval_batch["example_weight"].shape[0]
        chunk = num_examples if batch_size is None else min(num_examples, batch_size)
        per_call = None if batch_size is None else max(1, batch_size // chunk)
        pad = -num_examples % chunk
        chunks = jax.tree.map(
            lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
                (-1, chunk) + x.shape[1:]
            ),
            eval_batch,
        )
        key = jax.random.key(0)  # the evaluation's: objectives here draw nothing at eval

        def mean_loss(p):
            def add(sums, batch):
                _, metrics = objective.loss(frozen, p, batch, key)
                return (sums[0] + metrics[LOSS_SUM], sums[1] + metrics[LOSS_WEIGHT]), None

            zero = jnp.zeros((), jnp.float32)
            (total, weight), _ = jax.lax.scan(add, (zero, zero), chunks)
            return total / jnp.maximum(weight, 1.0)

        def candidate_value(coef):
            moved = jax.tree.map(
                lambda t, d: (
                    t.astype(jnp.float32) + server_lr * jnp.tensordot(coef, d, axes=1)
                ).astype(t.dtype),
                params,
                deltas,
            )
            return -mean_loss(moved)

        def coefficients(masks):
            mw = masks.astype(jnp.float32) * w[None, :]
            total = jnp.sum(mw, axis=1, keepdims=True)
            return mw / jnp.where(total > 0, total, 1.0)

        def values(masks):
            coefs = coefficients(masks)
            k = coefs.shape[0]
            if per_call is None or per_call >= k:
                return jax.vmap(candidate_value)(coefs)
            # Batches that divide the candidates: one traced model, no remainder batch.
            batch = max(b for b in range(1, per_call + 1) if k % b == 0)
            return jax.lax.map(candidate_value, coefs, batch_size=batch)

        # Each evaluation is one more traced model: the loss and its gradient at theta in one
        # pass, the whole round's step alone, then the prefixes' batches inside the loop.
        loss_before, grad = jax.value_and_grad(mean_loss)(params)
        value_before = -loss_before
        value_after = candidate_value(coefficients(counted[None, :])[0])
        shapley, evaluations, skipped = gtg_shapley(
            values, counted, order, truncation, value_before, value_after
        )
        return ContributionScores(
            cosine=cosine_scores(deltas, aggregate_delta, counted),
            loo=loo_scores(grad, deltas, w, server_lr),
            shapley=shapley,
            value_before=value_before,
            value_after=value_after,
            shapley_skipped=skipped,
            evaluations=evaluations + 2,
        )

    return jax.jit(scorer)


def contribution_eval_batch(
    examples: Any, fields: Sequence[str], num_examples: int, seed: int
) -> dict[str, np.ndarray]:
    """A fixed, seeded subset of a held-out set as the scorer's evaluation batch.

    Args:
      examples: the global held-out set: a `fedjax_llm.data.TokenizedExamples` (fields as
        attributes) or a dict ``{field: [N, ...]}`` (`fedjax_llm.ClientArrays.eval`).
      fields: the fields the objective reads.
      num_examples: how many examples (all of them if the set is smaller).
      seed: the subset's seed (``run.seed``): the same examples every round and on resume.

    Returns:
      ``{field: [E, ...]}`` plus ``example_weight`` ``[E]`` (ones).

    Raises:
      ValueError: if the set lacks a field or is empty.
    """

    def get(name):
        if isinstance(examples, Mapping):
            return examples.get(name)
        return getattr(examples, name, None)

    missing = [f for f in fields if get(f) is None]
    if missing:
        raise ValueError(f"the held-out set lacks the fields {missing} the objective reads.")
    n = len(get(fields[0]))
    if n == 0:
        raise ValueError("the held-out set is empty.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC047]))
    rows = np.sort(rng.permutation(n)[: min(num_examples, n)])
    batch = {f: np.asarray(get(f))[rows] for f in fields}
    batch["example_weight"] = np.ones(len(rows), np.float32)
    return batch


# ------------------------------------------------------------------------------- in a run
class ContributionScoring:
    """Scores the rounds of a run (the glue between `fedjax_llm.Simulation` and the scorer).

    Args:
      objective: the training objective (without DP-SGD's private gradient).
      eval_batch: from `contribution_eval_batch`.
      num_permutations: Shapley permutations per round (0: no Shapley values).
      truncation: GTG-Shapley's relative tolerance.
      batch_size: rows per evaluation call (see `make_contribution_scorer`).
      params_delta: the algorithm's `fedjax_llm.algorithms.Algorithm.params_delta` (the
        params-shaped change an aggregated upload stands for); None: the uploads' ``delta``.
    """

    def __init__(
        self,
        objective: Objective,
        eval_batch: dict[str, np.ndarray],
        num_permutations: int,
        truncation: float,
        batch_size: int | None = None,
        params_delta: Callable | None = None,
    ):
        self.eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
        self.num_permutations = num_permutations
        self.truncation = jnp.asarray(truncation, jnp.float32)
        self.scorer = make_contribution_scorer(objective, batch_size)
        self._permutations = jax.jit(guided_permutations, static_argnums=3)
        if params_delta is None:
            params_delta = lambda params, upload: upload.delta  # noqa: E731
        self._changes = jax.jit(
            lambda params, uploads, aggregate: (
                jax.vmap(params_delta, in_axes=(None, 0))(params, uploads),
                params_delta(params, aggregate),
            )
        )

    def score(
        self,
        frozen: PyTree,
        params_before: PyTree,
        record: UploadRecord,
        round_key: jax.Array,
        server_lr: jax.Array,
    ) -> ContributionScores:
        """One round's scores (fetched to the host).

        Args:
          frozen: the frozen base.
          params_before: the global trainable params before the round.
          record: the round's `UploadRecord`.
          round_key: the round's key (the permutations use its `CONTRIBUTION_STREAM`).
          server_lr: the round's server learning rate.
        """
        weights = jnp.asarray(record.weights, jnp.float32)
        ids = record.client_ids
        ids = jnp.arange(weights.shape[0], dtype=jnp.int32) if ids is None else ids
        key = jax.random.fold_in(jax.random.clone(round_key), CONTRIBUTION_STREAM)
        order = self._permutations(key, weights > 0, ids, self.num_permutations)
        deltas, aggregate = self._changes(params_before, record.uploads, record.aggregate)
        scores = self.scorer(
            frozen,
            params_before,
            deltas,
            weights,
            aggregate,
            self.eval_batch,
            order,
            jnp.asarray(server_lr, jnp.float32),
            self.truncation,
        )
        return jax.device_get(scores)


def round_records(
    round_num: int,
    client_ids: np.ndarray,
    participating: np.ndarray,
    weights: np.ndarray,
    scores: ContributionScores,
    shapley: bool = True,
) -> list[dict]:
    """The lines of `CONTRIBUTIONS` for one round: one per sampled client.

    Args:
      round_num: the round (1-based, as in metrics.jsonl).
      client_ids: ``[C]`` the slots' client ids.
      participating: ``[C]`` which slots hold a sampled client.
      weights: ``[C]`` aggregation weights.
      scores: the round's `ContributionScores`.
      shapley: whether Shapley values were computed (else ``shapley`` is None).

    Returns:
      ``{"round", "client", "weight", "counted", "cosine", "loo", "shapley"}`` per sampled
      client, in slot order; a client whose upload did not count (lost, or no local step) has
      ``counted`` false and None scores.
    """
    out = []
    for slot in np.flatnonzero(np.asarray(participating)):
        counted = bool(weights[slot] > 0)

        def value(x, slot=slot, counted=counted):
            return float(x[slot]) if counted else None

        out.append(
            {
                "round": int(round_num),
                "client": int(client_ids[slot]),
                "weight": float(weights[slot]),
                "counted": counted,
                "cosine": value(scores.cosine),
                "loo": value(scores.loo),
                "shapley": value(scores.shapley) if shapley else None,
            }
        )
    return out


def contribution_totals(records: Sequence[Mapping[str, Any]]) -> dict:
    """Per-client totals of `CONTRIBUTIONS` lines and the clients' ranking.

    Args:
      records: the lines (any order).

    Returns:
      ``{"rounds": last round, "ranked_by": "shapley_sum" (or "loo_sum" without Shapley
      values), "ranking": client ids best first (ties by id), "clients": [{"client",
      "rounds_sampled", "rounds_counted", "mean_cosine", "loo_sum", "shapley_sum"}, ...] by
      id}``; the means and sums run over the rounds where the client counted (None if none).
    """
    by_client: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        by_client.setdefault(int(r["client"]), []).append(r)
    has_shapley = any(r.get("shapley") is not None for r in records)
    clients = []
    for client in sorted(by_client):
        rows = by_client[client]
        counted = [r for r in rows if r.get("counted")]
        cosines = [r["cosine"] for r in counted if r.get("cosine") is not None]
        clients.append(
            {
                "client": client,
                "rounds_sampled": len(rows),
                "rounds_counted": len(counted),
                "mean_cosine": float(np.mean(cosines)) if cosines else None,
                "loo_sum": math.fsum(r["loo"] for r in counted) if counted else None,
                "shapley_sum": math.fsum(r["shapley"] for r in counted)
                if counted and has_shapley
                else None,
            }
        )
    key = "shapley_sum" if has_shapley else "loo_sum"
    ranking = sorted(
        clients,
        key=lambda c: (c[key] is None, -(c[key] or 0.0), c["client"]),
    )
    return {
        "rounds": max((int(r["round"]) for r in records), default=0),
        "ranked_by": key,
        "ranking": [c["client"] for c in ranking],
        "clients": clients,
    }


def write_contribution_totals(run_dir: str) -> dict:
    """Recomputes `CONTRIBUTION_TOTALS` from the run directory's `CONTRIBUTIONS` and writes
    it (process 0 only); returns the totals."""
    path = os.path.join(run_dir, CONTRIBUTIONS)
    records = read_jsonl(path, allow_partial_last_line=True) if os.path.exists(path) else []
    totals = contribution_totals(records)
    if distributed.is_main_process():
        with open(os.path.join(run_dir, CONTRIBUTION_TOTALS), "w") as f:
            json.dump(totals, f, indent=1)
    return totals
