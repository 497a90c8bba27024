"""Running calls one after another where XLA would run them at once.

XLA:CPU runs independent operations concurrently on its intra-op thread pool. Its LAPACK
calls (SVD, QR) fan a batch out into that same pool and wait for it, so two of them in flight
at once can each hold a worker while waiting for work queued behind the other: a hang, seen on
2 cores with FlexLoRA's SVDs of several LoRA targets. `after` makes an input depend on an
earlier result, which puts such calls in sequence (on accelerators it only orders them).

An optimization barrier is not enough: XLA:CPU's executor orders its thunks by the buffers
they read and write, and a barrier reads nothing. The input instead gets ``0 x isnan(sum)``
of the earlier result added, an exact zero (never NaN) that XLA does not fold for floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.pytree import PyTree


def after(x: PyTree, previous: PyTree | None) -> PyTree:
    """``x`` unchanged, computed only once ``previous`` is (None: at once).

    Args:
      x: the input of the next call (floating-point leaves).
      previous: a result of the previous call (any pytree with a leaf), or None for the first.

    Returns:
      ``x`` plus an exact zero that reads ``previous``.
    """
    if previous is None:
        return x
    first = jax.tree.leaves(previous)[0]
    zero = jnp.isnan(jnp.sum(first)).astype(jnp.float32) * 0.0
    return jax.tree.map(lambda v: v + zero.astype(v.dtype), x)
