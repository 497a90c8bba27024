"""Weighted averaging of client updates, in one shot or streamed over chunks of clients.

References:
  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
  Data" (FedAvg's example-count weighting).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.pytree import PyTree


class WeightedSum(NamedTuple):
    """Running sums for a streamed weighted mean.

    Attributes:
      total: params-shaped sum of ``weight_i * x_i`` over the clients seen so far (float32).
      weight: scalar sum of the weights seen so far.
    """

    total: PyTree
    weight: jax.Array


def weighted_sum_init(like: PyTree) -> WeightedSum:
    """Returns empty running sums shaped like one client's pytree (no client axis)."""
    return WeightedSum(
        jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like), jnp.zeros((), jnp.float32)
    )


def weighted_sum_update(sums: WeightedSum, stacked: PyTree, weights: jax.Array) -> WeightedSum:
    """Adds a chunk of clients to the running sums.

    Args:
      sums: the running sums.
      stacked: per-client pytree with a leading client axis ``[C, *shape]``.
      weights: ``[C]`` non-negative weights; a zero weight (a padded or dropped client)
        contributes exactly nothing, even if its update holds NaN.

    Returns:
      The updated sums.
    """
    weights = weights.astype(jnp.float32)

    def add(total, x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
        # where() rather than a product alone, so that a masked NaN/inf cannot leak in.
        contribution = jnp.where(w > 0, w * x.astype(jnp.float32), 0.0)
        return total + jnp.sum(contribution, axis=0)

    return WeightedSum(jax.tree.map(add, sums.total, stacked), sums.weight + jnp.sum(weights))


def weighted_sum_finalize(sums: WeightedSum, like: PyTree | None = None) -> PyTree:
    """Returns the weighted mean ``total / weight`` (zeros if no weight was seen).

    Args:
      sums: the running sums.
      like: optional pytree whose dtypes the result takes (default float32).
    """
    denom = jnp.maximum(sums.weight, jnp.finfo(jnp.float32).tiny)
    mean = jax.tree.map(lambda t: t / denom, sums.total)
    if like is not None:
        mean = jax.tree.map(lambda m, x: m.astype(x.dtype), mean, like)
    return mean


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Weighted mean over the leading client axis.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      weights: ``[C]`` non-negative weights.

    Returns:
      A params-shaped pytree (float32) ``sum_i w_i x_i / sum_i w_i``.
    """
    like = jax.tree.map(lambda x: x[0], stacked)
    return weighted_sum_finalize(weighted_sum_update(weighted_sum_init(like), stacked, weights))
