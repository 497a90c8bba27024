"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad) from one code path.

References:
  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
  Data"; Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution" (FedAvgM);
  Reddi et al. 2021, "Adaptive Federated Optimization" (FedAdam, FedYogi, FedAdagrad).
"""

from __future__ import annotations

import jax
import optax

from fedjax_llm.algorithms.base import (
    Algorithm,
    Broadcast,
    ClientOutput,
    ClientTrainState,
    ServerState,
    init_client_optimizer,
    server_optimizer_update,
    sgd_step,
    tree_sub,
)


def make_fedavg(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Algorithm:
    """Builds FedAvg with any client and server optax optimizer.

    Args:
      client_optimizer: local optimizer (built with `optax.inject_hyperparams` so the round's
        learning rate can be set; any other transformation works with its own fixed rate).
      server_optimizer: applied to the pseudo-gradient ``-mean(delta)``; ``optax.sgd(1.0)`` is
        plain FedAvg.

    Returns:
      The `Algorithm`.
    """

    def server_init(params):
        return ServerState(params, server_optimizer.init(params))

    def client_init(broadcast, client_state, hparams):
        del client_state
        opt_state = init_client_optimizer(client_optimizer, broadcast.params, hparams.client_lr)
        return ClientTrainState(broadcast.params, opt_state, jax.numpy.zeros((), "int32"))

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        del broadcast, client_state, hparams
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        return sgd_step(client_optimizer, state, grads), metrics

    def client_final(broadcast, state, client_state, hparams):
        del hparams
        return ClientOutput(tree_sub(state.params, broadcast.params)), client_state

    def server_update(server_state, mean_output, round_info, key):
        del key
        lr = None if round_info.hparams is None else round_info.hparams.server_lr
        return server_optimizer_update(server_optimizer, server_state, mean_output.delta, lr)

    return Algorithm(
        server_init=server_init,
        server_params=lambda s: s.params,
        broadcast=lambda s: Broadcast(s.params),
        client_state_init=lambda params: (),
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
    )
