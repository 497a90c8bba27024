"""Simulated secure aggregation as two pieces of the round's pipeline.

`secure_masking` runs in every client (inside the vmap): it quantizes the client's upload onto
the ring of 32-bit integers (each coordinate within ``[-C, C]``, C the ``clip_norm`` round
hyperparameter, so clip first: with DP or the ``clip`` transform) and adds its pairwise masks
with every other client of the cohort (the round's `RoundContext`). `secure_mean` sums the
masked uploads in the ring (streaming, over chunks and devices), removes the masks of clients
that masked but whose upload was lost, turns the ring sum back into floats and divides: by the
number of delivered clients, or, with client-level DP, adds the Gaussian noise and divides by
the expected cohort. Because the masks cancel exactly, the aggregate equals that of the same
quantized uploads summed in the clear, bit for bit; the quantization error is reported.

References:
  Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.pipeline import Aggregator, UploadTransform, identity
from fedjax_llm.privacy.mechanisms import CLIP_NORM, NOISE_MULTIPLIER, noise_stddev
from kernels import add_gaussian_noise, global_norm
from kernels.secure_aggregation import dequantize_sum, dropout_correction, mask_upload, quantize


def secure_masking(max_clients: int, clip_norm: float, masked: bool = True) -> UploadTransform:
    """The client side: quantize onto the ring, then add the pairwise masks.

    Args:
      max_clients: the most clients a round can sum (the cohort's static bound); fixes the
        ring's per-client range so that no sum wraps.
      clip_norm: default of the ``clip_norm`` round hyperparameter, the quantization range.
      masked: add the masks (False: the same quantized uploads in the clear, the reference a
        test compares the secure sum with).

    Returns:
      An `UploadTransform` with ``uses_context``; its uploads are ``uint32`` pytrees. Stats:
      ``secagg/quantization_error`` (the L2 norm of what quantization changed, summed over
      delivered clients).
    """

    def apply(upload, state, client_state, key, hparams, context):
        del state
        clip = hparams.values[CLIP_NORM]
        quantized = quantize(upload, key, clip, max_clients)
        restored = dequantize_sum(quantized, jnp.int32(1), clip, max_clients, upload)
        error = global_norm(jax.tree.map(jnp.subtract, restored, upload))
        if masked:
            quantized = mask_upload(
                quantized, context.key, context.client_id, context.client_ids, context.participating
            )
        return quantized, client_state, {"secagg/quantization_error": error}

    return identity()._replace(
        apply=apply, hyperparams={CLIP_NORM: float(clip_norm)}, uses_context=True
    )


def secure_mean(
    max_clients: int,
    clip_norm: float,
    expected_clients: float | None = None,
    noise_multiplier: float = 0.0,
    masked: bool = True,
) -> Aggregator:
    """The server side: the ring sum of the delivered uploads, unmasked, as a float mean.

    Args:
      max_clients: as for `secure_masking`.
      clip_norm: default of the ``clip_norm`` round hyperparameter.
      expected_clients: with client-level DP, the fixed denominator; the Gaussian noise of
        ``dp_noise_multiplier * clip_norm`` is added to the unmasked sum (the server only ever
        holds the sum). None: the mean over the delivered clients, no noise.
      noise_multiplier: default of ``dp_noise_multiplier`` (with ``expected_clients``).
      masked: whether the uploads carry masks (see `secure_masking`).

    Returns:
      A streaming `Aggregator` with ``uses_context`` (it needs the cohort to remove the masks of
      lost uploads); DP sets ``updates_when_empty``.
    """
    private = expected_clients is not None
    hyperparams = {CLIP_NORM: float(clip_norm)}
    if private:
        hyperparams[NOISE_MULTIPLIER] = float(noise_multiplier)

    def start(state, like):
        return (
            jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.uint32), like),
            jnp.zeros((), jnp.int32),
        )

    def accumulate(acc, uploads, weights, state, hparams):
        del state, hparams
        sums, count = acc
        counted = weights > 0

        def add(total, x):
            keep = counted.reshape((-1,) + (1,) * (x.ndim - 1))
            return total + jnp.sum(jnp.where(keep, x, jnp.uint32(0)), axis=0, dtype=jnp.uint32)

        return jax.tree.map(add, sums, uploads), count + jnp.sum(counted, dtype=jnp.int32)

    def finalize(state, acc, key, hparams, context):
        sums, count = acc
        clip = hparams.values[CLIP_NORM]
        if masked:
            correction = dropout_correction(
                context.key, context.client_ids, context.participating, context.delivered, sums
            )
            sums = jax.tree.map(jnp.add, sums, correction)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), sums)
        total = dequantize_sum(sums, count, clip, max_clients, like)
        metrics = {"secagg/summed": count.astype(jnp.float32)}
        if not private:
            denominator = jnp.maximum(count, 1).astype(jnp.float32)
            return jax.tree.map(lambda t: t / denominator, total), state, metrics
        stddev = noise_stddev(hparams.values[NOISE_MULTIPLIER], clip)
        noised = add_gaussian_noise(total, key, stddev)
        aggregate = jax.tree.map(lambda t: t / expected_clients, noised)
        return aggregate, state, {**metrics, "dp/noise_stddev": stddev, "dp/clip_norm": clip}

    return Aggregator(
        init=lambda like: (),
        start=start,
        accumulate=accumulate,
        finalize=finalize,
        hyperparams=hyperparams,
        updates_when_empty=private,
        uses_context=True,
    )
