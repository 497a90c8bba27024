"""FedProx: FedAvg with a proximal term pulling local params toward the global model.

References:
  Li et al. 2020, "Federated Optimization in Heterogeneous Networks".
"""

from __future__ import annotations

import jax
import optax

from fedjax_llm.algorithms.base import Algorithm, sgd_step
from fedjax_llm.algorithms.fedavg import make_fedavg


def make_fedprox(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    mu: float,
) -> Algorithm:
    """Builds FedProx: each local gradient gets ``mu * (params - global_params)`` added.

    This is the gradient of the local objective ``F_i(w) + mu/2 ||w - w_global||^2``; with
    ``mu = 0`` it is FedAvg exactly. ``mu`` is the round-varying hyperparameter ``prox_mu``
    (``hparams.values["prox_mu"]``), so a schedule over rounds never recompiles.

    Args:
      client_optimizer: local optimizer.
      server_optimizer: server optimizer on the pseudo-gradient.
      mu: default proximal coefficient (>= 0).

    Returns:
      The `Algorithm`.
    """
    if mu < 0:
        raise ValueError(f"FedProx mu={mu} must be >= 0.")
    fedavg = make_fedavg(client_optimizer, server_optimizer)

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        del client_state
        prox_mu = hparams.values["prox_mu"]
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        grads = jax.tree.map(
            lambda g, w, w0: g + (prox_mu * (w - w0)).astype(g.dtype),
            grads,
            state.params,
            broadcast.params,
        )
        return sgd_step(client_optimizer, state, grads), metrics

    return fedavg._replace(client_step=client_step, hyperparams={"prox_mu": float(mu)})
