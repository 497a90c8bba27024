"""fedjax_llm: a JAX simulator of federated training for large language models.

Many clients' LoRA, soft-prompt, prefix or full-parameter updates run in parallel on one
accelerator with `jax.vmap`; each whole round (local steps, aggregation, server optimizer) is
one compiled XLA program.
"""

from fedjax_llm.algorithms import (
    ALGORITHMS,
    Algorithm,
    Broadcast,
    ClientOutput,
    ClientTrainState,
    HyperParams,
    RoundInfo,
    ServerState,
    build_algorithm,
    init_client_optimizer,
    make_fedavg,
    make_fedprox,
    make_scaffold,
    register_algorithm,
    server_optimizer_update,
    sgd_step,
)
from fedjax_llm.config import ConfigError, ExperimentConfig, dump_config, load_config
from fedjax_llm.round import make_client_update, make_round_fn
from fedjax_llm.simulation import DivergenceError, RunDirectoryError, Simulation, simulate

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Broadcast",
    "ClientOutput",
    "ClientTrainState",
    "ConfigError",
    "DivergenceError",
    "ExperimentConfig",
    "HyperParams",
    "RoundInfo",
    "RunDirectoryError",
    "ServerState",
    "Simulation",
    "build_algorithm",
    "dump_config",
    "init_client_optimizer",
    "load_config",
    "make_client_update",
    "make_fedavg",
    "make_fedprox",
    "make_round_fn",
    "make_scaffold",
    "register_algorithm",
    "server_optimizer_update",
    "sgd_step",
    "simulate",
]
