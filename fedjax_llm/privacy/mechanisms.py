"""Differential-privacy mechanisms as pieces of the round's pipeline, for any algorithm.

Client-level DP (DP-FedAvg, DP-FedAdam, DP-anything) is the round's own pipeline with two
pieces: every client's whole upload (its `ClientOutput`, SCAFFOLD's control delta included) is
clipped to an L2 norm ``C`` inside the vmapped client (`fedjax_llm.pipeline.clip_upload`, or
`adaptive_clip`), and `dp_mean` sums the clipped uploads (unit weight each), adds Gaussian noise
of standard deviation ``z * C`` once after every chunk and device has been summed, and divides
by the *expected* number of clients (a fixed denominator, as the accounting assumes). The server
update of whichever algorithm is configured then runs on that aggregate: nothing is copied per
algorithm.

Sample-level DP-SGD (`dp_sgd_objective`) privatizes the gradient of the objective instead:
per-example gradients under `jax.vmap` (inside the vmapped clients), each clipped to ``C``,
summed, noised with ``z * C`` and divided by the batch size, at every local step. It wraps the
objective, so every algorithm's ``jax.value_and_grad`` gets the private gradient.

References:
  McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (DP-FedAvg);
  Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping";
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.objectives import Objective
from fedjax_llm.pipeline import Aggregator, UploadTransform
from kernels import (
    add_gaussian_noise,
    clip_by_global_norm,
    weighted_sum_init,
    weighted_sum_update,
)

CLIP_NORM = "clip_norm"
"""The round hyperparameter holding the clip norm C (set by `adaptive_clip` when adaptive)."""
NOISE_MULTIPLIER = "dp_noise_multiplier"
"""The round hyperparameter holding the noise multiplier applied to the sum of updates."""


def noise_stddev(noise_multiplier: jax.Array, clip_norm: jax.Array) -> jax.Array:
    """``z * C``, and exactly 0 when ``z == 0`` (even for ``C = inf``, a non-private run)."""
    z = jnp.asarray(noise_multiplier, jnp.float32)
    return jnp.where(z > 0, z * jnp.asarray(clip_norm, jnp.float32), 0.0)


def dp_mean(
    expected_clients: float, noise_multiplier: float = 1.0, clip_norm: float = 1.0
) -> Aggregator:
    """The Gaussian mechanism on the sum of clipped uploads, over a fixed denominator.

    Every delivered client counts once (weight 1, whatever its example count: weighting by a
    client's data size would leak it). The sum streams over chunks and devices; the noise
    ``N(0, (z C)^2)`` is drawn once from the aggregator's key after the device ``psum``, so
    every device adds the same noise. The aggregate is ``(sum + noise) / expected_clients``.
    The uploads must already be clipped to ``C`` (the pipeline's clip transform).

    Args:
      expected_clients: the fixed denominator, the expected cohort (``q * N`` for Poisson
        sampling, ``m`` for fixed-size sampling).
      noise_multiplier: default of the ``dp_noise_multiplier`` round hyperparameter ``z``.
      clip_norm: default of the ``clip_norm`` round hyperparameter (the clip transform's).

    Returns:
      A streaming `Aggregator` that sets ``updates_when_empty`` (an empty round must look like
      any other: the server still steps on the noise). Its metrics: ``dp/noise_stddev`` (of
      the noise on the sum) and ``dp/clip_norm``.
    """
    if expected_clients <= 0:
        raise ValueError(
            f"the expected number of clients must be positive, got {expected_clients}."
        )
    denominator = float(expected_clients)

    def accumulate(sums, uploads, weights, state, hparams):
        del state, hparams
        return weighted_sum_update(sums, uploads, (weights > 0).astype(jnp.float32))

    def finalize(state, sums, key, hparams):
        clip = hparams.values[CLIP_NORM]
        stddev = noise_stddev(hparams.values[NOISE_MULTIPLIER], clip)
        noised = add_gaussian_noise(sums.total, key, stddev)
        aggregate = jax.tree.map(lambda x: x / denominator, noised)
        return aggregate, state, {"dp/noise_stddev": stddev, "dp/clip_norm": clip}

    return Aggregator(
        init=lambda like: (),
        start=lambda state, like: weighted_sum_init(like),
        accumulate=accumulate,
        finalize=finalize,
        hyperparams={NOISE_MULTIPLIER: float(noise_multiplier), CLIP_NORM: float(clip_norm)},
        updates_when_empty=True,
    )


def adaptive_clip(
    initial_clip_norm: float,
    target_quantile: float,
    learning_rate: float,
    count_stddev: float,
    expected_clients: float,
) -> UploadTransform:
    """Clips each client's whole upload to a norm that tracks a quantile of the update norms.

    Each delivered client reports whether its norm was at most the current ``C`` (the bit
    ``b_i``); the server releases the centred sum ``sum_i (b_i - 1/2) + N(0, count_stddev^2)``
    (sensitivity 1/2 when a client is added or removed, as the accounting of Andrew et al.'s
    Theorem 1 assumes), estimates the fraction ``b = release / m + 1/2`` over the expected
    cohort ``m`` and takes a geometric step ``C <- C exp(-lr (b - target_quantile))``. The
    clip norm lives in the transform's server state (checkpointed) and overrides the
    ``clip_norm`` hyperparameter, so `dp_mean` scales its noise with the current ``C``. The
    noisy count is a second Gaussian release: the accountant charges it by giving the update
    sum the larger multiplier of `fedjax_llm.privacy.adaptive_clipping_noise`.

    Args:
      initial_clip_norm: ``C`` before the first round.
      target_quantile: the quantile ``gamma`` of update norms to track (0.5: the median).
      learning_rate: the geometric step size ``eta_C`` (0.2 in the paper).
      count_stddev: ``sigma_b``, the noise on the clipped count (the paper: expected / 20).
      expected_clients: the expected cohort, the count's denominator.

    Returns:
      The `UploadTransform`. Stats: ``clip/below`` (clients at most ``C``), ``clip/centered``
      (the same minus half a count per client), ``clip/norm_sum``.

    References:
      Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
      Adaptive Clipping", Algorithm 1.
    """

    def apply(upload, state, client_state, key, hparams):
        del state, key
        clip = hparams.values[CLIP_NORM]
        clipped, norm = clip_by_global_norm(upload, clip)
        below = (norm <= clip).astype(jnp.float32)
        stats = {"clip/below": below, "clip/centered": below - 0.5, "clip/norm_sum": norm}
        return clipped, client_state, stats

    def update(state, stats, key, hparams):
        del hparams
        noise = count_stddev * jax.random.normal(key, (), jnp.float32)
        fraction = (stats["clip/centered"] + noise) / expected_clients + 0.5
        return state * jnp.exp(-learning_rate * (fraction - target_quantile))

    return UploadTransform(
        init=lambda like: jnp.asarray(initial_clip_norm, jnp.float32),
        client_init=lambda like: (),
        apply=apply,
        update=update,
        hyperparams={CLIP_NORM: float(initial_clip_norm)},
        overrides=lambda state: {CLIP_NORM: state},
    )


def dp_sgd_objective(objective: Objective, clip_norm: float, noise_multiplier: float) -> Objective:
    """Wraps an objective so that its gradient is DP-SGD's private gradient.

    The loss value and metrics are the objective's own; the gradient (a custom VJP) is
    ``(sum_i clip(g_i, C) + N(0, (z C)^2)) / B`` with ``g_i`` the gradient of example i's own
    loss (per-example gradients by `jax.vmap`), ``B`` the batch size (a fixed denominator) and
    examples with ``example_weight`` 0 contributing nothing. Every algorithm that
    differentiates the loss (its ``client_step``) therefore trains with DP-SGD; terms it adds
    itself (FedProx's proximal pull, SCAFFOLD's correction) do not touch the data.

    Args:
      objective: the objective to privatize.
      clip_norm: per-example L2 clip norm ``C``.
      noise_multiplier: ``z``; the noise on each step's sum has standard deviation ``z C``.

    Returns:
      The private `Objective` (same fields).

    References:
      Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1.
    """
    stddev = noise_stddev(noise_multiplier, clip_norm)

    # The step's key crosses the custom-VJP boundary as raw data, and the forward pass (the
    # loss), the per-example pass and the noise each derive their own key from it with
    # ``fold_in`` (0, 1, 2). Passing typed keys (or keys split outside) trips the key-reuse
    # checker under vmap and scan, which counts the partial evaluation's copies as uses.
    def derived(key_data, stream):
        return jax.random.fold_in(jax.random.wrap_key_data(key_data), stream)

    @jax.custom_vjp
    def private_loss(params, frozen, batch, key_data):
        return objective.loss(frozen, params, batch, derived(key_data, 0))

    def forward(params, frozen, batch, key_data):
        return private_loss(params, frozen, batch, key_data), (params, frozen, batch, key_data)

    def backward(residuals, cotangent):
        params, frozen, batch, key_data = residuals
        loss_cotangent = cotangent[0]
        batch_size = batch["example_weight"].shape[0]

        def one(example, key):
            single = jax.tree.map(lambda x: x[None], example)
            grad = jax.grad(lambda p: objective.loss(frozen, p, single, key)[0])(params)
            clipped, _ = clip_by_global_norm(grad, clip_norm)
            counts = example["example_weight"] > 0
            return jax.tree.map(lambda g: jnp.where(counts, g.astype(jnp.float32), 0.0), clipped)

        example_keys = jax.random.split(derived(key_data, 1), batch_size)
        per_example = jax.vmap(one)(batch, example_keys)
        total = jax.tree.map(lambda g: jnp.sum(g, axis=0), per_example)
        noised = add_gaussian_noise(total, derived(key_data, 2), stddev)
        grads = jax.tree.map(
            lambda g, p: (g * (loss_cotangent / batch_size)).astype(p.dtype), noised, params
        )
        return grads, None, None, None

    private_loss.defvjp(forward, backward)

    def loss(frozen, params, batch, key):
        return private_loss(params, frozen, batch, jax.random.key_data(key))

    return Objective(loss, objective.fields, objective.means)
