"""Jitted building blocks over a leading client axis ``[C, *shape]``.

Each kernel takes per-client pytrees stacked on axis 0 and returns params-shaped outputs,
the contract of `optax.experimental` aggregators, so they compose inside one compiled round.
"""

from kernels.aggregation import (
    WeightedSum,
    weighted_mean,
    weighted_sum_finalize,
    weighted_sum_init,
    weighted_sum_update,
)
from kernels.clipping import clip_by_global_norm, global_norm
from kernels.pytree import PyTree
from kernels.robust import coordinate_median

__all__ = [
    "PyTree",
    "WeightedSum",
    "clip_by_global_norm",
    "coordinate_median",
    "global_norm",
    "weighted_mean",
    "weighted_sum_finalize",
    "weighted_sum_init",
    "weighted_sum_update",
]
