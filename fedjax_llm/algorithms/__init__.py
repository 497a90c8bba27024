"""Federated algorithms, each a factory of pure functions, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from fedjax_llm.algorithms.base import (
    Algorithm,
    Broadcast,
    ClientOutput,
    ClientTrainState,
    HyperParams,
    RoundInfo,
    ServerState,
    init_client_optimizer,
    server_optimizer_update,
    set_learning_rate,
    sgd_step,
)
from fedjax_llm.algorithms.diloco import make_diloco
from fedjax_llm.algorithms.ditto import make_ditto
from fedjax_llm.algorithms.fedavg import make_fedavg
from fedjax_llm.algorithms.fednova import make_fednova
from fedjax_llm.algorithms.fedprox import make_fedprox
from fedjax_llm.algorithms.hetero_lora import (
    holder_shares,
    make_ffa_lora,
    make_flexlora,
    make_flora,
    make_hetlora,
)
from fedjax_llm.algorithms.personalized import (
    make_fedper,
    make_fedsa_lora,
    make_partially_personal,
    make_personal_prompt,
)
from fedjax_llm.algorithms.scaffold import make_scaffold
from fedjax_llm.config import ConfigError, ExperimentConfig, register_algorithm_config
from fedjax_llm.optimizers import make_client_optimizer, make_server_optimizer

# name -> (builder from (client_opt, server_opt, config), the server optimizer it implies)
ALGORITHMS: dict[str, tuple[Callable[..., Algorithm], str]] = {
    "fedavg": (lambda c, s, cfg: make_fedavg(c, s), "sgd"),
    "fedavgm": (lambda c, s, cfg: make_fedavg(c, s), "momentum"),
    "fedadam": (lambda c, s, cfg: make_fedavg(c, s), "adam"),
    "fedyogi": (lambda c, s, cfg: make_fedavg(c, s), "yogi"),
    "fedadagrad": (lambda c, s, cfg: make_fedavg(c, s), "adagrad"),
    "diloco": (lambda c, s, cfg: make_diloco(c, s, cfg.algorithm.keep_inner_state), "nesterov"),
    "fedprox": (lambda c, s, cfg: make_fedprox(c, s, cfg.algorithm.mu), "sgd"),
    "scaffold": (lambda c, s, cfg: make_scaffold(c, s), "sgd"),
    "fedsa_lora": (lambda c, s, cfg: make_fedsa_lora(c, s), "sgd"),
    "personal_prompt": (lambda c, s, cfg: make_personal_prompt(c, s), "sgd"),
    "fedper": (
        lambda c, s, cfg: make_fedper(
            c,
            s,
            cfg.trainable.mode,
            cfg.algorithm.personal_layers,
            cfg.algorithm.personal_modules,
        ),
        "sgd",
    ),
    "ditto": (lambda c, s, cfg: make_ditto(c, s, cfg.algorithm.lam, cfg.algorithm.proximal), "sgd"),
    "hetlora": (
        lambda c, s, cfg: make_hetlora(
            c, s, cfg.algorithm.prune_lambda, cfg.algorithm.prune_threshold
        ),
        "sgd",
    ),
    "flexlora": (lambda c, s, cfg: make_flexlora(c, s), "sgd"),
    "flora": (
        lambda c, s, cfg: make_flora(c, cfg.trainable.lora_alpha / cfg.trainable.lora_rank),
        "sgd",
    ),
    "ffa_lora": (lambda c, s, cfg: make_ffa_lora(c, s, ffa_holder_shares(cfg)), "sgd"),
    "fednova": (
        lambda c, s, cfg: make_fednova(
            c, s, cfg.client.momentum if cfg.client.optimizer == "momentum" else 0.0
        ),
        "sgd",
    ),
}


def ffa_holder_shares(config: ExperimentConfig) -> tuple[float, ...] | None:
    """FFA-LoRA's fixed holder shares where client-level DP or secure aggregation hides who
    sent what (`make_ffa_lora`); None otherwise (the clients send their flags)."""
    if not config.uploads_hidden:
        return None
    return holder_shares(
        config.trainable.lora_rank,
        config.system.tier_lora_ranks,
        config.system.tier_fractions,
    )


def register_algorithm(
    name: str,
    builder: Callable[..., Algorithm],
    server_optimizer: str = "sgd",
    config_class: type | None = None,
) -> None:
    """Registers a custom algorithm so configs can select it by ``algorithm.type``.

    Args:
      name: the type name configs use.
      builder: ``(client_optimizer, server_optimizer, config) -> Algorithm``; its settings are
        ``config.algorithm`` (an instance of ``config_class``).
      server_optimizer: the server optimizer used when ``server.optimizer`` is null.
      config_class: a frozen dataclass subclassing `fedjax_llm.config.AlgorithmConfig` holding
        the algorithm's settings; None registers one without settings.
    """
    register_algorithm_config(name, config_class)
    ALGORITHMS[name] = (builder, server_optimizer)


def build_algorithm(config: ExperimentConfig) -> Algorithm:
    """Builds the algorithm a config names, with its client and server optimizers.

    Raises:
      ConfigError: unknown algorithm, or a server optimizer that contradicts the algorithm
        (``fedadam`` with ``server.optimizer: sgd``).
    """
    name = config.algorithm.name
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.type={name!r}; valid choices: {sorted(ALGORITHMS)}.")
    builder, implied = ALGORITHMS[name]
    server_name = config.server.optimizer or implied
    if config.server.optimizer and implied != "sgd" and config.server.optimizer != implied:
        raise ConfigError(
            f"algorithm.type={name!r} uses server optimizer {implied!r} but "
            f"server.optimizer={config.server.optimizer!r}; set server.optimizer to null or "
            f"{implied!r}, or use algorithm.type=fedavg with the server optimizer you want."
        )
    algorithm = builder(
        make_client_optimizer(config.client),
        make_server_optimizer(config.server, server_name),
        config,
    )
    if config.aggregation.downlink is not None:
        from fedjax_llm.compression import COMPRESSORS, with_downlink_compression

        compressor = COMPRESSORS[config.aggregation.downlink](config)
        algorithm = with_downlink_compression(
            algorithm, compressor, config.aggregation.error_feedback
        )
    return algorithm


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Broadcast",
    "ClientOutput",
    "ClientTrainState",
    "HyperParams",
    "RoundInfo",
    "ServerState",
    "build_algorithm",
    "init_client_optimizer",
    "make_diloco",
    "make_ditto",
    "make_fedavg",
    "make_fednova",
    "make_ffa_lora",
    "make_flexlora",
    "make_flora",
    "make_hetlora",
    "make_fedper",
    "make_fedprox",
    "make_fedsa_lora",
    "make_partially_personal",
    "make_personal_prompt",
    "make_scaffold",
    "register_algorithm",
    "server_optimizer_update",
    "set_learning_rate",
    "sgd_step",
]
