"""The interface every federated algorithm implements: pure functions over pytrees.

An algorithm is a factory (``make_fedavg(...)``) returning an `Algorithm`. The simulator calls
its functions inside one compiled round: ``client_init`` / ``client_step`` (scanned over local
steps) / ``client_final`` under ``jax.vmap`` over clients, then the aggregation pipeline
(`fedjax_llm.pipeline`), then ``server_update`` on the aggregate of the clients' `ClientOutput`
(their weighted mean by default). Nothing here runs Python per client or per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kernels.pytree import PyTree

LossFn = Callable[[PyTree, dict, jax.Array], tuple[jax.Array, dict]]
"""``loss_fn(params, batch, key) -> (loss, metrics)``: the mean loss of one local batch."""


class ClientTrainState(NamedTuple):
    """A client's local training state within one round.

    Attributes:
      params: the client's current trainable parameters.
      opt_state: the client optimizer state (fresh every round).
      steps: number of local steps actually taken (masked steps do not count).
    """

    params: PyTree
    opt_state: PyTree
    steps: jax.Array


class ClientOutput(NamedTuple):
    """What a client uploads; the simulator averages it over clients with their weights.

    Attributes:
      delta: ``client_params - global_params``.
      extra: any other per-client pytree the server averages (SCAFFOLD's control delta),
        ``()`` if none.
    """

    delta: PyTree
    extra: PyTree = ()


class HyperParams(NamedTuple):
    """Round-varying values, passed as arrays so changing them never recompiles.

    Attributes:
      client_lr: the client learning rate for this round.
      server_lr: the server learning rate for this round (set into server optimizers built
        with `optax.inject_hyperparams`, as `fedjax_llm.optimizers` builds them).
      values: every other round-varying scalar, by the name the algorithm, upload transforms
        and aggregator declare in their ``hyperparams`` (``prox_mu``, ``clip_norm``, ...).
    """

    client_lr: jax.Array
    server_lr: jax.Array = 1.0
    values: dict = {}  # noqa: RUF012 - a pytree field; never mutated


class RoundInfo(NamedTuple):
    """Facts about the round that a server update may use.

    Attributes:
      num_participants: number of clients with non-zero weight this round (array).
      num_clients_total: size of the client population (static).
      hparams: the round's `HyperParams`.
      frozen: the frozen base the clients trained against this round (an input of the
        compiled round, never a constant of it), for server updates that run the model
        (`fedjax_llm.public_training`); None where the caller has none.
      server_data: examples the server trains on (a dict of per-example arrays, an input of
        the compiled round: ``round_fn(..., server_data)``); None without any.
    """

    num_participants: jax.Array
    num_clients_total: int
    hparams: HyperParams | None = None
    frozen: PyTree = None
    server_data: PyTree = None


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions.

    Attributes:
      server_init: ``(params) -> server_state``.
      server_params: ``(server_state) -> params``: the current global trainable parameters.
      broadcast: ``(server_state) -> broadcast``: what the server sends to every client; its
        first field must be the global params as ``broadcast.params``.
      client_state_init: ``(params) -> client_state``: one client's persistent state before it
        is ever sampled (``()`` for stateless algorithms); the simulator keeps one per client.
      client_init: ``(broadcast, client_state, hparams) -> ClientTrainState``.
      client_step: ``(broadcast, client_state, train_state, batch, key, loss_fn, hparams)
        -> (train_state, metrics)``: one local step.
      client_final: ``(broadcast, train_state, client_state, hparams)
        -> (ClientOutput, new_client_state)``.
      server_update: ``(server_state, aggregate, round_info, key) -> server_state`` where
        ``aggregate`` is the aggregated `ClientOutput` (the weighted mean by default) and
        ``key`` a fresh key of the round.
      hyperparams: round-varying scalars the algorithm reads from ``hparams.values``
        (``{"prox_mu": 0.01}`` for FedProx), with their defaults.
      server_frozen: for algorithms whose server state holds the frozen base (merging adapters
        into it, or training it on public data): ``(server_state) -> frozen``. The simulator then
        calls ``server_init(params, frozen)``, takes the base from the server state every round
        and checkpoints it with it. None (the default): the base stays fixed and is not stored.
      expand_upload: ``(broadcast, upload) -> upload``: what the server computes from one
        delivered message before aggregating it (FlexLoRA's full-size product from the
        client's factors), applied after the upload transforms; the message (``client_final``'s
        output) is what the client sends and what ``bytes_up`` counts. None: aggregate the
        message as it is.
      server_metrics: ``(server_state, aggregate, round_info) -> {name: scalar}``: metrics of
        the server step (reported with the round's pipeline metrics), computed from the state
        before the update and the aggregate; None: none.
      personal_params: for algorithms that keep a personal model per client (Ditto) or a
        personal part of it (FedPer, FedSA-LoRA): ``(global_params, one_client_state) ->
        params``, the client's own params from the global params and its state in the client
        store (no client axis). The personalized evaluation evaluates each client with it on
        its own held-out data. None (the default): the algorithm is not personalized.
      params_delta: ``(params, upload) -> params-shaped change``: the change of the global
        params (``params``, the current ones) that one upload as the server aggregates it
        (after ``expand_upload``) stands for, before the server optimizer, for algorithms whose
        upload is not such a ``delta`` (a personal part left out, FFA-LoRA's ``b`` alone,
        HetLoRA's norm-weighted change). Client contribution scores step the global params by
        the weighted mean of these. None (the default): the upload's ``delta``.
    """

    server_init: Callable
    server_params: Callable
    broadcast: Callable
    client_state_init: Callable
    client_init: Callable
    client_step: Callable
    client_final: Callable
    server_update: Callable
    hyperparams: Mapping[str, float] = MappingProxyType({})
    server_frozen: Callable | None = None
    server_metrics: Callable | None = None
    expand_upload: Callable | None = None
    personal_params: Callable | None = None
    params_delta: Callable | None = None


class Broadcast(NamedTuple):
    """The default broadcast: just the global params."""

    params: PyTree


class ServerState(NamedTuple):
    """Server state of the FedOpt family.

    Attributes:
      params: global trainable parameters.
      opt_state: server optimizer state.
    """

    params: PyTree
    opt_state: PyTree


def init_client_optimizer(
    optimizer: optax.GradientTransformation, params: PyTree, learning_rate: jax.Array
) -> PyTree:
    """Initializes a client optimizer, setting this round's learning rate.

    Client optimizers are built with `optax.inject_hyperparams`, so the learning rate lives in
    the state and a per-round schedule is an array argument rather than a recompile.

    Args:
      optimizer: the client optimizer.
      params: the parameters it will update.
      learning_rate: this round's learning rate.

    Returns:
      The optimizer state.
    """
    opt_state = optimizer.init(params)
    hyperparams = getattr(opt_state, "hyperparams", None)
    if hyperparams is not None and "learning_rate" in hyperparams:
        hyperparams["learning_rate"] = jnp.asarray(
            learning_rate, hyperparams["learning_rate"].dtype
        )
    return opt_state


def sgd_step(
    optimizer: optax.GradientTransformation,
    state: ClientTrainState,
    grads: PyTree,
) -> ClientTrainState:
    """Applies one client-optimizer update to a train state."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return ClientTrainState(optax.apply_updates(state.params, updates), opt_state, state.steps + 1)


def set_learning_rate(opt_state: PyTree, learning_rate: jax.Array | None) -> PyTree:
    """Sets the learning rate of an `optax.inject_hyperparams` state (others are unchanged)."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    if learning_rate is None or hyperparams is None or "learning_rate" not in hyperparams:
        return opt_state
    dtype = hyperparams["learning_rate"].dtype
    new = dict(hyperparams, learning_rate=jnp.asarray(learning_rate, dtype))
    return opt_state._replace(hyperparams=new)


def server_optimizer_update(
    optimizer: optax.GradientTransformation,
    state: ServerState,
    mean_delta: PyTree,
    learning_rate: jax.Array | None = None,
) -> ServerState:
    """Applies the server optimizer to the pseudo-gradient ``-mean(delta)``.

    With ``optax.sgd(1.0)`` this is FedAvg; momentum gives FedAvgM, adam/yogi/adagrad give
    FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization").

    Args:
      optimizer: the server optimizer.
      state: params and optimizer state.
      mean_delta: the aggregated client delta.
      learning_rate: this round's server learning rate, set into the state of an optimizer
        built with `optax.inject_hyperparams` (ignored for others, which keep their own).

    Returns:
      The new `ServerState`.
    """
    pseudo_grad = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, state.params)
    opt_state = set_learning_rate(state.opt_state, learning_rate)
    updates, opt_state = optimizer.update(pseudo_grad, opt_state, state.params)
    return ServerState(optax.apply_updates(state.params, updates), opt_state)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Returns ``a - b`` leafwise."""
    return jax.tree.map(jnp.subtract, a, b)


def inner_state_hooks(algorithm: Algorithm) -> tuple[Callable | None, Callable | None]:
    """``server_frozen`` and ``server_metrics`` of an algorithm wrapped by one whose server
    state holds the wrapped algorithm's as ``state.inner`` (downlink compression, public
    training): the inner hooks read through ``.inner``; None where the inner one is None.

    Returns:
      ``(server_frozen, server_metrics)`` for the wrapper's `Algorithm`.
    """
    server_frozen = server_metrics = None
    if algorithm.server_frozen is not None:
        inner_frozen = algorithm.server_frozen

        def server_frozen(state):
            return inner_frozen(state.inner)

    if algorithm.server_metrics is not None:
        inner_metrics = algorithm.server_metrics

        def server_metrics(state, aggregate, info):
            return inner_metrics(state.inner, aggregate, info)

    return server_frozen, server_metrics
