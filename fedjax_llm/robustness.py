"""Byzantine clients and robust aggregation, as pieces of the round's pipeline.

Robust aggregators wrap the kernels of `kernels.robust` as `Aggregator`s. Those that need every
upload at once (trimmed mean, Krum, geometric median, centered clipping) *gather* the sampled
clients' uploads: the round then holds ``slots x upload bytes`` (LoRA- or prompt-sized; the
simulator refuses a configuration where that exceeds half of the device's memory). Norm
bounding streams like the mean.

Malicious clients are a fixed set of client ids, drawn once per run from the seed
(`malicious_clients`), so the same clients attack in every round they are sampled. Attacks
that need the benign clients' statistics (ALIE, IPM) are omniscient, as in their papers: the
attack runs where every upload of the round is visible, by `with_attack`, which wraps any
aggregator (streaming ones then see the attacked uploads all at once).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.pipeline import Aggregator, Gathered, weighted_mean
from kernels import (
    alie,
    centered_clipping,
    clip_by_global_norm,
    gaussian_noise_attack,
    geometric_median,
    ipm,
    krum,
    krum_selection,
    scaling,
    sign_flip,
    trimmed_mean,
    weighted_sum_update,
)


def _gathering(finalize, init=lambda like: (), hyperparams=None) -> Aggregator:
    return Aggregator(
        init=init,
        start=lambda state, like: (),
        accumulate=lambda acc, uploads, weights, state, hparams: acc,
        finalize=finalize,
        gathers=True,
        hyperparams=hyperparams or {},
    )


def trimmed_mean_aggregator(trim_fraction: float) -> Aggregator:
    """The coordinate-wise trimmed mean (Yin et al. 2018); ``trim_fraction`` is the round
    hyperparameter of the same name (the share trimmed at each end)."""

    def finalize(state, gathered, key, hparams):
        del key
        out = trimmed_mean(gathered.uploads, gathered.weights > 0, hparams.values["trim_fraction"])
        return out, state, {}

    return _gathering(finalize, hyperparams={"trim_fraction": float(trim_fraction)})


def krum_aggregator(num_byzantine: int, num_selected: int | None = None) -> Aggregator:
    """Krum (``num_selected`` None) or multi-Krum (Blanchard et al. 2017). Metrics:
    ``krum/selected`` (how many clients were averaged)."""

    def finalize(state, gathered, key, hparams):
        del key, hparams
        mask = gathered.weights > 0
        m = 1 if num_selected is None else num_selected
        out = krum(gathered.uploads, mask, num_byzantine, m)
        chosen = krum_selection(gathered.uploads, mask, num_byzantine, m)
        return out, state, {"krum/selected": jnp.sum(chosen)}

    return _gathering(finalize)


def geometric_median_aggregator(num_iters: int) -> Aggregator:
    """The geometric median by smoothed Weiszfeld iterations (Pillutla et al. 2022, RFA)."""

    def finalize(state, gathered, key, hparams):
        del key, hparams
        mask = gathered.weights > 0
        return geometric_median(gathered.uploads, mask, num_iters=num_iters), state, {}

    return _gathering(finalize)


def norm_bounding_aggregator(bound: float) -> Aggregator:
    """The weighted mean of uploads each clipped to ``norm_bound`` (Sun et al. 2019,
    "Can You Really Backdoor Federated Learning?"); streams like the mean."""

    def accumulate(sums, uploads, weights, state, hparams):
        del state
        clip = hparams.values["norm_bound"]
        clipped = jax.vmap(lambda u: clip_by_global_norm(u, clip)[0])(uploads)
        return weighted_sum_update(sums, clipped, weights)

    return weighted_mean()._replace(accumulate=accumulate, hyperparams={"norm_bound": float(bound)})


def centered_clipping_aggregator(radius: float, num_iters: int) -> Aggregator:
    """Centered clipping around the previous round's aggregate (Karimireddy, He, Jaggi 2021,
    "Learning from History for Byzantine Robust Optimization"); the center is the aggregator's
    state (checkpointed). ``center_clip_radius`` is a round hyperparameter."""

    def init(like):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like)

    def finalize(state, gathered, key, hparams):
        del key
        out = centered_clipping(
            gathered.uploads,
            gathered.weights > 0,
            state,
            hparams.values["center_clip_radius"],
            num_iters=num_iters,
        )
        return out, out, {}

    return _gathering(finalize, init=init, hyperparams={"center_clip_radius": float(radius)})


# ----------------------------------------------------------------------------------- attacks
def malicious_clients(population: int, fraction: float, seed: int) -> np.ndarray:
    """The run's malicious clients: ``ceil(fraction * population)`` ids drawn once from the
    seed (the same in every round and on resume).

    Returns:
      ``[population]`` bool, True for a malicious client.
    """
    count = math.ceil(fraction * population) if fraction > 0 else 0
    order = np.random.default_rng([seed, 0xBAD]).permutation(population)
    table = np.zeros(population, bool)
    table[order[:count]] = True
    return table


def apply_attack(
    name: str,
    uploads: Any,
    malicious: jax.Array,
    benign: jax.Array,
    key: jax.Array,
    settings: Any,
) -> Any:
    """Replaces the malicious rows of a stacked upload by the named attack's.

    Args:
      name: ``sign_flip``, ``scaling``, ``gaussian``, ``alie`` or ``ipm``.
      uploads: per-client pytree ``[C, ...]``.
      malicious: ``[C]`` bool, delivered malicious clients.
      benign: ``[C]`` bool, delivered benign clients.
      key: a key for the random attacks.
      settings: a `fedjax_llm.config.ByzantineConfig`.

    Returns:
      The attacked uploads (benign rows unchanged).
    """
    if name == "sign_flip":
        return sign_flip(uploads, malicious, settings.scale)
    if name == "scaling":
        return scaling(uploads, malicious, settings.scale)
    if name == "gaussian":
        return gaussian_noise_attack(uploads, malicious, key, settings.noise_stddev)
    if name == "alie":
        return alie(uploads, malicious, benign, settings.alie_z)
    if name == "ipm":
        return ipm(uploads, malicious, benign, settings.ipm_epsilon)
    raise ValueError(f"unknown attack {name!r}.")


def with_attack(
    aggregator: Aggregator, malicious_table: np.ndarray, attack: str, settings: Any
) -> Aggregator:
    """Lets the malicious clients of a round replace their uploads before ``aggregator`` runs.

    The wrapper gathers every upload (the attacks of ALIE and IPM read the benign ones), applies
    the attack to the delivered malicious rows, and hands the result to ``aggregator``: as a
    `Gathered` if it gathers, else through its own start/accumulate in one step.

    Args:
      aggregator: the aggregator under attack.
      malicious_table: ``[population]`` bool from `malicious_clients`.
      attack: the attack's name (see `apply_attack`).
      settings: a `fedjax_llm.config.ByzantineConfig`.

    Returns:
      A gathering `Aggregator`; metrics add ``byzantine/malicious``, the delivered malicious
      clients of the round.
    """
    table = jnp.asarray(malicious_table)

    def finalize(state, gathered, key, hparams, **extra):
        attack_key, inner_key = jax.random.split(key)
        counted = gathered.weights > 0
        malicious = table[gathered.client_ids] & counted
        benign = counted & ~malicious
        uploads = apply_attack(attack, gathered.uploads, malicious, benign, attack_key, settings)
        if aggregator.gathers:
            inner_input = Gathered(uploads, gathered.weights, gathered.client_ids)
        else:
            like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), uploads)
            inner_input = aggregator.accumulate(
                aggregator.start(state, like), uploads, gathered.weights, state, hparams
            )
        out, state, metrics = aggregator.finalize(state, inner_input, inner_key, hparams, **extra)
        return out, state, {**metrics, "byzantine/malicious": jnp.sum(malicious)}

    return aggregator._replace(
        start=lambda state, like: (),
        accumulate=lambda acc, uploads, weights, state, hparams: acc,
        finalize=finalize,
        gathers=True,
    )
