"""One federated round as one compiled program.

The frozen base is an argument shared by every client (never copied per client); the
trainable part carries a leading client axis. Local training is a `jax.lax.scan` over local
steps inside a `jax.vmap` over a chunk of clients; chunks run in a `jax.lax.scan` whose carry is
the running weighted sum of client outputs, so memory is that of one chunk. Aggregation and the
server update follow in the same program. Each client draws its own batches on the device from
its slice of the dataset with its own key ``fold_in(round_key, client_id)``, so results do not
depend on chunk size or on the order clients are processed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import Algorithm, HyperParams, RoundInfo
from kernels.aggregation import weighted_sum_finalize, weighted_sum_init, weighted_sum_update

PyTree = Any


class ClientData(NamedTuple):
    """The training examples of all clients, resident on the device.

    Attributes:
      tokens: ``[N, T]`` int32, each client's examples contiguous.
      loss_mask: ``[N, T]`` float32, 1 at target (response) positions.
      client_start: ``[M]`` int32 index of each client's first example.
      client_count: ``[M]`` int32 number of examples of each client (>= 1).
    """

    tokens: jax.Array
    loss_mask: jax.Array
    client_start: jax.Array
    client_count: jax.Array


class LocalSchedule(NamedTuple):
    """Static shape of local training.

    Attributes:
      local_steps: scan length K (the most steps any client takes).
      batch_size: examples per step B.
      max_client_examples: largest client size (static bound for on-device shuffling).
      local_epochs: if set, client i's example budget is ``ceil(local_epochs * n_i)`` (at
        most ``K * B``); otherwise every client uses ``K * B`` examples.
    """

    local_steps: int
    batch_size: int
    max_client_examples: int
    local_epochs: float | None = None


class ClientMetrics(NamedTuple):
    """Per-client sums over its local steps."""

    loss_sum: jax.Array
    target_tokens: jax.Array
    tokens: jax.Array
    steps: jax.Array
    examples: jax.Array


def lm_loss(
    apply_fn: Callable, frozen: PyTree, params: PyTree, batch: dict, pad_id: int
) -> tuple[jax.Array, dict]:
    """Next-token cross entropy on target positions, masked per example.

    Args:
      apply_fn: ``(frozen, params, tokens) -> logits``.
      frozen: the shared frozen base.
      params: trainable params.
      batch: ``tokens`` [B, T], ``loss_mask`` [B, T] (1 at positions whose token is a target),
        ``example_weight`` [B] (0 for padding examples).
      pad_id: padding token id (for counting processed tokens).

    Returns:
      The mean loss over weighted target tokens and metrics sums (``loss_sum``,
      ``target_tokens``, ``tokens``).
    """
    tokens = batch["tokens"]
    logits = apply_fn(frozen, params, tokens)[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    weight = batch["loss_mask"][:, 1:] * batch["example_weight"][:, None]
    loss_sum = jnp.sum(ce * weight)
    target_tokens = jnp.sum(weight)
    processed = jnp.sum((tokens != pad_id) * batch["example_weight"][:, None])
    loss = loss_sum / jnp.maximum(target_tokens, 1.0)
    return loss, {"loss_sum": loss_sum, "target_tokens": target_tokens, "tokens": processed}


def client_batch_indices(
    key: jax.Array, start: jax.Array, count: jax.Array, schedule: LocalSchedule
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one client's local batches on the device.

    The client's examples are shuffled once per round (top-k of random scores, masked to the
    client's size) and streamed in that order, cycling when a client has fewer than ``K * B``.

    Args:
      key: the client's key for this round.
      start: index of the client's first example.
      count: the client's number of examples (>= 1).
      schedule: static local-training shape.

    Returns:
      ``indices`` [K, B] into the dataset, ``example_mask`` [K, B] (1 for examples within the
      client's budget) and ``step_mask`` [K] (1 for steps with at least one example).
    """
    k, b = schedule.local_steps, schedule.batch_size
    draws = min(k * b, schedule.max_client_examples)
    scores = jax.random.uniform(key, (schedule.max_client_examples,))
    scores = jnp.where(jnp.arange(schedule.max_client_examples) < count, scores, -1.0)
    _, order = jax.lax.top_k(scores, draws)
    position = jnp.arange(k * b)
    local = order[position % jnp.minimum(count, draws)]
    if schedule.local_epochs is None:
        budget = k * b
    else:
        budget = jnp.minimum(jnp.ceil(schedule.local_epochs * count).astype(jnp.int32), k * b)
    example_mask = (position < budget).astype(jnp.float32).reshape(k, b)
    step_mask = example_mask[:, 0] > 0
    return (start + local).reshape(k, b), example_mask, step_mask


def _tree_where(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def make_client_update(
    algorithm: Algorithm,
    apply_fn: Callable,
    schedule: LocalSchedule,
    pad_id: int,
    uniform_weighting: bool = False,
) -> Callable:
    """Builds one client's whole round of local training as a pure function.

    Args:
      algorithm: the federated algorithm.
      apply_fn: ``(frozen, params, tokens) -> logits``.
      schedule: static local-training shape.
      pad_id: padding token id.
      uniform_weighting: weight every participating client 1 instead of by its example count.

    Returns:
      ``client_update(frozen, broadcast, client_state, data, client_id, round_key, hparams)
      -> (ClientOutput, new_client_state, weight, ClientMetrics)``. It is what the round
      vmaps over clients, and can be jitted alone to train clients one at a time.
    """
    loss_fn_of = functools.partial(lm_loss, apply_fn)

    def client_update(frozen, broadcast, client_state, data, client_id, round_key, hparams):
        key = jax.random.fold_in(round_key, client_id)
        data_key, step_key = jax.random.split(key)
        start, count = data.client_start[client_id], data.client_count[client_id]
        indices, example_mask, step_mask = client_batch_indices(data_key, start, count, schedule)
        batches = {
            "tokens": data.tokens[indices],
            "loss_mask": data.loss_mask[indices],
            "example_weight": example_mask,
        }

        def loss_fn(params, batch, key):
            del key  # the model has no dropout; the key is for algorithms that sample
            return loss_fn_of(frozen, params, batch, pad_id)

        def step(train_state, inputs):
            batch, valid, key = inputs
            new_state, metrics = algorithm.client_step(
                broadcast, client_state, train_state, batch, key, loss_fn, hparams
            )
            # A masked step (client out of data) leaves the state exactly as it was. Without
            # local_epochs every step is real, so skip the extra pass over the state.
            if schedule.local_epochs is not None:
                new_state = _tree_where(valid, new_state, train_state)
            train_state = new_state
            metrics = {name: metrics[name] * valid for name in ClientMetrics._fields[:3]}
            return train_state, metrics

        train_state = algorithm.client_init(broadcast, client_state, hparams)
        keys = jax.random.split(step_key, schedule.local_steps)
        train_state, metrics = jax.lax.scan(step, train_state, (batches, step_mask, keys))
        output, new_client_state = algorithm.client_final(
            broadcast, train_state, client_state, hparams
        )
        took_steps = (train_state.steps > 0).astype(jnp.float32)
        size = jnp.float32(1.0) if uniform_weighting else count.astype(jnp.float32)
        client_metrics = ClientMetrics(
            *(jnp.sum(metrics[name]) for name in ClientMetrics._fields[:3]),
            steps=train_state.steps,
            examples=jnp.sum(example_mask),
        )
        return output, new_client_state, size * took_steps, client_metrics

    return client_update


class RoundOutput(NamedTuple):
    """What a round returns besides the new states.

    Attributes:
      train_loss: token-weighted mean local training loss over all clients and steps.
      client_loss: ``[C]`` each client's mean local loss.
      weights: ``[C]`` aggregation weights used.
      metrics: `ClientMetrics` summed over clients.
    """

    train_loss: jax.Array
    client_loss: jax.Array
    weights: jax.Array
    metrics: ClientMetrics


CLIENT_AXIS = "clients"
"""Name of the device-mesh axis that the sampled clients are sharded over."""


def make_round_fn(
    algorithm: Algorithm,
    apply_fn: Callable,
    schedule: LocalSchedule,
    *,
    num_clients_total: int,
    clients_per_chunk: int | None,
    pad_id: int,
    uniform_weighting: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable:
    """Builds the whole round: local training of every sampled client, aggregation, server.

    Args:
      algorithm: the federated algorithm.
      apply_fn: ``(frozen, params, tokens) -> logits``.
      schedule: static local-training shape.
      num_clients_total: client population size (rows of the client state store).
      clients_per_chunk: clients vmapped together on one device (None: all of that device's
        sampled clients at once).
      pad_id: padding token id.
      uniform_weighting: aggregate with equal client weights.
      mesh: optional device mesh with a `CLIENT_AXIS` axis of D devices. Each device then trains
        C / D of the sampled clients (in chunks of `clients_per_chunk`) against a replicated
        frozen base and broadcast, and the devices' running weighted sums are added with one
        `psum`. The server update runs replicated. Results equal the one-device round up to the
        order of floating-point additions.

    Returns:
      ``round_fn(frozen, server_state, client_store, data, client_ids, round_key, hparams)
      -> (server_state, client_store, RoundOutput)``, pure and ready for `jax.jit`.
    """
    client_update = make_client_update(algorithm, apply_fn, schedule, pad_id, uniform_weighting)
    vmapped = jax.vmap(client_update, in_axes=(None, None, 0, None, 0, None, None))

    def output_shape(frozen, broadcast, client_states, data, client_ids, round_key, hparams):
        one_state = jax.tree.map(lambda s: s[0], client_states)
        return jax.eval_shape(
            lambda: client_update(
                frozen, broadcast, one_state, data, client_ids[0], round_key, hparams
            )[0]
        )

    def train_clients(*args):
        """Trains the given clients chunk by chunk; returns their weighted sum and outputs."""
        frozen, broadcast, client_states, data, client_ids, round_key, hparams = args
        num_sampled = client_ids.shape[0]
        chunk = clients_per_chunk or num_sampled
        num_chunks = num_sampled // chunk

        def chunked(x):
            return x.reshape((num_chunks, chunk) + x.shape[1:])

        def chunk_step(sums, inputs):
            ids, states = inputs
            outputs, new_states, weights, metrics = vmapped(
                frozen, broadcast, states, data, ids, round_key, hparams
            )
            return weighted_sum_update(sums, outputs, weights), (new_states, weights, metrics)

        sums, (new_states, weights, metrics) = jax.lax.scan(
            chunk_step,
            weighted_sum_init(output_shape(*args)),
            (chunked(client_ids), jax.tree.map(chunked, client_states)),
        )
        unchunk = functools.partial(jax.tree.map, lambda x: x.reshape((-1,) + x.shape[2:]))
        return sums, unchunk(new_states), unchunk(weights), unchunk(metrics)

    train_all = train_clients
    if mesh is not None:
        P = jax.sharding.PartitionSpec

        def train_local_clients(*args):
            sums, new_states, weights, metrics = train_clients(*args)
            return jax.lax.psum(sums, CLIENT_AXIS), new_states, weights, metrics

        shard = P(CLIENT_AXIS)
        train_all = jax.shard_map(
            train_local_clients,
            mesh=mesh,
            in_specs=(P(), P(), shard, P(), shard, P(), P()),
            out_specs=(P(), shard, shard, shard),
            check_vma=False,
        )

    def round_fn(frozen, server_state, client_store, data, client_ids, round_key, hparams):
        broadcast = algorithm.broadcast(server_state)
        client_states = jax.tree.map(lambda s: s[client_ids], client_store)
        args = (frozen, broadcast, client_states, data, client_ids, round_key, hparams)
        sums, new_states, weights, metrics = train_all(*args)
        output_like = output_shape(*args)
        return finish_round(
            algorithm,
            num_clients_total,
            server_state,
            client_store,
            client_ids,
            weighted_sum_finalize(sums, output_like),
            new_states,
            weights,
            metrics,
        )

    return round_fn


def finish_round(
    algorithm: Algorithm,
    num_clients_total: int,
    server_state: PyTree,
    client_store: PyTree,
    client_ids: jax.Array,
    mean_output: PyTree,
    new_states: PyTree,
    weights: jax.Array,
    metrics: ClientMetrics,
) -> tuple[PyTree, PyTree, RoundOutput]:
    """The tail of a round: server update, scatter of client states, summed metrics.

    Args:
      algorithm: the algorithm.
      num_clients_total: population size.
      server_state: the server state before the update.
      client_store: the per-client state store ``[M, ...]``.
      client_ids: ``[C]`` the sampled clients.
      mean_output: the weighted mean `ClientOutput`.
      new_states: ``[C, ...]`` the sampled clients' new states.
      weights: ``[C]`` aggregation weights.
      metrics: per-client `ClientMetrics` ``[C]``.

    Returns:
      The new server state, the new store and the `RoundOutput`.
    """
    info = RoundInfo(jnp.sum(weights > 0), num_clients_total)
    server_state = algorithm.server_update(server_state, mean_output, info)
    client_store = jax.tree.map(
        lambda store, new: store.at[client_ids].set(new), client_store, new_states
    )
    totals = jax.tree.map(jnp.sum, metrics)
    output = RoundOutput(
        train_loss=totals.loss_sum / jnp.maximum(totals.target_tokens, 1.0),
        client_loss=metrics.loss_sum / jnp.maximum(metrics.target_tokens, 1.0),
        weights=weights,
        metrics=totals,
    )
    return server_state, client_store, output


def round_hparams(client_lr: float) -> HyperParams:
    """Packs round-varying values as float32 arrays (no recompilation when they change)."""
    return HyperParams(client_lr=jnp.asarray(client_lr, jnp.float32))
