"""DiLoCo: distributed low-communication training (Douillard et al. 2023).

Each client (a DiLoCo worker) takes many inner AdamW steps from the global params; the server
treats ``-mean(delta)`` as an outer gradient and applies Nesterov momentum to it (outer lr 0.7,
momentum 0.9 in the paper). That is FedAvg's code path with the ``nesterov`` server optimizer,
optionally (``keep_inner_state``) with the one thing FedAvg does not do: a worker keeps its inner
optimizer's state (AdamW's moments and step count) across rounds instead of starting it afresh,
held per client in the client store.

References:
  Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models".
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import Algorithm, ClientTrainState, set_learning_rate
from fedjax_llm.algorithms.fedavg import make_fedavg


def make_diloco(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    keep_inner_state: bool = False,
) -> Algorithm:
    """Builds DiLoCo.

    Args:
      client_optimizer: the inner optimizer (AdamW in the paper), built with
        `optax.inject_hyperparams` so the round's learning rate can be set.
      server_optimizer: the outer optimizer (Nesterov momentum in the paper) on the
        pseudo-gradient ``-mean(delta)``.
      keep_inner_state: keep each client's inner optimizer state between the rounds it takes
        part in (the paper's workers); False (the default) starts it afresh each round, which
        trained better in our comparison (see `fedjax_llm.config.DiLoCoConfig`).

    Returns:
      The `Algorithm`; with ``keep_inner_state`` its per-client state is the inner optimizer
      state (the round's learning rate is written into it at the start of each round).
    """
    fedavg = make_fedavg(client_optimizer, server_optimizer)
    if not keep_inner_state:
        return fedavg

    def client_init(broadcast, client_state, hparams):
        opt_state = set_learning_rate(client_state, hparams.client_lr)
        return ClientTrainState(broadcast.params, opt_state, jnp.zeros((), "int32"))

    def client_final(broadcast, state, client_state, hparams):
        output, _ = fedavg.client_final(broadcast, state, client_state, hparams)
        return output, state.opt_state

    return fedavg._replace(
        client_state_init=client_optimizer.init,
        client_init=client_init,
        client_final=client_final,
    )
