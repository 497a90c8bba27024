"""Client and server optax optimizers and the per-round client learning-rate schedule."""

from __future__ import annotations

import math

import optax

from fedjax_llm.config import ClientConfig, ConfigError, ServerConfig


def make_client_optimizer(config: ClientConfig) -> optax.GradientTransformation:
    """Builds the client optimizer with an injectable learning rate.

    The learning rate is a hyperparameter in the optimizer state (`optax.inject_hyperparams`),
    set each round from `client_learning_rate`, so a schedule across rounds never recompiles.

    Args:
      config: the client config.

    Returns:
      ``sgd``, ``momentum`` (heavy ball) or ``adamw``, after optional gradient clipping.

    Raises:
      ConfigError: for an unknown optimizer or a non-positive clip norm.
    """
    if config.optimizer not in ("sgd", "momentum", "adamw"):
        raise ConfigError(
            f"client.optimizer={config.optimizer!r}; valid choices: sgd, momentum, adamw."
        )
    if config.grad_clip_norm is not None and config.grad_clip_norm <= 0:
        raise ConfigError(f"client.grad_clip_norm={config.grad_clip_norm} must be > 0 or null.")

    def factory(learning_rate):
        if config.optimizer == "sgd":
            opt = optax.sgd(learning_rate)
        elif config.optimizer == "momentum":
            opt = optax.sgd(learning_rate, momentum=config.momentum)
        else:
            opt = optax.adamw(learning_rate, b1=config.momentum, weight_decay=config.weight_decay)
        if config.grad_clip_norm is not None:
            opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
        return opt

    return optax.inject_hyperparams(factory)(learning_rate=config.lr)


def client_learning_rate(config: ClientConfig, round_num: int, num_rounds: int) -> float:
    """Returns the client learning rate of a round under ``config.schedule``.

    The schedule runs over rounds (the unit FL papers decay over): ``constant``; ``cosine``
    and ``linear`` decay to 0 at the last round; ``warmup_cosine`` warms up linearly over
    ``warmup_steps`` rounds first.

    Args:
      config: the client config.
      round_num: zero-based round index.
      num_rounds: total rounds of the run.

    Returns:
      The learning rate, a Python float.
    """
    progress = round_num / max(num_rounds, 1)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    if config.schedule == "warmup_cosine":
        warmup = config.warmup_steps
        if round_num < warmup:
            return config.lr * (round_num + 1) / warmup
        rest = (round_num - warmup) / max(num_rounds - warmup, 1)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * rest))
    raise ConfigError(
        f"client.schedule={config.schedule!r}; valid: constant, cosine, linear, warmup_cosine."
    )


def make_server_optimizer(config: ServerConfig, name: str) -> optax.GradientTransformation:
    """Builds the server optimizer applied to the pseudo-gradient ``-mean(delta)``.

    Args:
      config: the server config (``eps`` is the adaptivity tau of Reddi et al. 2021).
      name: ``sgd``, ``momentum``, ``adam``, ``yogi`` or ``adagrad``.

    Returns:
      The optax transformation.
    """
    if name == "sgd":
        return optax.sgd(config.lr)
    if name == "momentum":
        return optax.sgd(config.lr, momentum=config.momentum)
    if name == "adam":
        return optax.adam(config.lr, b1=config.momentum, b2=config.b2, eps=config.eps)
    if name == "yogi":
        return optax.yogi(config.lr, b1=config.momentum, b2=config.b2, eps=config.eps)
    if name == "adagrad":
        return optax.adagrad(config.lr, initial_accumulator_value=0.0, eps=config.eps)
    raise ConfigError(
        f"server.optimizer={name!r}; valid choices: sgd, momentum, adam, yogi, adagrad."
    )
