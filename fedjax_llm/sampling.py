"""Seeded client sampling."""

from __future__ import annotations

import numpy as np


def sample_clients(seed: int, round_num: int, num_clients: int, num_per_round: int) -> np.ndarray:
    """Samples clients uniformly without replacement for one round.

    The draw is a pure function of ``(seed, round_num)``: resuming at any round reproduces
    the same sequence without storing sampler state, and sweeps that share a seed see the
    same clients.

    Args:
      seed: the run's seed.
      round_num: zero-based round index.
      num_clients: population size.
      num_per_round: clients per round (<= num_clients).

    Returns:
      ``[num_per_round]`` int32 client ids.

    Raises:
      ValueError: if more clients are requested than exist.
    """
    if num_per_round > num_clients:
        raise ValueError(
            f"num_clients_per_round={num_per_round} exceeds the {num_clients} clients."
        )
    rng = np.random.default_rng([seed, round_num, 0x5A3])
    return rng.choice(num_clients, size=num_per_round, replace=False).astype(np.int32)
