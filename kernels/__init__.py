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
from kernels.attacks import alie, alie_z, gaussian_noise_attack, ipm, scaling, sign_flip
from kernels.clipping import clip_by_global_norm, global_norm
from kernels.compression import (
    low_rank,
    low_rank_bytes,
    num_kept,
    random_k,
    random_k_bytes,
    scaled_sign,
    scaled_sign_bytes,
    stochastic_quantize,
    stochastic_quantize_bytes,
    top_k,
    top_k_bytes,
)
from kernels.dp_noise import add_gaussian_noise, gaussian_noise_like
from kernels.pytree import PyTree
from kernels.robust import (
    centered_clipping,
    coordinate_median,
    flatten_clients,
    geometric_median,
    krum,
    krum_scores,
    krum_selection,
    norm_bounded_mean,
    trimmed_mean,
)
from kernels.secure_aggregation import (
    client_mask,
    dequantize_sum,
    dropout_correction,
    mask_upload,
    masked_bytes_per_client,
    pair_mask,
    quantize,
    ring_scale,
)

__all__ = [
    "PyTree",
    "WeightedSum",
    "add_gaussian_noise",
    "alie",
    "alie_z",
    "centered_clipping",
    "client_mask",
    "clip_by_global_norm",
    "coordinate_median",
    "dequantize_sum",
    "dropout_correction",
    "gaussian_noise_like",
    "flatten_clients",
    "gaussian_noise_attack",
    "geometric_median",
    "global_norm",
    "ipm",
    "krum",
    "krum_scores",
    "krum_selection",
    "low_rank",
    "low_rank_bytes",
    "mask_upload",
    "masked_bytes_per_client",
    "norm_bounded_mean",
    "num_kept",
    "pair_mask",
    "quantize",
    "random_k",
    "random_k_bytes",
    "ring_scale",
    "scaled_sign",
    "scaled_sign_bytes",
    "scaling",
    "sign_flip",
    "stochastic_quantize",
    "stochastic_quantize_bytes",
    "top_k",
    "top_k_bytes",
    "trimmed_mean",
    "weighted_mean",
    "weighted_sum_finalize",
    "weighted_sum_init",
    "weighted_sum_update",
]
