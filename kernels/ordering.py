"""Running calls one after another where XLA would run them at once.

XLA:CPU runs independent operations concurrently on its intra-op thread pool. Its LAPACK
calls (SVD, QR) fan a batch out into that same pool and wait for it, so two of them in flight
at once can each hold a worker while waiting for work queued behind the other: a hang, seen on
2 cores with FlexLoRA's SVDs of several LoRA targets. `after` makes an input wait for an
earlier result, which puts such calls in sequence (on accelerators it only orders them).
"""

from __future__ import annotations

import jax

from kernels.pytree import PyTree


def after(x: PyTree, previous: PyTree | None) -> PyTree:
    """``x`` unchanged, available only once ``previous`` is computed (None: at once).

    Args:
      x: the input of the next call.
      previous: a result of the previous call (any pytree), or None for the first call.

    Returns:
      ``x``, through an optimization barrier that also takes ``previous``.
    """
    if previous is None:
        return x
    x, _ = jax.lax.optimization_barrier((x, previous))
    return x
