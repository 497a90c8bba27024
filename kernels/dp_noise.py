"""Gaussian noise for differentially private aggregates.

References:
  Dwork and Roth 2014, "The Algorithmic Foundations of Differential Privacy" (the Gaussian
  mechanism); McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"
  (noise of standard deviation ``z * C`` on the sum of client updates clipped to ``C``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.pytree import PyTree


def gaussian_noise_like(key: jax.Array, like: PyTree, stddev: jax.Array) -> PyTree:
    """Independent ``N(0, stddev^2)`` noise for every coordinate of a pytree.

    Each leaf draws from its own ``fold_in(key, leaf_index)``, so no key is used twice and the
    noise of one leaf does not depend on the others' shapes.

    Args:
      key: a key used for nothing else.
      like: pytree whose leaf shapes the noise takes (arrays or shape structs).
      stddev: the standard deviation (an array, so a new value never recompiles).

    Returns:
      A float32 pytree shaped like ``like``.
    """
    leaves, treedef = jax.tree.flatten(like)
    noise = [
        stddev * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(noise)


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: jax.Array) -> PyTree:
    """Adds ``N(0, stddev^2)`` to every coordinate (float32); with ``stddev == 0`` the input is
    returned bit for bit (no ``-0.0 + 0.0`` sign change).

    Args:
      tree: the aggregate (e.g. the sum of clipped client updates).
      key: a key used for nothing else; one key gives every device the same noise.
      stddev: the noise standard deviation (``noise_multiplier * clip_norm``).

    Returns:
      The noised pytree in float32.
    """
    stddev = jnp.asarray(stddev, jnp.float32)
    noise = gaussian_noise_like(key, tree, stddev)
    return jax.tree.map(
        lambda x, n: jnp.where(stddev > 0, x.astype(jnp.float32) + n, x.astype(jnp.float32)),
        tree,
        noise,
    )
