"""Ditto: a personal model per client, regularized toward the global model.

Each client i keeps a personal model ``v_i`` in its state in the simulator's client store. In
every local step it trains its copy of the global model as FedAvg does and takes one step on
``v_i`` on the same batch, on the objective ``F_i(v) + lambda/2 ||v - w||^2`` where ``w`` is the
global model the round broadcast. Only the global copy's delta is uploaded; ``v_i`` is stored
(committed, like every client state, only when the client's upload is delivered). The server is
FedAvg's (any server optimizer).

``v_i`` starts at the global init: the client store is initialized from the initial params, so a
client first sampled at round t starts from ``w^0`` as in the paper's Algorithm 1 (its inputs
are ``w^0`` and ``v_k^0``) and reference code; the lambda term pulls it toward the current global
model. A client never sampled yet is evaluated with ``w^0`` by the personalized evaluation.

References:
  Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import (
    Algorithm,
    ClientOutput,
    ClientTrainState,
    init_client_optimizer,
    sgd_step,
    tree_sub,
)
from fedjax_llm.algorithms.fedavg import make_fedavg
from kernels.pytree import PyTree

DITTO_LAMBDA = "ditto_lambda"
"""The round hyperparameter of Ditto's regularization strength lambda."""


class DittoTrainState(NamedTuple):
    """A Ditto client's local state within one round.

    Attributes:
      params: the client's copy of the global model (trained as FedAvg trains it).
      opt_state: the client optimizer state of ``params``.
      steps: local steps taken (masked steps do not count).
      personal: the personal model ``v_i``.
      personal_opt_state: the client optimizer state of ``personal`` (fresh every round).
    """

    params: PyTree
    opt_state: PyTree
    steps: jax.Array
    personal: PyTree
    personal_opt_state: PyTree


def make_ditto(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    lam: float,
    proximal: bool = False,
) -> Algorithm:
    """Builds Ditto with per-client personal models kept in the client store.

    The personal step is the paper's ``v <- v - lr (grad F_i(v) + lambda (v - w))`` with the
    client optimizer (plain SGD is the paper; any optax optimizer gets the regularized
    gradient). An explicit step on the regularizer diverges once ``lr * lambda >= 2``;
    ``proximal=True`` instead takes the optimizer's step on ``grad F_i(v)`` alone, then the
    regularizer's exact proximal step ``v <- (v + c w) / (1 + c)``, ``c = lr * lambda``
    (forward-backward splitting: the same fixed points, stable for every lambda, ``v -> w`` as
    lambda grows). ``lr`` is the round's client learning rate.

    Args:
      client_optimizer: local optimizer of both the global copy and the personal model.
      server_optimizer: server optimizer on the pseudo-gradient.
      lam: default regularization strength lambda (>= 0), the round hyperparameter
        ``ditto_lambda`` (``hparams.values``), so a schedule never recompiles. 0 trains each
        personal model on its client's data alone.
      proximal: take the regularizer's step as a proximal step (see above).

    Returns:
      The `Algorithm`; its client state is ``v_i`` (params-shaped) and ``personal_params``
      returns it.

    Raises:
      ValueError: for ``lam < 0``.

    References:
      Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization",
      Algorithm 1.
    """
    if lam < 0:
        raise ValueError(f"Ditto lambda={lam} must be >= 0.")
    fedavg = make_fedavg(client_optimizer, server_optimizer)

    def client_init(broadcast, client_state, hparams):
        state = fedavg.client_init(broadcast, (), hparams)
        personal_opt = init_client_optimizer(client_optimizer, client_state, hparams.client_lr)
        return DittoTrainState(
            state.params, state.opt_state, state.steps, client_state, personal_opt
        )

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        del client_state
        lam = hparams.values[DITTO_LAMBDA]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, key)
        shared = sgd_step(
            client_optimizer, ClientTrainState(state.params, state.opt_state, state.steps), grads
        )
        (_, _), personal_grads = grad_fn(state.personal, batch, key)
        if not proximal:
            personal_grads = jax.tree.map(
                lambda g, v, w: g + (lam * (v - w)).astype(g.dtype),
                personal_grads,
                state.personal,
                broadcast.params,
            )
        updates, personal_opt = client_optimizer.update(
            personal_grads, state.personal_opt_state, state.personal
        )
        personal = optax.apply_updates(state.personal, updates)
        if proximal:
            c = hparams.client_lr * lam
            personal = jax.tree.map(
                lambda v, w: ((v + c * w) / (1.0 + c)).astype(v.dtype), personal, broadcast.params
            )
        new = DittoTrainState(shared.params, shared.opt_state, shared.steps, personal, personal_opt)
        return new, metrics

    def client_final(broadcast, state, client_state, hparams):
        del client_state, hparams
        return ClientOutput(tree_sub(state.params, broadcast.params)), state.personal

    return fedavg._replace(
        client_state_init=lambda params: jax.tree.map(jnp.asarray, params),
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        hyperparams={DITTO_LAMBDA: float(lam)},
        personal_params=lambda global_params, client_state: client_state,
    )
