"""Robust aggregation over a leading client axis, for gathering aggregators.

References:
  Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
  (coordinate-wise median).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.pytree import PyTree


def coordinate_median(stacked: PyTree, mask: jax.Array) -> PyTree:
    """Coordinate-wise median over the clients whose mask is set.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count; masked clients are ignored even if they
        hold NaN.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.
    """
    mask = mask > 0

    def median(x):
        x = x.astype(jnp.float32)
        m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        # NaN marks a missing client: nanmedian skips it. A real NaN in a counted client is
        # first replaced by +inf so that it cannot vanish from the median silently.
        x = jnp.where(jnp.isnan(x), jnp.inf, x)
        out = jnp.nanmedian(jnp.where(m, x, jnp.nan), axis=0)
        return jnp.where(jnp.any(mask), out, 0.0)

    return jax.tree.map(median, stacked)
