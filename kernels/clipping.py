"""Per-client clipping of an update to a maximum global L2 norm.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy"; McMahan et al. 2018,
  "Learning Differentially Private Recurrent Language Models" (per-client clipping of the
  whole update, DP-FedAvg).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.pytree import PyTree


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of a whole pytree, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(tree: PyTree, max_norm: jax.Array) -> tuple[PyTree, jax.Array]:
    """Scales one client's pytree so that its global L2 norm is at most ``max_norm``.

    Args:
      tree: one client's update (no client axis; use `jax.vmap` for a stack of clients).
      max_norm: the clip norm C (> 0); an array so that changing it never recompiles.

    Returns:
      The clipped pytree (same dtypes) and the norm before clipping.
    """
    norm = global_norm(tree)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree), norm
