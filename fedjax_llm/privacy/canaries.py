"""Canary clients for a one-run privacy audit of client-level DP.

A run with ``privacy.audit_canaries = m`` gets m extra clients (ids ``first_id ..
first_id + m - 1``) whose upload, whenever they are sampled, is replaced by a fixed random
direction ``u_j`` of the update space scaled to the clip norm: the strongest update a client
can send. Each canary is included in the population independently with probability 1/2 (an
excluded one is never sampled, as if it did not exist). After training, each canary's score is
the cosine between the model's total change and ``u_j``; the one-run audit of Steinke, Nasr and
Jagielski (`fedjax_llm.privacy.audit.canary_audit`) turns how well the scores separate included
from excluded canaries into a lower bound on epsilon. A correct mechanism keeps the bound below
the accountant's epsilon; a broken one (too little noise) exceeds it.

References:
  Andrew et al. 2024, "One-shot Empirical Privacy Estimation for Federated Learning" (random
  canary clients, cosine scores); Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One
  (1) Training Run".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.algorithms.base import ClientOutput
from fedjax_llm.pipeline import UploadTransform, identity
from fedjax_llm.privacy.mechanisms import CLIP_NORM
from kernels import gaussian_noise_like, global_norm
from kernels.pytree import PyTree


class Canaries(NamedTuple):
    """The canary clients of a run.

    Attributes:
      first_id: the id of canary 0 (the real population's size).
      included: ``[m]`` bool, which canaries are in the population (probability 1/2 each).
      seed: the seed of their directions and inclusion.
    """

    first_id: int
    included: np.ndarray
    seed: int

    @property
    def count(self) -> int:
        """The number m of canaries."""
        return len(self.included)

    @property
    def excluded_ids(self) -> np.ndarray:
        """Client ids of the canaries left out of the population (never sampled)."""
        return self.first_id + np.flatnonzero(~self.included)


class HeldOut(NamedTuple):
    """Real clients whose membership a membership-inference attack guesses.

    Attributes:
      candidates: ``[h]`` client ids.
      included: ``[h]`` bool; a client not included is never sampled (held out).
    """

    candidates: np.ndarray
    included: np.ndarray

    @property
    def excluded_ids(self) -> np.ndarray:
        """The held-out clients' ids."""
        return self.candidates[~self.included]


def holdout_clients(population: int, count: int, seed: int) -> HeldOut:
    """Picks ``count`` real clients and holds each out with probability 1/2."""
    rng = np.random.default_rng([seed, 0x401D])
    candidates = np.sort(rng.choice(population, size=count, replace=False)).astype(np.int32)
    return HeldOut(candidates, rng.random(count) < 0.5)


def make_canaries(first_id: int, count: int, seed: int) -> Canaries:
    """Draws which of ``count`` canaries are included (each with probability 1/2)."""
    included = np.random.default_rng([seed, 0xCA7]).random(count) < 0.5
    return Canaries(first_id, included, seed)


def canary_direction(seed: int, index: jax.Array, like: PyTree) -> PyTree:
    """Canary ``index``'s unit direction in the shape of ``like`` (a random Gaussian, normed)."""
    key = jax.random.fold_in(jax.random.key(seed ^ 0xCA7), index)
    noise = gaussian_noise_like(key, like, jnp.float32(1.0))
    norm = global_norm(noise)
    return jax.tree.map(lambda x: x / norm, noise)


def canary_uploads(canaries: Canaries, clip_norm: float) -> UploadTransform:
    """Replaces a canary client's upload by ``clip_norm`` times its direction (the delta; any
    other field of the `ClientOutput` becomes zero); other clients' uploads pass unchanged.

    Args:
      canaries: the run's `Canaries`.
      clip_norm: default of the ``clip_norm`` round hyperparameter.

    Returns:
      An `UploadTransform` with ``uses_context`` (it needs the client's id).
    """
    first, count, seed = canaries.first_id, canaries.count, canaries.seed

    def apply(upload, state, client_state, key, hparams, context):
        del state, key
        index = context.client_id - first
        is_canary = (index >= 0) & (index < count)
        direction = canary_direction(seed, jnp.clip(index, 0, count - 1), upload.delta)
        clip = hparams.values[CLIP_NORM]
        canary = ClientOutput(
            jax.tree.map(lambda d, x: (clip * d).astype(x.dtype), direction, upload.delta),
            jax.tree.map(jnp.zeros_like, upload.extra),
        )
        out = jax.tree.map(lambda c, u: jnp.where(is_canary, c, u), canary, upload)
        return out, client_state, {"audit/canaries": is_canary.astype(jnp.float32)}

    return identity()._replace(
        apply=apply, hyperparams={CLIP_NORM: float(clip_norm)}, uses_context=True
    )


def canary_scores(canaries: Canaries, initial: PyTree, final: PyTree) -> np.ndarray:
    """Each canary's score: the cosine between the model's total change and its direction.

    Args:
      canaries: the run's `Canaries`.
      initial: the global trainable parameters before the first round.
      final: after the last.

    Returns:
      ``[m]`` float64 scores (0 where the model did not change).
    """
    change = jax.tree.map(
        lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32), initial, final
    )
    norm = global_norm(change)

    @jax.jit
    def score(index):
        direction = canary_direction(canaries.seed, index, change)
        dot = sum(
            jnp.sum(d * c)
            for d, c in zip(jax.tree.leaves(direction), jax.tree.leaves(change), strict=True)
        )
        return jnp.where(norm > 0, dot / jnp.maximum(norm, 1e-30), 0.0)

    return np.asarray(jax.lax.map(score, jnp.arange(canaries.count)), np.float64)
