"""FedNova: normalized averaging for clients that take different numbers of local steps.

References:
  Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
  Optimization" (NeurIPS).

When clients take different numbers of local steps (compute tiers, a round deadline that cuts
stragglers short, ``client.local_epochs``), FedAvg's weighted mean of the model changes
converges to a different objective, one that over-weights the clients that ran longer.
FedNova divides each client's change by its own effective number of steps ``a_i`` (the norm of
its gradient coefficients: ``tau_i`` for plain SGD, ``[tau_i - rho (1 - rho^tau_i) / (1 - rho)]
/ (1 - rho)`` for heavy-ball momentum rho) and rescales the weighted mean of these normalized
changes by ``tau_eff = sum_i p_i a_i``:

    delta = tau_eff * sum_i p_i delta_i / a_i

With equal steps for every client this is FedAvg's weighted mean exactly (up to rounding).
Each client uploads its normalized change and ``a_i`` (one more float); the round's weighted
mean of the uploads gives both sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import Algorithm, ClientOutput, tree_sub
from fedjax_llm.algorithms.fedavg import make_fedavg


def effective_steps(steps: jax.Array, momentum: float = 0.0) -> jax.Array:
    """FedNova's ``a_i``: the L1 norm of a client's gradient coefficients after ``steps`` steps.

    Args:
      steps: local steps taken (int or float array).
      momentum: the client optimizer's heavy-ball momentum rho (0 for plain SGD).

    Returns:
      ``steps`` for plain SGD; ``[steps - rho (1 - rho^steps) / (1 - rho)] / (1 - rho)`` with
      momentum (Wang et al. 2020, Section 4), as float32.
    """
    tau = jnp.asarray(steps, jnp.float32)
    if momentum == 0.0:
        return tau
    rho = jnp.float32(momentum)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def make_fednova(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    momentum: float = 0.0,
) -> Algorithm:
    """Builds FedNova on FedAvg's local training and any server optimizer.

    Args:
      client_optimizer: local optimizer: plain SGD or heavy-ball momentum ``momentum`` (the
        normalization is derived for these; `fedjax_llm.build_algorithm` refuses adaptive
        local optimizers).
      server_optimizer: applied to the pseudo-gradient ``-tau_eff * mean(delta_i / a_i)``.
      momentum: the client optimizer's momentum (0 for plain SGD).

    Returns:
      The `Algorithm`; its upload is ``ClientOutput(delta_i / a_i, a_i)`` and its server
      reports ``fednova/tau_eff``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"FedNova momentum={momentum} must be in [0, 1).")
    fedavg = make_fedavg(client_optimizer, server_optimizer)

    def client_final(broadcast, state, client_state, hparams):
        del hparams
        a = effective_steps(state.steps, momentum)
        inverse = 1.0 / jnp.maximum(a, 1e-12)
        delta = jax.tree.map(
            lambda d: (d * inverse).astype(d.dtype), tree_sub(state.params, broadcast.params)
        )
        return ClientOutput(delta, a), client_state

    def rescale(mean_output):
        tau_eff = mean_output.extra
        return ClientOutput(
            jax.tree.map(lambda d: (d * tau_eff).astype(d.dtype), mean_output.delta)
        )

    def server_update(server_state, mean_output, round_info, key):
        return fedavg.server_update(server_state, rescale(mean_output), round_info, key)

    def server_metrics(server_state, mean_output, round_info):
        del server_state, round_info
        return {"fednova/tau_eff": mean_output.extra}

    return fedavg._replace(
        client_final=client_final, server_update=server_update, server_metrics=server_metrics
    )
