"""Per-client system attributes: capability tiers, step budgets, step times and LoRA ranks.

Real federations mix phones and servers: clients differ in how many local steps they can run,
how long a step takes, and how large an adapter they can hold. The simulator describes this as
a *client profile*: a dict ``{name: [num_clients] float32}`` that travels with the client data
(`fedjax_llm.round.ClientData.client_profile`). Inside the round, each client's row is merged
into its ``hparams.values`` (`with_client_values`), so every piece (algorithm, upload
transform) reads its own value by name, the same way it reads a round hyperparameter. The
attributes are arrays, never Python constants, and padding plus masks carry their effect, so
changing tiers or the deadline never recompiles the round.

Names the round understands:

- `MAX_LOCAL_STEPS`: the client's compute tier: it takes at most this many local steps.
- `STEP_TIME` with the round value `DEADLINE`: a local step takes the client this many
  seconds, and the round's deadline cuts its work at ``floor(deadline / step_time)`` steps
  (the straggler's objective inconsistency that FedNova corrects, Wang et al. 2020).
- `LORA_RANK`: the LoRA rank the client can hold (heterogeneous-rank LoRA algorithms,
  `fedjax_llm.algorithms.hetero_lora`).

Clients are assigned to tiers once per run by a seeded permutation (`assign_tiers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.algorithms.base import HyperParams

MAX_LOCAL_STEPS = "client/max_local_steps"
"""Profile name: the most local steps the client takes in a round (its compute tier)."""
STEP_TIME = "client/step_time_s"
"""Profile name: seconds one local step takes the client (with the round's `DEADLINE`)."""
LORA_RANK = "client/lora_rank"
"""Profile name: the LoRA rank the client trains (at most ``trainable.lora_rank``)."""
DEADLINE = "deadline_s"
"""Round value: the round's deadline in seconds; clients stop at ``floor(deadline / step_time)``
steps. A round hyperparameter, so a schedule can move it without recompiling."""
CLIENT_VALUE_PREFIX = "client/"
"""Every profile name starts with it, so profile names never clash with round hyperparameters."""


def with_client_values(hparams: HyperParams, profile: Mapping[str, jax.Array]) -> HyperParams:
    """The round's `HyperParams` with one client's profile row merged into ``values``.

    Args:
      hparams: the round's hyperparameters.
      profile: ``{name: scalar}``, the client's row of the profile (names start with
        `CLIENT_VALUE_PREFIX`).

    Returns:
      ``hparams`` with the client's values added (unchanged for an empty profile).
    """
    if not profile:
        return hparams
    values = dict(hparams.values)
    values.update({name: jnp.asarray(value, jnp.float32) for name, value in profile.items()})
    return hparams._replace(values=values)


def local_step_limit(values: Mapping[str, jax.Array]) -> jax.Array | None:
    """The number of local steps a client may take this round, or None for no limit.

    Args:
      values: the client's round values (`with_client_values`).

    Returns:
      ``min(max_local_steps, floor(deadline / step_time))`` over the limits present, as a
      float32 scalar; None when neither a tier budget nor a deadline applies.
    """
    limits = []
    if MAX_LOCAL_STEPS in values:
        limits.append(jnp.asarray(values[MAX_LOCAL_STEPS], jnp.float32))
    if STEP_TIME in values and DEADLINE in values:
        # A relative margin of a few float32 ulps: 0.8 s / 0.1 s is 8 steps, not 7.
        ratio = values[DEADLINE] / jnp.maximum(values[STEP_TIME], 1e-12)
        steps = jnp.floor(ratio * (1.0 + 1e-6))
        limits.append(steps.astype(jnp.float32))
    if not limits:
        return None
    return jnp.min(jnp.stack(limits))


def assign_tiers(num_clients: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assigns every client to a tier, the tiers' sizes in proportion to ``fractions``.

    Tier sizes are rounded by largest remainder (they add up to ``num_clients``), and which
    clients land in which tier is a seeded permutation, independent of client ids' order in
    the data.

    Args:
      num_clients: the population.
      fractions: each tier's share (non-negative, summing to 1).
      seed: the run's seed.

    Returns:
      ``[num_clients]`` int32 tier of each client.
    """
    shares = np.asarray(fractions, np.float64)
    exact = shares / shares.sum() * num_clients
    sizes = np.floor(exact).astype(np.int64)
    remainder = num_clients - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:remainder]] += 1
    order = np.random.default_rng([seed, 0x713E5]).permutation(num_clients)
    tiers = np.empty(num_clients, np.int32)
    tiers[order] = np.repeat(np.arange(len(shares), dtype=np.int32), sizes)
    return tiers


def build_client_profile(system, num_clients: int, seed: int) -> dict[str, np.ndarray]:
    """The client profile a config's ``system`` section describes.

    Args:
      system: a `fedjax_llm.config.SystemConfig`.
      num_clients: the population (profile rows).
      seed: the run's seed (tier assignment).

    Returns:
      ``{name: [num_clients] float32}``; empty when every client is alike.
    """
    per_tier = {
        MAX_LOCAL_STEPS: system.tier_local_steps,
        STEP_TIME: system.tier_step_time_s,
        LORA_RANK: system.tier_lora_ranks,
    }
    per_tier = {name: values for name, values in per_tier.items() if values}
    if not per_tier:
        return {}
    fractions = system.tier_fractions or (1.0,)
    tiers = assign_tiers(num_clients, fractions, seed)
    return {name: np.asarray(values, np.float32)[tiers] for name, values in per_tier.items()}
