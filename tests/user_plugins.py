"""Three plugins written the way a user would write them in their own file: an upload transform,
an aggregator and an objective, each in tens of lines and built from public names only.

- `stochastic_quantizer`: unbiased stochastic quantization of each leaf of a client's upload to
  a few evenly spaced levels, with error feedback kept in the client's own state.
- `trimmed_mean`: the coordinate-wise trimmed mean of the delivered uploads (a gathering
  aggregator).
- `preference_loss`: a pairwise (Bradley-Terry) preference loss over a chosen and a rejected
  token row per example, without a reference model.

`tests/test_plugins.py` runs them inside the compiled round, from a config and from Python.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm import Aggregator, Objective, UploadTransform
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT
from kernels import global_norm


def quantize_leaf(x: jax.Array, key: jax.Array, levels: int) -> jax.Array:
    """Rounds each entry of ``x`` up or down to one of ``levels`` evenly spaced values between
    its min and max, up with probability equal to the distance from the lower level, so the
    result is unbiased: ``E[q(x)] = x``.

    References:
      Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
      Encoding".
    """
    lo, hi = jnp.min(x), jnp.max(x)
    step = (hi - lo) / (levels - 1)
    position = (x - lo) / jnp.where(step > 0, step, 1.0)
    lower = jnp.floor(position)
    up = jax.random.uniform(key, x.shape) < position - lower
    return jnp.where(step > 0, lo + (lower + up) * step, x).astype(x.dtype)


def stochastic_quantizer(levels: int = 4) -> UploadTransform:
    """Quantizes every leaf of a client's upload with `quantize_leaf`, after adding the error
    the client's previous quantization left behind (error feedback; Seide et al. 2014, "1-bit
    stochastic gradient descent"). The new error is kept in the client's state.

    Args:
      levels: quantization levels per leaf (>= 2).

    Returns:
      The `UploadTransform`; its stats report the summed norm of the kept error.
    """

    def client_init(like):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like)

    def apply(upload, state, residual, key, hparams):
        del state, hparams
        corrected = jax.tree.map(jnp.add, upload, residual)
        leaves, treedef = jax.tree.flatten(corrected)
        keys = jax.random.split(key, len(leaves))
        quantized = treedef.unflatten(
            [quantize_leaf(x, k, levels) for x, k in zip(leaves, keys, strict=True)]
        )
        residual = jax.tree.map(jnp.subtract, corrected, quantized)
        return quantized, residual, {"quantize/error_norm": global_norm(residual)}

    return UploadTransform(
        init=lambda like: (),
        client_init=client_init,
        apply=apply,
        update=lambda state, stats, key, hparams: state,
    )


def trimmed_mean(trim_fraction: float = 0.2) -> Aggregator:
    """The coordinate-wise trimmed mean: for each coordinate, drop the ``floor(trim * n)``
    largest and smallest of the n delivered values and average the rest (unweighted).

    The trim fraction is a round hyperparameter (``trim_fraction``), so changing it never
    recompiles.

    References:
      Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    """

    def finalize(state, gathered, key, hparams):
        del key
        counted = gathered.weights > 0
        n = jnp.sum(counted)
        k = jnp.floor(hparams.values["trim_fraction"] * n).astype(n.dtype)

        def one(x):
            m = counted.reshape((-1,) + (1,) * (x.ndim - 1))
            # Uncounted clients sort last and are never kept (they may hold garbage).
            ranked = jnp.sort(jnp.where(m, x.astype(jnp.float32), jnp.inf), axis=0)
            rank = jnp.arange(x.shape[0]).reshape(m.shape)
            keep = (rank >= k) & (rank < n - k)
            return jnp.sum(jnp.where(keep, ranked, 0.0), axis=0) / jnp.maximum(n - 2 * k, 1)

        return jax.tree.map(one, gathered.uploads), state, {"trimmed_mean/kept": n - 2 * k}

    return Aggregator(
        init=lambda like: (),
        start=lambda state, like: (),
        accumulate=lambda acc, uploads, weights, state, hparams: acc,
        finalize=finalize,
        gathers=True,
        hyperparams={"trim_fraction": trim_fraction},
    )


def preference_loss(apply_fn, beta: float = 1.0) -> Objective:
    """A pairwise preference loss ``-log sigmoid(beta * (logp(chosen) - logp(rejected)))``
    (Bradley-Terry; DPO without a reference model), over token rows ``chosen`` and ``rejected``
    ``[B, T]`` whose masks ``chosen_mask`` / ``rejected_mask`` select the scored tokens.

    Args:
      apply_fn: the model, ``(frozen, params, tokens) -> logits``.
      beta: the inverse temperature of the preference.

    Returns:
      The `Objective`; its metrics add ``pairs_correct``, the pairs ranked the right way.

    References:
      Bradley & Terry 1952; Rafailov et al. 2023, "Direct Preference Optimization".
    """

    def sequence_logp(frozen, params, tokens, mask):
        logits = apply_fn(frozen, params, tokens)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(target * mask[:, 1:], axis=-1)

    def loss(frozen, params, batch, key):
        del key
        # Chosen and rejected rows go through the model as one batch.
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        chosen, rejected = jnp.split(sequence_logp(frozen, params, tokens, mask), 2)
        margin = beta * (chosen - rejected)
        weight = batch["example_weight"]
        loss_sum = jnp.sum(weight * -jax.nn.log_sigmoid(margin))
        pairs = jnp.sum(weight)
        metrics = {
            LOSS_SUM: loss_sum,
            LOSS_WEIGHT: pairs,
            "pairs_correct": jnp.sum(weight * (margin > 0)),
        }
        return loss_sum / jnp.maximum(pairs, 1.0), metrics

    return Objective(loss, ("chosen", "rejected", "chosen_mask", "rejected_mask"))
