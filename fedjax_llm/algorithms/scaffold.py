"""SCAFFOLD: control variates correct client drift under heterogeneous data.

References:
  Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning" (we use the paper's option II control update).

Two choices to know:

- Option II estimates each client's mean corrected gradient from its model change,
  ``(x - y_i) / (K_i * lr)``, which holds only for plain SGD local steps. The client optimizer
  must therefore be plain SGD (``client.optimizer: sgd``, no momentum, weight decay or gradient
  clipping); `fedjax_llm.build_algorithm` refuses any other, since the control variates would
  silently be wrong.
- The control deltas are aggregated with the same weights as the model deltas. The paper
  averages both uniformly over the sampled clients: ``algorithm.weighting: uniform`` is the
  paper exactly; the default ``num_examples`` weights both by client size (FedAvg's weighting),
  which keeps ``c`` the size-weighted mean of the ``c_i`` that the weighted model update uses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import (
    Algorithm,
    ClientOutput,
    ServerState,
    server_optimizer_update,
    sgd_step,
    tree_sub,
)
from fedjax_llm.algorithms.fedavg import make_fedavg
from kernels.pytree import PyTree


class ScaffoldServerState(NamedTuple):
    """Global params, server optimizer state and the server control variate ``c``."""

    params: PyTree
    opt_state: PyTree
    control: PyTree


class ScaffoldBroadcast(NamedTuple):
    """What SCAFFOLD sends each client: the global params and ``c``."""

    params: PyTree
    control: PyTree


def make_scaffold(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Algorithm:
    """Builds SCAFFOLD with per-client control variates kept in the simulator's state store.

    Each local gradient is corrected by ``c - c_i``. After K_i local steps at learning rate lr,
    client i sets ``c_i+ = c_i - c + (x - y_i) / (K_i * lr)`` (option II) and uploads
    ``delta = y_i - x`` and ``c_i+ - c_i``; the server moves ``c`` by
    ``(participants / N) * mean(c_i+ - c_i)``. With zero controls and one round it is FedAvg.

    Args:
      client_optimizer: local optimizer: plain SGD whose learning rate is the round's client
        learning rate (see the module docstring; option II is wrong for any other).
      server_optimizer: server optimizer on the pseudo-gradient (sgd(1.0) is the paper's
        global step size 1).

    Returns:
      The `Algorithm`; its client state is ``c_i`` (params-shaped, zeros at start).
    """
    fedavg = make_fedavg(client_optimizer, server_optimizer)

    def server_init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaffoldServerState(params, server_optimizer.init(params), zeros)

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        del hparams
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        grads = jax.tree.map(
            lambda g, c, ci: g + (c - ci).astype(g.dtype), grads, broadcast.control, client_state
        )
        return sgd_step(client_optimizer, state, grads), metrics

    def client_final(broadcast, state, client_state, hparams):
        steps = jnp.maximum(state.steps, 1).astype(jnp.float32)
        inv = 1.0 / (steps * hparams.client_lr)
        new_control = jax.tree.map(
            lambda ci, c, x, y: ci - c + (x - y) * inv,
            client_state,
            broadcast.control,
            broadcast.params,
            state.params,
        )
        # A client that took no step keeps its control unchanged.
        new_control = jax.tree.map(
            lambda new, old: jnp.where(state.steps > 0, new, old), new_control, client_state
        )
        output = ClientOutput(
            tree_sub(state.params, broadcast.params), tree_sub(new_control, client_state)
        )
        return output, new_control

    def server_update(server_state, mean_output, round_info, key):
        del key
        updated = server_optimizer_update(
            server_optimizer,
            ServerState(server_state.params, server_state.opt_state),
            mean_output.delta,
            None if round_info.hparams is None else round_info.hparams.server_lr,
        )
        fraction = round_info.num_participants.astype(jnp.float32) / round_info.num_clients_total
        control = jax.tree.map(
            lambda c, dc: c + fraction * dc, server_state.control, mean_output.extra
        )
        return ScaffoldServerState(updated.params, updated.opt_state, control)

    return Algorithm(
        server_init=server_init,
        server_params=lambda s: s.params,
        broadcast=lambda s: ScaffoldBroadcast(s.params, s.control),
        client_state_init=lambda params: jax.tree.map(jnp.zeros_like, params),
        client_init=fedavg.client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
    )
