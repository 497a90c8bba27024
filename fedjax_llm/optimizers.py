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


def scheduled_value(
    schedule: str, peak: float, round_num: int, num_rounds: int, warmup: int, key: str
) -> float:
    """Returns a learning rate of one round under a schedule over rounds.

    The schedule runs over rounds (the unit FL papers decay over): ``constant``; ``cosine``
    and ``linear`` decay toward 0, reached at round ``num_rounds`` (one past the last, as optax's
    schedules do); ``warmup_cosine`` warms up linearly over ``warmup`` rounds first.

    Args:
      schedule: the schedule's name.
      peak: the peak value.
      round_num: zero-based round index.
      num_rounds: total rounds of the run.
      warmup: warmup rounds of ``warmup_cosine``.
      key: the config key of the schedule (for the error message).

    Returns:
      The value, a Python float.

    Raises:
      ConfigError: for an unknown schedule.
    """
    progress = round_num / max(num_rounds, 1)
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "warmup_cosine":
        if round_num < warmup:
            return peak * (round_num + 1) / warmup
        rest = (round_num - warmup) / max(num_rounds - warmup, 1)
        return peak * 0.5 * (1.0 + math.cos(math.pi * rest))
    raise ConfigError(f"{key}={schedule!r}; valid: constant, cosine, linear, warmup_cosine.")


def client_learning_rate(config: ClientConfig, round_num: int, num_rounds: int) -> float:
    """Returns the client learning rate of a round under ``client.schedule`` (over rounds)."""
    return scheduled_value(
        config.schedule, config.lr, round_num, num_rounds, config.warmup_steps, "client.schedule"
    )


def server_learning_rate(config: ServerConfig, round_num: int, num_rounds: int) -> float:
    """Returns the server learning rate of a round under ``server.schedule``."""
    return scheduled_value(
        config.schedule, config.lr, round_num, num_rounds, config.warmup_rounds, "server.schedule"
    )


def make_server_optimizer(config: ServerConfig, name: str) -> optax.GradientTransformation:
    """Builds the server optimizer applied to the pseudo-gradient ``-mean(delta)``.

    Args:
      config: the server config (``eps`` is the adaptivity tau of Reddi et al. 2021).
      name: ``sgd``, ``momentum``, ``nesterov``, ``adam``, ``yogi`` or ``adagrad``.

    Returns:
      The optax transformation, built with `optax.inject_hyperparams` so that each round's
      server learning rate (``server.schedule``) is an array in its state, never a recompile.
    """
    factories = {
        "sgd": lambda learning_rate: optax.sgd(learning_rate),
        "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=config.momentum),
        "nesterov": lambda learning_rate: optax.sgd(
            learning_rate, momentum=config.momentum, nesterov=True
        ),
        "adam": lambda learning_rate: optax.adam(
            learning_rate, b1=config.momentum, b2=config.b2, eps=config.eps
        ),
        "yogi": lambda learning_rate: optax.yogi(
            learning_rate, b1=config.momentum, b2=config.b2, eps=config.eps
        ),
        "adagrad": lambda learning_rate: optax.adagrad(
            learning_rate, initial_accumulator_value=0.0, eps=config.eps
        ),
    }
    if name not in factories:
        raise ConfigError(f"server.optimizer={name!r}; valid choices: {sorted(factories)}.")
    return optax.inject_hyperparams(factories[name])(learning_rate=config.lr)
