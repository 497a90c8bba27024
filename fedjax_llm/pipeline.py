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
never recompiles. A transform whose server state sets such a value for the round (adaptive
clipping's clip norm) declares ``overrides``; the round then gives every piece that value.

Pieces that run a protocol among the round's clients (secure aggregation's pairwise masks) or
treat clients by id (Byzantine attacks) set ``uses_context``: they then also receive the
round's `RoundContext` (the whole cohort and a key shared by its clients and the server).

The default pipeline, `default_pipeline`, is no transform and the weighted mean: FedAvg's
aggregation, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_llm.config import COMPRESSION_TRANSFORMS
from kernels import (
    clip_by_global_norm,
    coordinate_median,
    weighted_sum_finalize,
    weighted_sum_init,
    weighted_sum_update,
)
from kernels.pytree import PyTree

NO_HYPERPARAMS: Mapping[str, float] = MappingProxyType({})

RECORD_PREFIX = "record/"
"""Aggregator metrics whose names start with this are arrays, not scalars: per-slot uploads
and weights, the aggregate (`fedjax_llm.contribution.with_upload_record`). The round returns
them in ``RoundOutput.pipeline`` like any metric; the simulator takes them out
(`split_recorded`) before the scalar metrics are recorded."""


def split_recorded(metrics: Mapping[str, Any]) -> tuple[dict, dict]:
    """Splits a round's pipeline metrics into scalars and recorded arrays (`RECORD_PREFIX`).

    Args:
      metrics: ``RoundOutput.pipeline``.

    Returns:
      ``(scalars, recorded)``: the metrics without the prefix, and those with it (names kept).
    """
    scalars = {k: v for k, v in metrics.items() if not k.startswith(RECORD_PREFIX)}
    recorded = {k: v for k, v in metrics.items() if k.startswith(RECORD_PREFIX)}
    return scalars, recorded


class RoundContext(NamedTuple):
    """What a piece that needs the whole cohort knows about the round.

    Attributes:
      client_ids: ``[C]`` int32 ids of every slot of the round (padding slots hold any id).
      participating: ``[C]`` bool, the sampled clients (the cohort that trains and masks).
      delivered: ``[C]`` bool, the clients whose upload reaches the server.
      key: a key of the round shared by every client and the server (pairwise seeds of secure
        aggregation); distinct from every other key of the round.
      client_id: the id of the client this call serves (an int32 scalar); -1 on the server.
    """

    client_ids: jax.Array
    participating: jax.Array
    delivered: jax.Array
    key: jax.Array
    client_id: jax.Array


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
      overrides: ``(state) -> {name: scalar}``: round values that the server state sets for
        the coming round (adaptive clipping's clip norm); they replace the same names in
        ``hparams.values`` for every piece of the round (clients, aggregator, server). None if
        the transform sets nothing.
      uses_context: ``apply`` then takes a keyword argument ``context``, the round's
        `RoundContext` with ``client_id`` set to the client's.
    """

    init: Callable
    client_init: Callable
    apply: Callable
    update: Callable
    hyperparams: Mapping[str, float] = NO_HYPERPARAMS
    overrides: Callable | None = None
    uses_context: bool = False


class Gathered(NamedTuple):
    """Every sampled client's upload, for a gathering aggregator.

    Attributes:
      uploads: per-client pytree ``[C, ...]`` (C includes padding slots).
      weights: ``[C]`` aggregation weights; 0 for padding, dropped clients and clients that
        took no step. Such clients must contribute nothing (their uploads may hold garbage).
      client_ids: ``[C]`` int32 the slots' client ids (None where a caller gave none).
    """

    uploads: PyTree
    weights: jax.Array
    client_ids: jax.Array | None = None


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
        metrics (names starting with `RECORD_PREFIX` may hold arrays instead). Receives a
        `Gathered` when ``gathers`` is set.
      gathers: whether the aggregator needs every upload at once (``start``/``accumulate`` are
        then unused); the round then holds all sampled clients' uploads in memory.
      hyperparams: round-varying scalars this aggregator reads from ``hparams.values``.
      updates_when_empty: whether the server update runs in a round where no upload arrived.
        By default it is skipped (the server state stays exactly as it was: a momentum or Adam
        server would otherwise move on a zero aggregate). A differentially private aggregator
        sets it, since whether anyone participated must not show in the model.
      uses_context: ``finalize`` then takes a keyword argument ``context``, the round's
        `RoundContext` (with ``client_id`` -1).
    """

    init: Callable
    start: Callable
    accumulate: Callable
    finalize: Callable
    gathers: bool = False
    hyperparams: Mapping[str, float] = NO_HYPERPARAMS
    updates_when_empty: bool = False
    uses_context: bool = False


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

    def apply(upload, state, client_state, key, hparams, context=None):
        keys = jax.random.split(key, len(transforms))
        new_client_states, stats = [], {}
        for t, s, cs, k in zip(transforms, state, client_state, keys, strict=True):
            extra = {"context": context} if t.uses_context else {}
            upload, cs, part = t.apply(upload, s, cs, k, hparams, **extra)
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

    def overrides(state):
        out = {}
        for t, s in zip(transforms, state, strict=True):
            if t.overrides is not None:
                out.update(t.overrides(s))
        return out

    return UploadTransform(
        init=init,
        client_init=client_init,
        apply=apply,
        update=update,
        hyperparams=merge_hyperparams(*(t.hyperparams for t in transforms)),
        overrides=overrides if any(t.overrides is not None for t in transforms) else None,
        uses_context=any(t.uses_context for t in transforms),
    )


def with_overrides(transform: UploadTransform, state: PyTree, hparams: Any) -> Any:
    """The round's `HyperParams` with the values the transform's server state sets.

    Args:
      transform: the pipeline's (chained) upload transform.
      state: its server-side state.
      hparams: the `HyperParams` the simulator passed.

    Returns:
      ``hparams`` with ``values`` updated by ``transform.overrides(state)`` (unchanged if the
      transform declares none).
    """
    if transform.overrides is None:
        return hparams
    values = dict(hparams.values)
    for name, value in transform.overrides(state).items():
        if name not in values:
            raise ValueError(
                f"an upload transform overrides {name!r}, which nothing declares as a "
                "hyperparameter; declare it in the transform's hyperparams."
            )
        values[name] = jnp.asarray(value, jnp.float32)
    return hparams._replace(values=values)


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
def _compression(name: str) -> Callable[[Any], UploadTransform]:
    """A builder of `fedjax_llm.compression`'s transform ``name`` from ``config.aggregation``."""

    def build(config):
        from fedjax_llm import compression

        return compression.compression_transform(name, config)

    return build


TRANSFORMS: dict[str, Callable[[Any], UploadTransform]] = {
    "clip": lambda config: clip_upload(default=config.aggregation.clip_norm),
    **{name: _compression(name) for name in COMPRESSION_TRANSFORMS},
}
"""Upload transforms by config name: ``name -> builder(ExperimentConfig)``."""


def _robust(name: str) -> Callable[[Any], Aggregator]:
    """A builder of `fedjax_llm.robustness`'s aggregator ``name`` from ``config.aggregation``."""

    def build(config):
        from fedjax_llm import robustness

        a, b = config.aggregation, config.byzantine
        f = a.byzantine_bound
        if f is None:
            f = math.ceil(b.fraction * config.run.num_clients_per_round)
        builders = {
            "trimmed_mean": lambda: robustness.trimmed_mean_aggregator(a.trim_fraction),
            "krum": lambda: robustness.krum_aggregator(f),
            "multi_krum": lambda: robustness.krum_aggregator(
                f,
                a.multi_krum_selected or config.run.num_clients_per_round - f,
            ),
            "geometric_median": lambda: robustness.geometric_median_aggregator(
                a.geometric_median_iters
            ),
            "norm_bounding": lambda: robustness.norm_bounding_aggregator(a.norm_bound),
            "centered_clipping": lambda: robustness.centered_clipping_aggregator(
                a.center_clip_radius, a.center_clip_iters
            ),
        }
        return builders[name]()

    return build


AGGREGATORS: dict[str, Callable[[Any], Aggregator]] = {
    "mean": lambda config: weighted_mean(),
    "median": lambda config: coordinate_median_aggregator(),
    **{
        name: _robust(name)
        for name in (
            "trimmed_mean",
            "krum",
            "multi_krum",
            "geometric_median",
            "norm_bounding",
            "centered_clipping",
        )
    },
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
