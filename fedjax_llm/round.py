"""One federated round as one compiled program.

The frozen base is an argument shared by every client (never copied per client); the
trainable part carries a leading client axis. Local training is a `jax.lax.scan` over local
steps inside a `jax.vmap` over a chunk of clients; chunks run in a `jax.lax.scan` whose carry is
the aggregator's running sums, so memory is that of one chunk. The aggregation pipeline
(`fedjax_llm.pipeline`: upload transforms, a streaming or gathering aggregator, a keyed
finalize) and the server update follow in the same program.

The sampled clients sit on a padded client axis (`fedjax_llm.sampling.Cohort`): padding slots
and clients whose upload is lost contribute exactly nothing and keep their stored state, and
chunks that hold only padding are skipped. Each client draws its own batches on the device from
its slice of the dataset with its own key ``fold_in(round_key, client_id)``, so results do not
depend on chunk size, device count or the order clients are processed in.

Keys of a round (all derived from ``round_key``, none used twice): client i's key
``k_i = fold_in(round_key, i)`` splits into its batch-order key and its local-step keys, and
``fold_in(k_i, 2)`` is its upload-transform key; the server side uses
``fold_in(round_key, 2**32 - 1)`` (client ids are below it), split into the aggregator's,
the transform update's and the server update's keys; ``fold_in(round_key, 2**32 - 2)`` is the
`RoundContext` key shared by the cohort and the server (secure aggregation's pair seeds).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.algorithms.base import Algorithm, HyperParams, RoundInfo
from fedjax_llm.client_profiles import local_step_limit, with_client_values
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective, check_fields
from fedjax_llm.pipeline import (
    AggregationPipeline,
    Gathered,
    PipelineState,
    RoundContext,
    default_pipeline,
    merge_hyperparams,
    with_overrides,
)
from fedjax_llm.sampling import Cohort
from kernels.pytree import PyTree

SERVER_STREAM = 2**32 - 1
"""``fold_in`` data of the round's server-side key (client ids are always below it)."""
CONTEXT_STREAM = 2**32 - 2
"""``fold_in`` data of the round's shared `RoundContext` key."""
UPLOAD_STREAM = 2
"""``fold_in`` data of a client's upload-transform key (its key's split uses 0 and 1)."""
CLIENT_AXIS = "clients"
"""Name of the device-mesh axis that the sampled clients are sharded over."""


class ClientData(NamedTuple):
    """The training examples of all clients, resident on the device.

    Attributes:
      examples: dict of per-example arrays ``[N, ...]``, each client's examples contiguous
        (``tokens`` and ``loss_mask`` for language modelling; whatever the objective reads).
      client_start: ``[M]`` int32 index of each client's first example.
      client_count: ``[M]`` int32 number of examples of each client (>= 1).
      client_profile: per-client system attributes ``{name: [M]}`` (compute tier's step
        budget, step time, LoRA rank; `fedjax_llm.client_profiles`); each client sees its row
        as round values in ``hparams.values``. Empty: every client alike.
    """

    examples: dict
    client_start: jax.Array
    client_count: jax.Array
    client_profile: dict = {}  # noqa: RUF012 - a pytree field; never mutated


class ClientBatches(NamedTuple):
    """The batches of a round's clients, drawn ahead of the round (host-resident data).

    When the population's examples live on the host (`fedjax_llm.client_store`), the host
    gathers the examples each slot's client will use this round and sends only those; the
    round then reads them per slot instead of indexing a device-resident dataset.

    Attributes:
      examples: dict of per-slot arrays ``[C, K, B, ...]`` (the fields the objective reads).
      client_count: ``[C]`` int32 each slot's client's number of examples (its masks and
        weight; 1 for padding slots).
      client_profile: each slot's client's system attributes ``{name: [C]}`` (see
        `ClientData`).
    """

    examples: dict
    client_count: jax.Array
    client_profile: dict = {}  # noqa: RUF012 - a pytree field; never mutated


class LocalSchedule(NamedTuple):
    """Static shape of local training.

    Attributes:
      local_steps: scan length K (the most steps any client takes).
      batch_size: examples per step B.
      max_client_examples: largest client size (informational: batch drawing costs O(K * B)
        per client, whatever the sizes).
      local_epochs: if set, client i's example budget is ``ceil(local_epochs * n_i)`` (at
        most ``K * B``); otherwise every client uses ``K * B`` examples.
      shuffle: shuffle each client's examples every round (off: their stored order).
    """

    local_steps: int
    batch_size: int
    max_client_examples: int | None = None
    local_epochs: float | None = None
    shuffle: bool = True


class ClientStates(NamedTuple):
    """Persistent per-client state: the algorithm's (SCAFFOLD's control) and the upload
    transforms' (error feedback). In the store each leaf has a leading client axis."""

    algorithm: PyTree
    transform: PyTree


class RoundState(NamedTuple):
    """Everything a round updates.

    Attributes:
      server: the algorithm's server state (global params, server optimizer, ...).
      pipeline: the aggregation pipeline's server-side `PipelineState`.
      clients: the per-client store, `ClientStates` with a leading ``[num_clients_total]``
        axis.
    """

    server: PyTree
    pipeline: PipelineState
    clients: ClientStates


class ClientResult(NamedTuple):
    """What one client's round produces.

    Attributes:
      upload: the transformed `ClientOutput`.
      state: its new `ClientStates` (committed only if its upload was delivered).
      weight: its aggregation weight (0 unless delivered and it took a step).
      metrics: the objective's metric sums over its local steps, plus ``steps`` and
        ``examples`` (0 for padding slots).
      stats: the upload transforms' per-client stats (0 unless delivered).
    """

    upload: PyTree
    state: ClientStates
    weight: jax.Array
    metrics: dict
    stats: dict


class RoundOutput(NamedTuple):
    """What a round returns besides the new state.

    Attributes:
      train_loss: the weighted mean local training loss over all participating clients and
        steps (``sum loss_sum / sum loss_weight``).
      client_loss: ``[C]`` each slot's mean local loss (padding slots: 0).
      weights: ``[C]`` aggregation weights used.
      participating: ``[C]`` which slots held a sampled client.
      metrics: the objective's metric sums and ``steps``/``examples`` summed over clients.
      pipeline: the upload transforms' summed stats and the aggregator's metrics.
      params_finite: whether every new global trainable parameter is finite (the training
        loss is measured before the last local update, so it can miss a divergence).
    """

    train_loss: jax.Array
    client_loss: jax.Array
    weights: jax.Array
    participating: jax.Array
    metrics: dict
    pipeline: dict
    params_finite: jax.Array


SHUFFLE_ROUNDS = 24
"""Rounds of the swap-or-not permutation that shuffles a client's examples."""


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (the MurmurHash3 finalizer) of uint32 ``x``."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def random_permutation_at(key: jax.Array, index: jax.Array, n: jax.Array) -> jax.Array:
    """``perm(index)`` for a random permutation ``perm`` of ``[0, n)`` chosen by ``key``.

    A swap-or-not shuffle (Hoang, Morris and Rogaway, 2012): each of `SHUFFLE_ROUNDS` rounds
    pairs ``x`` with ``(k_r - x) mod n`` for a random ``k_r`` and swaps the pair or not by a
    hashed bit of the pair, so every round, and the whole, is a permutation of ``[0, n)`` for
    any ``n``. Evaluating it at the positions a client uses costs O(positions) work and
    memory, whatever ``n`` or the largest client's size is, which is what lets thousands of
    clients draw their batches in one round.

    Args:
      key: the permutation's key.
      index: int array of positions in ``[0, n)``.
      n: the domain size (>= 1), a traced int scalar.

    Returns:
      ``perm(index)``, same shape as ``index``.
    """
    n = jnp.asarray(n, jnp.uint32)
    offset_key, seed_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (SHUFFLE_ROUNDS,), 0, jnp.iinfo(jnp.int32).max)
    offsets = offsets.astype(jnp.uint32) % n
    seeds = jax.random.bits(seed_key, (SHUFFLE_ROUNDS,), jnp.uint32)

    def one_round(x, round_values):
        offset, seed = round_values
        partner = (offset + n - x) % n
        bit = _mix32(jnp.maximum(x, partner) ^ seed) >> 31
        return jnp.where(bit == 1, partner, x), None

    out, _ = jax.lax.scan(one_round, jnp.asarray(index, jnp.uint32), (offsets, seeds))
    return out.astype(jnp.int32)


def client_batch_indices(
    key: jax.Array, start: jax.Array, count: jax.Array, schedule: LocalSchedule
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one client's local batches on the device.

    The client's examples are shuffled once per round (a random permutation of its ``count``
    examples, `random_permutation_at`) and streamed in that order, cycling when a client has
    fewer than ``K * B``. With ``schedule.shuffle`` off they are streamed in their stored order
    instead. The cost is O(K * B) per client, independent of any client's size.

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
    position = jnp.arange(k * b)
    local = position % count
    if schedule.shuffle:
        local = random_permutation_at(key, local, count)
    example_mask, step_mask = client_masks(count, schedule)
    return (start + local).reshape(k, b), example_mask, step_mask


def client_masks(count: jax.Array, schedule: LocalSchedule) -> tuple[jax.Array, jax.Array]:
    """A client's ``example_mask`` [K, B] and ``step_mask`` [K] (see `client_batch_indices`)."""
    k, b = schedule.local_steps, schedule.batch_size
    position = jnp.arange(k * b)
    if schedule.local_epochs is None:
        budget = k * b
    else:
        budget = jnp.minimum(jnp.ceil(schedule.local_epochs * count).astype(jnp.int32), k * b)
    example_mask = (position < budget).astype(jnp.float32).reshape(k, b)
    return example_mask, example_mask[:, 0] > 0


def _tree_where(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def client_keys(round_key: jax.Array, client_id: jax.Array) -> tuple[jax.Array, ...]:
    """A client's keys of a round: (batch order, local steps, upload transform)."""
    key = jax.random.fold_in(round_key, client_id)
    upload_key = jax.random.fold_in(jax.random.clone(key), UPLOAD_STREAM)
    data_key, step_key = jax.random.split(key)
    return data_key, step_key, upload_key


def make_client_update(
    algorithm: Algorithm,
    objective: Objective,
    schedule: LocalSchedule,
    pipeline: AggregationPipeline | None = None,
    uniform_weighting: bool = False,
) -> Callable:
    """Builds one client's whole round (local training and upload transform) as a pure function.

    Args:
      algorithm: the federated algorithm.
      objective: the training objective.
      schedule: static local-training shape.
      pipeline: the aggregation pipeline (its upload transform runs here, per client).
      uniform_weighting: weight every delivered client 1 instead of by its example count.

    Returns:
      ``client_update(frozen, broadcast, transform_state, client_state, data, client_id,
      participating, delivered, round_key, hparams, context=None) -> ClientResult``. It is
      what the round vmaps over clients, and can be jitted alone to train clients one at a
      time. ``context`` is the round's `RoundContext`, needed only by transforms that set
      ``uses_context``.
    """
    transform = (pipeline or default_pipeline()).transform

    def client_update(
        frozen,
        broadcast,
        transform_state,
        client_state,
        data,
        client_id,
        participating,
        delivered,
        round_key,
        hparams,
        context=None,
    ):
        data_key, step_key, upload_key = client_keys(round_key, client_id)
        if isinstance(data, ClientBatches):
            # This slot's batches, drawn ahead of the round (see `draw_cohort_batches`).
            count = data.client_count
            example_mask, step_mask = client_masks(count, schedule)
            batches = dict(data.examples)
            profile = data.client_profile
        else:
            start, count = data.client_start[client_id], data.client_count[client_id]
            indices, example_mask, step_mask = client_batch_indices(
                data_key, start, count, schedule
            )
            batches = {name: x[indices] for name, x in data.examples.items()}
            profile = {name: x[client_id] for name, x in data.client_profile.items()}
        # The client's system attributes become round values that every piece can read.
        hparams = with_client_values(hparams, profile)
        limit = local_step_limit(hparams.values)
        if limit is not None:
            # A compute tier or the round's deadline stops this client early: its later steps
            # are masked (no recompilation when tiers or the deadline change).
            step_mask = jnp.logical_and(step_mask, jnp.arange(schedule.local_steps) < limit)
            example_mask = example_mask * step_mask[:, None]
        batches["example_weight"] = example_mask

        def loss_fn(params, batch, key):
            return objective.loss(frozen, params, batch, key)

        def step(train_state, inputs):
            batch, valid, key = inputs
            new_state, metrics = algorithm.client_step(
                broadcast, client_state.algorithm, train_state, batch, key, loss_fn, hparams
            )
            # A masked step (client out of data or out of time) leaves the state exactly as
            # it was. Without local_epochs or step limits every step is real, so skip the extra
            # pass over the state.
            if schedule.local_epochs is not None or limit is not None:
                new_state = _tree_where(valid, new_state, train_state)
            metrics = {name: value * valid for name, value in metrics.items()}
            return new_state, metrics

        train_state = algorithm.client_init(broadcast, client_state.algorithm, hparams)
        keys = jax.random.split(step_key, schedule.local_steps)
        train_state, metrics = jax.lax.scan(step, train_state, (batches, step_mask, keys))
        output, new_algorithm_state = algorithm.client_final(
            broadcast, train_state, client_state.algorithm, hparams
        )
        extra = {}
        if transform.uses_context:
            if context is None:
                raise ValueError("this upload transform needs the round's context (the cohort).")
            extra["context"] = context._replace(client_id=jnp.asarray(client_id, jnp.int32))
        upload, new_transform_state, stats = transform.apply(
            output, transform_state, client_state.transform, upload_key, hparams, **extra
        )
        if algorithm.expand_upload is not None:
            # What the server computes from the delivered message before aggregating it.
            upload = algorithm.expand_upload(broadcast, upload)
        participating = jnp.asarray(participating, jnp.float32)
        # Only a participating client can deliver (whatever a hand-made cohort says).
        delivered = jnp.asarray(delivered, jnp.float32) * participating
        took_steps = (train_state.steps > 0).astype(jnp.float32)
        size = jnp.float32(1.0) if uniform_weighting else count.astype(jnp.float32)
        metrics = {name: jnp.sum(value) for name, value in metrics.items()}
        metrics["steps"] = train_state.steps
        metrics["examples"] = jnp.sum(example_mask)
        # Padding slots report nothing (where, not a product, so that garbage cannot leak).
        metrics = {name: jnp.where(participating > 0, v, 0) for name, v in metrics.items()}
        new_state = ClientStates(new_algorithm_state, new_transform_state)
        if schedule.local_epochs is not None or limit is not None:
            # A client stopped before its first step uploads nothing that counts (weight 0):
            # it keeps its state (an error-feedback residual must not forget what it held).
            new_state = _tree_where(train_state.steps > 0, new_state, client_state)
        return ClientResult(
            upload=upload,
            state=new_state,
            weight=size * took_steps * delivered,
            metrics=metrics,
            stats={name: jnp.asarray(v, jnp.float32) * delivered for name, v in stats.items()},
        )

    return client_update


def round_context(cohort: Cohort, round_key: jax.Array) -> RoundContext:
    """The round's `RoundContext` as the server sees it (``client_id`` -1)."""
    return RoundContext(
        client_ids=jnp.asarray(cohort.client_ids, jnp.int32),
        participating=jnp.asarray(cohort.participating, bool),
        delivered=jnp.logical_and(cohort.delivered, cohort.participating),
        key=jax.random.fold_in(jax.random.clone(round_key), CONTEXT_STREAM),
        client_id=jnp.asarray(-1, jnp.int32),
    )


def round_keys(round_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The server-side keys of a round: (aggregator, transform update, server update)."""
    server_key = jax.random.fold_in(jax.random.clone(round_key), SERVER_STREAM)
    aggregator_key, transform_key, update_key = jax.random.split(server_key, 3)
    return aggregator_key, transform_key, update_key


def upload_shape(
    algorithm: Algorithm,
    pipeline: AggregationPipeline,
    server_state: PyTree,
    one_client_state: PyTree,
    hparams: HyperParams,
) -> PyTree:
    """The shapes and dtypes of one client's `ClientOutput` (before upload transforms).

    Args:
      algorithm: the algorithm.
      pipeline: the pipeline (unused for the shape; transforms must keep it).
      server_state: the algorithm's server state (arrays or shape structs).
      one_client_state: one client's algorithm state (no client axis).
      hparams: a `HyperParams`.

    Returns:
      A pytree of `jax.ShapeDtypeStruct`.
    """
    del pipeline

    def upload(server_state, one_client_state):
        broadcast = algorithm.broadcast(server_state)
        train_state = algorithm.client_init(broadcast, one_client_state, hparams)
        return algorithm.client_final(broadcast, train_state, one_client_state, hparams)[0]

    return jax.eval_shape(upload, server_state, one_client_state)


def aggregate_shape(algorithm: Algorithm, server_state: PyTree, upload_like: PyTree) -> PyTree:
    """The shapes of what the server aggregates from one message (`Algorithm.expand_upload`).

    Args:
      algorithm: the algorithm.
      server_state: its server state (arrays or shape structs).
      upload_like: one client's message (`upload_shape`).

    Returns:
      ``upload_like`` itself, or the expanded upload's shapes.
    """
    if algorithm.expand_upload is None:
        return upload_like
    return jax.eval_shape(
        lambda s, u: algorithm.expand_upload(algorithm.broadcast(s), u), server_state, upload_like
    )


def init_round_state(
    algorithm: Algorithm,
    params: PyTree,
    num_clients_total: int,
    pipeline: AggregationPipeline | None = None,
    frozen: PyTree | None = None,
    hparams: HyperParams | None = None,
) -> RoundState:
    """The state before the first round: server, pipeline and a store of per-client states.

    Args:
      algorithm: the algorithm.
      params: the initial global trainable parameters.
      num_clients_total: the population size (rows of the client store).
      pipeline: the aggregation pipeline (default: weighted mean).
      frozen: the frozen base, for algorithms whose server state holds it.
      hparams: used for shape inference only (default: `round_hparams` defaults).

    Returns:
      The `RoundState`.
    """
    pipeline = pipeline or default_pipeline()
    hparams = hparams or round_hparams(0.0, values=_default_values(algorithm, pipeline))
    if algorithm.server_frozen is not None:
        server = algorithm.server_init(params, frozen)
    else:
        server = algorithm.server_init(params)
    one_state = algorithm.client_state_init(params)
    like = upload_shape(algorithm, pipeline, server, one_state, hparams)
    one_transform_state = pipeline.transform.client_init(like)

    def stack(tree):
        return jax.tree.map(
            lambda x: jnp.zeros((num_clients_total,) + jnp.shape(x), jnp.asarray(x).dtype) + x,
            tree,
        )

    return RoundState(
        server=server,
        pipeline=PipelineState(
            pipeline.transform.init(like),
            pipeline.aggregator.init(aggregate_shape(algorithm, server, like)),
        ),
        clients=ClientStates(stack(one_state), stack(one_transform_state)),
    )


def _default_values(algorithm: Algorithm, pipeline: AggregationPipeline) -> dict:
    return merge_hyperparams(algorithm.hyperparams, pipeline.hyperparams)


def _frozen_of(algorithm: Algorithm, frozen: PyTree, server_state: PyTree) -> PyTree:
    return frozen if algorithm.server_frozen is None else algorithm.server_frozen(server_state)


CLIENT_STORES = ("device", "cohort")
"""Where a round finds the per-client states (see `make_round_fn`)."""


def make_round_fn(
    algorithm: Algorithm,
    objective: Objective,
    schedule: LocalSchedule,
    *,
    num_clients_total: int,
    clients_per_chunk: int | None,
    pipeline: AggregationPipeline | None = None,
    uniform_weighting: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    client_store: str = "device",
) -> Callable:
    """Builds the whole round: local training of every sampled client, aggregation, server.

    Args:
      algorithm: the federated algorithm.
      objective: the training objective.
      schedule: static local-training shape.
      num_clients_total: client population size (rows of the client state store).
      clients_per_chunk: clients vmapped together on one device (None: all of that device's
        slots at once). The cohort's slot count must be a multiple of chunk x devices
        (`fedjax_llm.sampling.cohort_slots`).
      pipeline: upload transforms and aggregator (default: the weighted mean, FedAvg).
      uniform_weighting: aggregate with equal client weights.
      mesh: optional device mesh with a `CLIENT_AXIS` axis of D devices. Each device then trains
        C / D of the slots (in chunks of `clients_per_chunk`) against a replicated frozen base
        and broadcast; streaming accumulators are added with one ``psum``, gathered uploads
        collected with one ``all_gather``. The server update runs replicated. Results equal the
        one-device round up to the order of floating-point additions.
      client_store: ``device``: ``state.clients`` is the whole population's store; on one
        device each chunk reads its clients' rows and writes their new states back before the
        next chunk runs, so no per-slot copy of the states exists and memory does not grow with
        the clients per round. With a mesh the store is replicated: each device reads its
        chunk's rows from its copy, and every device writes all devices' new rows of that chunk
        step (one ``all_gather`` of a chunk's states per step), so the copies stay equal and
        memory stays flat too. ``cohort``: ``state.clients`` holds only the cohort's
        rows ``[C]`` (gathered by the caller from a host-resident store) and the round returns
        them updated where the upload was delivered, for the caller to write back.

    Returns:
      ``round_fn(frozen, state, data, cohort, round_key, hparams, server_data=None) -> (state,
      RoundOutput)``, pure and ready for `jax.jit`; ``state`` is a `RoundState`, ``cohort`` a
      `Cohort` of arrays, ``data`` the device-resident `ClientData` or the cohort's
      `ClientBatches`. For algorithms whose server state holds the frozen base, ``frozen`` is
      ignored. ``server_data`` (optional) holds examples the server update trains on; it and
      the frozen base reach the server update as `RoundInfo.server_data` and `RoundInfo.frozen`.
    """
    if client_store not in CLIENT_STORES:
        raise ValueError(f"client_store must be one of {CLIENT_STORES}, got {client_store!r}.")
    pipeline = pipeline or default_pipeline()
    aggregator = pipeline.aggregator
    client_update = make_client_update(algorithm, objective, schedule, pipeline, uniform_weighting)
    # Chunk-wise write-back into the population store (device-resident store).
    writes_back = client_store == "device"

    def train_clients(
        frozen, broadcast, pipeline_state, states, data, cohort, round_key, hparams, context
    ):
        """Trains one device's slots chunk by chunk; returns accumulator, stats and results.

        ``states`` is the population store when chunks write back (then returned updated), or
        the slots' rows ``[C]`` (then their new rows are returned stacked)."""
        num_slots = cohort.client_ids.shape[0]
        chunk = clients_per_chunk or num_slots
        if num_slots % chunk:
            raise ValueError(
                f"{num_slots} client slots per device are not a multiple of the chunk size "
                f"{chunk}; pad the cohort with fedjax_llm.sampling.cohort_slots."
            )
        num_chunks = num_slots // chunk
        per_slot_data = isinstance(data, ClientBatches)
        vmapped = jax.vmap(
            client_update,
            in_axes=(None, None, None, 0, 0 if per_slot_data else None, 0, 0, 0)
            + (None, None, None),
        )

        def chunked(x):
            return x.reshape((num_chunks, chunk) + x.shape[1:])

        def run_chunk(inputs, chunk_states):
            ids, participating, delivered, chunk_data = inputs
            return vmapped(
                frozen,
                broadcast,
                pipeline_state.transform,
                chunk_states,
                data if chunk_data is None else chunk_data,
                ids,
                participating,
                delivered,
                round_key,
                hparams,
                context,
            )

        chunk_inputs = (
            chunked(cohort.client_ids),
            chunked(cohort.participating),
            chunked(cohort.delivered),
            jax.tree.map(chunked, data) if per_slot_data else None,
        )
        slot_states = None if writes_back else jax.tree.map(chunked, states)
        one_chunk = jax.tree.map(lambda x: x[0], chunk_inputs)
        one_states = (
            jax.tree.map(lambda s: s[one_chunk[0]], states)
            if writes_back
            else jax.tree.map(lambda x: x[0], slot_states)
        )
        result_like = jax.eval_shape(run_chunk, one_chunk, one_states)
        upload_like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), result_like.upload
        )

        def train_chunk(inputs, chunk_states):
            def skip(inputs, chunk_states):
                # A chunk of padding only: nothing to train. Its outputs are masked downstream.
                del inputs, chunk_states
                return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), result_like)

            return jax.lax.cond(jnp.any(inputs[1]), run_chunk, skip, inputs, chunk_states)

        def chunk_step(carry, xs):
            acc, stats, store = carry
            inputs, chunk_states = xs
            if writes_back:
                chunk_states = jax.tree.map(lambda s: s[inputs[0]], store)
            result = train_chunk(inputs, chunk_states)
            if writes_back:
                written = (inputs[0], inputs[1], inputs[2], result.state)
                if mesh is not None:
                    # Every device's copy of the store takes every device's writes of this step.
                    written = jax.lax.all_gather(written, CLIENT_AXIS, axis=0, tiled=True)
                store = commit_client_states(store, *written, num_clients_total)
            if not aggregator.gathers:
                acc = aggregator.accumulate(
                    acc, result.upload, result.weight, pipeline_state.aggregator, hparams
                )
            stats = jax.tree.map(lambda s, x: s + jnp.sum(x), stats, result.stats)
            ys = (() if writes_back else result.state, result.weight, result.metrics)
            if aggregator.gathers:
                ys = ys + (result.upload,)
            return (acc, stats, store), ys

        acc0 = (
            () if aggregator.gathers else aggregator.start(pipeline_state.aggregator, upload_like)
        )
        stats0 = jax.tree.map(lambda x: jnp.zeros((), jnp.float32), result_like.stats)
        carry0 = (acc0, stats0, states if writes_back else ())
        (acc, stats, store), ys = jax.lax.scan(
            chunk_step, carry0, (chunk_inputs, () if writes_back else slot_states)
        )
        unchunk = functools.partial(jax.tree.map, lambda x: x.reshape((-1,) + x.shape[2:]))
        ys = unchunk(ys)
        if aggregator.gathers:
            acc = Gathered(ys[3], ys[1], jnp.asarray(cohort.client_ids, jnp.int32))
        return acc, stats, store if writes_back else ys[0], ys[1], ys[2]

    train_all = train_clients
    if mesh is not None:
        P = jax.sharding.PartitionSpec

        def train_local_clients(*args):
            acc, stats, new_states, weights, metrics = train_clients(*args)
            if aggregator.gathers:
                acc = jax.lax.all_gather(acc, CLIENT_AXIS, axis=0, tiled=True)
            else:
                acc = jax.lax.psum(acc, CLIENT_AXIS)
            return acc, jax.lax.psum(stats, CLIENT_AXIS), new_states, weights, metrics

        shard = P(CLIENT_AXIS)

        # The population store is replicated (every device keeps it whole); a cohort's rows are
        # sharded like the slots.
        states_spec = P() if writes_back else shard

        def train_sharded(frozen, broadcast, pipeline_state, states, data, *rest):
            data_spec = shard if isinstance(data, ClientBatches) else P()
            return jax.shard_map(
                train_local_clients,
                mesh=mesh,
                in_specs=(P(), P(), P(), states_spec, data_spec, shard, P(), P(), P()),
                out_specs=(P(), P(), states_spec, shard, shard),
                check_vma=False,
            )(frozen, broadcast, pipeline_state, states, data, *rest)

        train_all = train_sharded

    def round_fn(frozen, state, data, cohort, round_key, hparams, server_data=None):
        frozen = _frozen_of(algorithm, frozen, state.server)
        hparams = with_overrides(pipeline.transform, state.pipeline.transform, hparams)
        broadcast = algorithm.broadcast(state.server)
        context = round_context(cohort, round_key) if pipeline.transform.uses_context else None
        acc, stats, new_states, weights, metrics = train_all(
            frozen,
            broadcast,
            state.pipeline,
            state.clients,
            data,
            cohort,
            round_key,
            hparams,
            context,
        )
        if writes_back:
            clients = new_states
        else:
            # The cohort's rows: the new state where the upload was delivered, else the old.
            keep = jnp.logical_and(cohort.delivered, cohort.participating)
            clients = jax.tree.map(
                lambda new, old: jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                new_states,
                state.clients,
            )
        like = upload_shape(
            algorithm,
            pipeline,
            state.server,
            jax.tree.map(lambda s: s[0], state.clients.algorithm),
            hparams,
        )
        like = aggregate_shape(algorithm, state.server, like)
        return finish_round(
            algorithm,
            pipeline,
            num_clients_total,
            state,
            cohort,
            acc,
            stats,
            clients,
            weights,
            metrics,
            round_key,
            hparams,
            like,
            frozen=frozen,
            server_data=server_data,
        )

    return round_fn


def commit_client_states(
    store: ClientStates,
    client_ids: jax.Array,
    participating: jax.Array,
    delivered: jax.Array,
    new_states: ClientStates,
    num_clients_total: int,
) -> ClientStates:
    """Writes the new states of the clients whose upload was delivered into the store.

    Padding slots and lost uploads write nowhere (their rows keep their state).

    Args:
      store: the population's `ClientStates` ``[N, ...]``.
      client_ids: ``[S]`` the slots' client ids.
      participating: ``[S]`` which slots hold a sampled client.
      delivered: ``[S]`` which slots' uploads arrived.
      new_states: the slots' new `ClientStates` ``[S, ...]``.
      num_clients_total: ``N`` (an out-of-range row that the write drops).

    Returns:
      The updated store.
    """
    written = jnp.logical_and(delivered, participating)
    target = jnp.where(written, client_ids, num_clients_total)
    return jax.tree.map(lambda s, new: s.at[target].set(new, mode="drop"), store, new_states)


def finish_round(
    algorithm: Algorithm,
    pipeline: AggregationPipeline,
    num_clients_total: int,
    state: RoundState,
    cohort: Cohort,
    accumulated: PyTree,
    stats: dict,
    clients: ClientStates,
    weights: jax.Array,
    metrics: dict,
    round_key: jax.Array,
    hparams: HyperParams,
    upload_like: PyTree,
    frozen: PyTree = None,
    server_data: PyTree = None,
) -> tuple[RoundState, RoundOutput]:
    """The tail of a round: aggregate, transform and server updates.

    Args:
      algorithm: the algorithm.
      pipeline: the aggregation pipeline.
      num_clients_total: population size.
      state: the state before the round.
      cohort: the round's `Cohort` ``[C]``.
      accumulated: the streaming aggregator's summed accumulator, or a `Gathered`.
      stats: the upload transforms' stats summed over delivered clients.
      clients: the client states after the round (`commit_client_states` done).
      weights: ``[C]`` aggregation weights.
      metrics: per-slot metric sums ``{name: [C]}``.
      round_key: the round's key (the server side derives its keys from it, see `round_keys`).
      hparams: the round's `HyperParams`.
      upload_like: shapes and dtypes of one `ClientOutput` (the aggregate is cast to them).
      frozen: the round's frozen base (`RoundInfo.frozen`).
      server_data: the round's server examples (`RoundInfo.server_data`), None without any.

    Returns:
      The new `RoundState` and the `RoundOutput`.
    """
    aggregator_key, transform_key, update_key = round_keys(round_key)
    extra = (
        {"context": round_context(cohort, round_key)} if pipeline.aggregator.uses_context else {}
    )
    aggregate, aggregator_state, aggregator_metrics = pipeline.aggregator.finalize(
        state.pipeline.aggregator, accumulated, aggregator_key, hparams, **extra
    )
    aggregate = jax.tree.map(lambda a, x: a.astype(x.dtype), aggregate, upload_like)
    transform_state = pipeline.transform.update(
        state.pipeline.transform, stats, transform_key, hparams
    )
    info = RoundInfo(jnp.sum(weights > 0), num_clients_total, hparams, frozen, server_data)
    if algorithm.server_metrics is not None:
        aggregator_metrics = {
            **aggregator_metrics,
            **algorithm.server_metrics(state.server, aggregate, info),
        }
    server = algorithm.server_update(state.server, aggregate, info, update_key)
    if not pipeline.aggregator.updates_when_empty:
        # No upload arrived: the server state stays exactly as it was.
        server = _tree_where(info.num_participants > 0, server, state.server)
    totals = jax.tree.map(jnp.sum, metrics)
    output = RoundOutput(
        train_loss=totals[LOSS_SUM] / jnp.maximum(totals[LOSS_WEIGHT], 1.0),
        client_loss=metrics[LOSS_SUM] / jnp.maximum(metrics[LOSS_WEIGHT], 1.0),
        weights=weights,
        participating=jnp.asarray(cohort.participating),
        metrics=totals,
        pipeline={**stats, **aggregator_metrics},
        params_finite=_all_finite(algorithm.server_params(server)),
    )
    return RoundState(server, PipelineState(transform_state, aggregator_state), clients), output


def _all_finite(tree: PyTree) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def make_sequential_round(
    algorithm: Algorithm,
    objective: Objective,
    schedule: LocalSchedule,
    *,
    num_clients_total: int,
    pipeline: AggregationPipeline | None = None,
    uniform_weighting: bool = False,
) -> Callable:
    """The reference round: one jitted client update per sampled client in a Python loop.

    Computes what `make_round_fn` computes, with the same client update, pipeline and tail
    (`finish_round`), but one client at a time; results agree up to the order of floating-point
    additions. It is how any run can be checked against the compiled round
    (``run.engine: sequential``), and the baseline the benchmark compares with.

    Returns:
      ``round_fn(frozen, state, data, cohort, round_key, hparams, server_data=None) -> (state,
      RoundOutput)`` (not jittable as a whole: it is the loop). The output covers the
      participating slots only, in cohort order.
    """
    pipeline = pipeline or default_pipeline()
    aggregator = pipeline.aggregator
    client_update = make_client_update(algorithm, objective, schedule, pipeline, uniform_weighting)
    broadcast_fn = jax.jit(algorithm.broadcast)

    def _upload_like(state, hparams):
        one = jax.tree.map(lambda s: s[0], state.clients.algorithm)
        like = upload_shape(algorithm, pipeline, state.server, one, hparams)
        return aggregate_shape(algorithm, state.server, like)

    @jax.jit
    def start(state, hparams):
        return aggregator.start(state.pipeline.aggregator, _upload_like(state, hparams))

    @jax.jit
    def one_client(
        frozen, broadcast, state, data, client_id, delivered, round_key, hparams, acc, context
    ):
        # One dispatch per client: gather its state, train it, add its upload to the sums.
        client_state = jax.tree.map(lambda s: s[client_id], state.clients)
        result = client_update(
            frozen,
            broadcast,
            state.pipeline.transform,
            client_state,
            data,
            client_id,
            jnp.float32(1.0),
            delivered,
            round_key,
            hparams,
            context,
        )
        if not aggregator.gathers:
            one = jax.tree.map(lambda x: x[None], (result.upload, result.weight))
            acc = aggregator.accumulate(acc, *one, state.pipeline.aggregator, hparams)
        return acc, result

    @jax.jit
    def finish(
        state,
        cohort,
        accumulated,
        stats,
        new_states,
        weights,
        metrics,
        key,
        hparams,
        frozen,
        server_data,
    ):
        clients = commit_client_states(
            state.clients,
            cohort.client_ids,
            cohort.participating,
            cohort.delivered,
            new_states,
            num_clients_total,
        )
        return finish_round(
            algorithm,
            pipeline,
            num_clients_total,
            state,
            cohort,
            accumulated,
            stats,
            clients,
            weights,
            metrics,
            key,
            hparams,
            _upload_like(state, hparams),
            frozen=frozen,
            server_data=server_data,
        )

    def round_fn(frozen, state, data, cohort, round_key, hparams, server_data=None):
        frozen = _frozen_of(algorithm, frozen, state.server)
        hparams = with_overrides(pipeline.transform, state.pipeline.transform, hparams)
        broadcast = broadcast_fn(state.server)
        keep = np.flatnonzero(np.asarray(cohort.participating))
        ids = np.asarray(cohort.client_ids)[keep]
        delivered = np.asarray(cohort.delivered)[keep]
        sub = Cohort(jnp.asarray(ids), jnp.ones(len(ids), bool), jnp.asarray(delivered))
        # The context of the participating clients only: the same cohort as the compiled round.
        context = round_context(sub, round_key) if pipeline.transform.uses_context else None
        acc = () if aggregator.gathers else start(state, hparams)
        results = []
        for cid, ok in zip(ids, delivered, strict=True):
            acc, result = one_client(
                frozen,
                broadcast,
                state,
                data,
                np.int32(cid),
                np.float32(ok),
                round_key,
                hparams,
                acc,
                context,
            )
            results.append(result)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
        if aggregator.gathers:
            acc = Gathered(stacked.upload, stacked.weight, jnp.asarray(ids, jnp.int32))
        stats = jax.tree.map(jnp.sum, stacked.stats)
        return finish(
            state,
            sub,
            acc,
            stats,
            stacked.state,
            stacked.weight,
            stacked.metrics,
            round_key,
            hparams,
            frozen,
            server_data,
        )

    return round_fn


def round_hparams(
    client_lr: float, server_lr: float = 1.0, values: dict | None = None
) -> HyperParams:
    """Packs round-varying values as float32 arrays (no recompilation when they change)."""
    return HyperParams(
        client_lr=jnp.asarray(client_lr, jnp.float32),
        server_lr=jnp.asarray(server_lr, jnp.float32),
        values={k: jnp.asarray(v, jnp.float32) for k, v in (values or {}).items()},
    )


def check_data(objective: Objective, data: ClientData) -> None:
    """Checks before compiling that the client data hold every field the objective reads.

    Raises:
      ValueError: naming the missing fields.
    """
    check_fields(objective, data.examples, "the client data")
