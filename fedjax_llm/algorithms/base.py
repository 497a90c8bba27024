"""The interface every federated algorithm implements: pure functions over pytrees.

An algorithm is a factory (``make_fedavg(...)``) returning an `Algorithm`. The simulator calls
its functions inside one compiled round: ``client_init`` / ``client_step`` (scanned over local
steps) / ``client_final`` under ``jax.vmap`` over clients, then ``server_update`` on the
weighted mean of the clients' `ClientOutput`. Nothing here runs Python per client or per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
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


class RoundInfo(NamedTuple):
    """Facts about the round that a server update may use.

    Attributes:
      num_participants: number of clients with non-zero weight this round (array).
      num_clients_total: size of the client population (static).
    """

    num_participants: jax.Array
    num_clients_total: int


class HyperParams(NamedTuple):
    """Round-varying values, passed as arrays so changing them never recompiles.

    Attributes:
      client_lr: the client learning rate for this round.
    """

    client_lr: jax.Array


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
      server_update: ``(server_state, mean_output, round_info) -> server_state`` where
        ``mean_output`` is the weighted mean `ClientOutput` over clients.
    """

    server_init: Callable
    server_params: Callable
    broadcast: Callable
    client_state_init: Callable
    client_init: Callable
    client_step: Callable
    client_final: Callable
    server_update: Callable


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


def server_optimizer_update(
    optimizer: optax.GradientTransformation, state: ServerState, mean_delta: PyTree
) -> ServerState:
    """Applies the server optimizer to the pseudo-gradient ``-mean(delta)``.

    With ``optax.sgd(1.0)`` this is FedAvg; momentum gives FedAvgM, adam/yogi/adagrad give
    FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization").
    """
    pseudo_grad = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, state.params)
    updates, opt_state = optimizer.update(pseudo_grad, state.opt_state, state.params)
    return ServerState(optax.apply_updates(state.params, updates), opt_state)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Returns ``a - b`` leafwise."""
    return jax.tree.map(jnp.subtract, a, b)
