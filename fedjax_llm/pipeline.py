"""The aggregation pipeline: what happens to client uploads between local training and the
server update, as small composable pieces in the style of optax.

::

    client_final -> ClientOutput -> UploadTransform.apply (per client, inside the vmap, with
    the client's key and state) -> Aggregator.accumulate (chunk by chunk; or gathered all at
    once) -> Aggregator.finalize(key) -> Algorithm.server_update(key)

An `UploadTransform` changes one client's upload (clip, quantize, compress with error
feedback, attack). It may keep server-side state (read by every client, updated once per round
from the summed per-client ``stats`` it emits) and per-client state (kept in the client store,
committed only for clients whose upload was delivered). `chain` composes transforms.

An `Aggregator` turns the uploads of a round into one aggregate. A *streaming* aggregator keeps
running sums (memory of one chunk); its accumulator must be a pytree of sums, because chunks and
devices are combined by adding accumulators (``psum`` across devices). A *gathering* aggregator
(``gathers=True``; median, trimmed mean, Krum) receives every sampled client's upload at once as
a `Gathered`; the round collects the chunk outputs and ``all_gather``s them across devices.

Round-varying scalars (clip norm, noise multiplier) are declared in ``hyperparams`` with their
default values; the simulator passes them as arrays in ``HyperParams.values``, so changing them
never recompiles.

The default pipeline, `default_pipeline`, is no transform and the weighted mean: FedAvg's
aggregation, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kernels import (
    clip_by_global_norm,
    coordinate_median,
    weighted_sum_finalize,
    weighted_sum_init,
    weighted_sum_update,
)
from kernels.pytree import PyTree

NO_HYPERPARAMS: Mapping[str, float] = MappingProxyType({})


class UploadTransform(NamedTuple):
    """A per-client transform of the upload, applied inside the vmap before aggregation.

    Attributes:
      init: ``(upload_like) -> state``: server-side state, seen read-only by every client of a
        round and updated by ``update`` after it (``()`` if none). ``upload_like`` is one
        client's `ClientOutput` as shape structs.
      client_init: ``(upload_like) -> client_state``: one client's persistent state before it
        is ever sampled (``()`` if none); the simulator keeps one per client.
      apply: ``(upload, state, client_state, key, hparams) -> (upload, client_state, stats)``:
        one client's transform. ``key`` is the client's own, never reused; ``stats`` is a dict
        of float32 scalars that the round sums over delivered clients (and devices) and passes
        to ``update`` and to the round's metrics.
      update: ``(state, stats, key, hparams) -> state``: the server-side update after the round.
      hyperparams: round-varying scalars this transform reads from ``hparams.values``, with
        their defaults.
    """

    init: Callable
    client_init: Callable
    apply: Callable
    update: Callable
    hyperparams: Mapping[str, float] = NO_HYPERPARAMS


class Gathered(NamedTuple):
    """Every sampled client's upload, for a gathering aggregator.

    Attributes:
      uploads: per-client pytree ``[C, ...]`` (C includes padding slots).
      weights: ``[C]`` aggregation weights; 0 for padding, dropped clients and clients that
        took no step. Such clients must contribute nothing (their uploads may hold garbage).
    """

    uploads: PyTree
    weights: jax.Array


class Aggregator(NamedTuple):
    """Turns a round's uploads into one aggregate.

    Attributes:
      init: ``(upload_like) -> state``: persistent state across rounds (``()`` if none),
        stored in the server state and checkpointed.
      start: ``(state, upload_like) -> accumulator``: the empty accumulator of a streaming
        aggregator: a pytree of sums (chunks and devices are combined by adding them).
      accumulate: ``(accumulator, uploads, weights, state, hparams) -> accumulator``: adds a
        chunk of uploads ``[c, ...]`` with their weights ``[c]`` (0 = contributes nothing).
      finalize: ``(state, accumulator_or_gathered, key, hparams) -> (aggregate, state,
        metrics)``: the aggregate (shaped like one upload), the new state and a dict of scalar
        metrics. Receives a `Gathered` when ``gathers`` is set.
      gathers: whether the aggregator needs every upload at once (``start``/``accumulate`` are
        then unused); the round then holds all sampled clients' uploads in memory.
      hyperparams: round-varying scalars this aggregator reads from ``hparams.values``.
      updates_when_empty: whether the server update runs in a round where no upload arrived.
        By default it is skipped (the server state stays exactly as it was: a momentum or Adam
        server would otherwise move on a zero aggregate). A differentially private aggregator
        sets it, since whether anyone participated must not show in the model.
    """

    init: Callable
    start: Callable
    accumulate: Callable
    finalize: Callable
    gathers: bool = False
    hyperparams: Mapping[str, float] = NO_HYPERPARAMS
    updates_when_empty: bool = False


class AggregationPipeline(NamedTuple):
    """The upload transform (a `chain` of them) and the aggregator of a round."""

    transform: UploadTransform
    aggregator: Aggregator

    @property
    def hyperparams(self) -> dict[str, float]:
        """Every round-varying scalar the pipeline declares, with its default."""
        return merge_hyperparams(self.transform.hyperparams, self.aggregator.hyperparams)


class PipelineState(NamedTuple):
    """Server-side state of the pipeline: the transform's and the aggregator's."""

    transform: PyTree
    aggregator: PyTree


def merge_hyperparams(*declared: Mapping[str, float]) -> dict[str, float]:
    """Merges declared hyperparameters, refusing one name declared twice with two defaults.

    Raises:
      ValueError: naming the clashing hyperparameter.
    """
    out: dict[str, float] = {}
    for mapping in declared:
        for name, value in mapping.items():
            if name in out and out[name] != value:
                raise ValueError(
                    f"hyperparameter {name!r} is declared twice with different defaults "
                    f"({out[name]} and {value}); give the pieces distinct names."
                )
            out[name] = value
    return out


# ------------------------------------------------------------------------------- transforms
def identity() -> UploadTransform:
    """The transform that uploads the client's output unchanged."""
    return UploadTransform(
        init=lambda like: (),
        client_init=lambda like: (),
        apply=lambda upload, state, client_state, key, hparams: (upload, client_state, {}),
        update=lambda state, stats, key, hparams: state,
    )


def chain(*transforms: UploadTransform) -> UploadTransform:
    """Composes upload transforms, applied left to right, like `optax.chain`.

    Each transform gets its own key (split from the client's), its own server and client state
    (tuples of the parts' states) and its stats keys unchanged (they must not clash).

    Args:
      *transforms: the transforms; none gives `identity`.

    Returns:
      One `UploadTransform`.
    """
    if not transforms:
        return identity()
    if len(transforms) == 1:
        return transforms[0]

    def init(like):
        return tuple(t.init(like) for t in transforms)

    def client_init(like):
        return tuple(t.client_init(like) for t in transforms)

    def apply(upload, state, client_state, key, hparams):
        keys = jax.random.split(key, len(transforms))
        new_client_states, stats = [], {}
        for t, s, cs, k in zip(transforms, state, client_state, keys, strict=True):
            upload, cs, part = t.apply(upload, s, cs, k, hparams)
            clash = set(part) & set(stats)
            if clash:
                raise ValueError(f"chained upload transforms both report stats {sorted(clash)}.")
            new_client_states.append(cs)
            stats.update(part)
        return upload, tuple(new_client_states), stats

    def update(state, stats, key, hparams):
        keys = jax.random.split(key, len(transforms))
        return tuple(
            t.update(s, stats, k, hparams) for t, s, k in zip(transforms, state, keys, strict=True)
        )

    return UploadTransform(
        init=init,
        client_init=client_init,
        apply=apply,
        update=update,
        hyperparams=merge_hyperparams(*(t.hyperparams for t in transforms)),
    )


def clip_upload(hyperparam: str = "clip_norm", default: float = 1.0) -> UploadTransform:
    """Clips each client's whole upload (every field of its `ClientOutput`) to an L2 norm.

    The norm is the round-varying hyperparameter ``hyperparam``; stats report how many
    delivered clients were clipped (``clip/clipped``) and their summed pre-clip norms
    (``clip/norm_sum``).

    Args:
      hyperparam: name of the clip-norm hyperparameter.
      default: its default value.

    Returns:
      The `UploadTransform`.
    """

    def apply(upload, state, client_state, key, hparams):
        del state, key
        max_norm = hparams.values[hyperparam]
        clipped, norm = clip_by_global_norm(upload, max_norm)
        stats = {"clip/clipped": (norm > max_norm).astype(jnp.float32), "clip/norm_sum": norm}
        return clipped, client_state, stats

    return identity()._replace(apply=apply, hyperparams={hyperparam: default})


# ------------------------------------------------------------------------------ aggregators
def weighted_mean() -> Aggregator:
    """The streaming weighted mean ``sum_i w_i x_i / sum_i w_i`` (FedAvg's aggregation)."""

    def finalize(state, sums, key, hparams):
        del key, hparams
        return weighted_sum_finalize(sums), state, {}

    return Aggregator(
        init=lambda like: (),
        start=lambda state, like: weighted_sum_init(like),
        accumulate=lambda sums, uploads, weights, state, hparams: weighted_sum_update(
            sums, uploads, weights
        ),
        finalize=finalize,
    )


def coordinate_median_aggregator() -> Aggregator:
    """The coordinate-wise median of the delivered uploads (a gathering aggregator).

    References:
      Yin et al. 2018, "Byzantine-Robust Distributed Learning".
    """

    def finalize(state, gathered, key, hparams):
        del key, hparams
        return coordinate_median(gathered.uploads, gathered.weights > 0), state, {}

    return Aggregator(
        init=lambda like: (),
        start=lambda state, like: (),
        accumulate=lambda acc, uploads, weights, state, hparams: acc,
        finalize=finalize,
        gathers=True,
    )


def default_pipeline() -> AggregationPipeline:
    """No transform and the streaming weighted mean: plain FedAvg aggregation."""
    return AggregationPipeline(identity(), weighted_mean())


def init_pipeline_state(pipeline: AggregationPipeline, upload_like: PyTree) -> PipelineState:
    """The pipeline's server-side state before the first round."""
    return PipelineState(
        pipeline.transform.init(upload_like), pipeline.aggregator.init(upload_like)
    )


# ------------------------------------------------------------------------------- registries
TRANSFORMS: dict[str, Callable[[Any], UploadTransform]] = {
    "clip": lambda config: clip_upload(default=config.aggregation.clip_norm),
}
"""Upload transforms by config name: ``name -> builder(ExperimentConfig)``."""

AGGREGATORS: dict[str, Callable[[Any], Aggregator]] = {
    "mean": lambda config: weighted_mean(),
    "median": lambda config: coordinate_median_aggregator(),
}
"""Aggregators by config name: ``name -> builder(ExperimentConfig)``."""


def register_transform(name: str, builder: Callable[[Any], UploadTransform]) -> None:
    """Registers an upload transform so configs can list it in ``aggregation.transforms``.

    Args:
      name: the name configs use.
      builder: ``(ExperimentConfig) -> UploadTransform``.
    """
    TRANSFORMS[name] = builder


def register_aggregator(name: str, builder: Callable[[Any], Aggregator]) -> None:
    """Registers an aggregator so configs can select it with ``aggregation.aggregator``.

    Args:
      name: the name configs use.
      builder: ``(ExperimentConfig) -> Aggregator``.
    """
    AGGREGATORS[name] = builder
