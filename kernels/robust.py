"""Robust aggregation over a leading client axis, for gathering aggregators.

Every kernel takes a per-client pytree ``stacked`` with leaves ``[C, *shape]`` and says which
rows count with a ``[C]`` mask (or weights): a row that does not count is ignored completely,
even if it holds NaN or inf. The number of counted clients is dynamic, the per-round
hyperparameters (trim fraction, number of Byzantine clients, bounds, radii) may be traced arrays,
so changing them never recompiles. Results are params-shaped float32 pytrees, zeros where no
client counts.

References:
  Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
  (coordinate-wise median, coordinate-wise trimmed mean).
  Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent" (Krum, multi-Krum).
  Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation for Federated Learning" (RFA, the
  smoothed Weiszfeld geometric median).
  Sun et al. 2019, "Can You Really Backdoor Federated Learning?" (norm bounding).
  Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization"
  (centered clipping).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kernels.aggregation import weighted_mean
from kernels.pytree import PyTree

_TINY = float(np.finfo(np.float32).tiny)


def coordinate_median(stacked: PyTree, mask: jax.Array) -> PyTree:
    """Coordinate-wise median over the clients whose mask is set.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count; masked clients are ignored even if they
        hold NaN.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.
    """
    mask = mask > 0

    def median(x):
        x = x.astype(jnp.float32)
        m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        # NaN marks a missing client: nanmedian skips it. A real NaN in a counted client is
        # first replaced by +inf so that it cannot vanish from the median silently.
        x = jnp.where(jnp.isnan(x), jnp.inf, x)
        out = jnp.nanmedian(jnp.where(m, x, jnp.nan), axis=0)
        return jnp.where(jnp.any(mask), out, 0.0)

    return jax.tree.map(median, stacked)


# --- helpers ----------------------------------------------------------------------------------


def _counted(mask: ArrayLike) -> jax.Array:
    """``[C]`` bool: which rows count."""
    return jnp.asarray(mask) > 0


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``mask`` reshaped to broadcast against a ``[C, *shape]`` leaf."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _zero_uncounted(stacked: PyTree, mask: jax.Array) -> PyTree:
    """The stack in float32 with the rows that do not count set to zero (their NaN/inf gone)."""
    return jax.tree.map(lambda x: jnp.where(_rows(mask, x), x.astype(jnp.float32), 0.0), stacked)


def _client_norms(stacked: PyTree) -> jax.Array:
    """``[C]`` global L2 norm of each client's pytree (float32)."""
    leaves = jax.tree.leaves(stacked)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in leaves))


def flatten_clients(stacked: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens each client's pytree into one row.

    Args:
      stacked: per-client pytree ``[C, *shape]`` with at least one leaf.

    Returns:
      The ``[C, P]`` float32 matrix whose row ``i`` is client ``i``'s leaves raveled and
      concatenated (in `jax.tree.leaves` order), and ``unflatten``, which maps a ``[P]`` vector
      back to a params-shaped pytree (float32, no client axis).
    """
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        raise ValueError("flatten_clients needs a pytree with at least one leaf")
    num_clients = leaves[0].shape[0]
    shapes = [x.shape[1:] for x in leaves]
    rows = [x.astype(jnp.float32).reshape(num_clients, math.prod(x.shape[1:])) for x in leaves]
    matrix = jnp.concatenate(rows, axis=1)
    splits = np.cumsum([math.prod(s) for s in shapes])[:-1].tolist()

    def unflatten(vector: jax.Array) -> PyTree:
        parts = jnp.split(jnp.asarray(vector, jnp.float32), splits)
        return jax.tree.unflatten(
            treedef, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        )

    return matrix, unflatten


# --- coordinate-wise trimmed mean -------------------------------------------------------------


def trimmed_mean(stacked: PyTree, mask: ArrayLike, trim_fraction: ArrayLike) -> PyTree:
    """Coordinate-wise trimmed mean over the clients whose mask is set (Yin et al. 2018).

    Per coordinate, the ``k = floor(trim_fraction * n)`` largest and ``k`` smallest of the ``n``
    counted values are dropped and the remaining ``n - 2k`` averaged. ``k`` is capped at
    ``(n - 1) // 2`` so that at least one value remains: ``trim_fraction >= 0.5`` gives the
    coordinate-wise median. A NaN in a counted client counts as +inf (so it is trimmed, never
    silently dropped).

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      trim_fraction: the fraction beta in [0, 1/2) trimmed at each end; may be a traced array.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.

    References:
      Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
      Rates", Definition 2 (coordinate-wise trimmed mean).
    """
    mask = _counted(mask)
    n = jnp.sum(mask, dtype=jnp.int32)
    beta = jnp.clip(jnp.asarray(trim_fraction, jnp.float32), 0.0, 0.5)
    # A small slack so that e.g. 0.3 * 10 (= 2.9999998 in float32) trims 3, not 2.
    k = jnp.floor(beta * n.astype(jnp.float32) + 1e-4).astype(jnp.int32)
    k = jnp.clip(k, 0, jnp.maximum((n - 1) // 2, 0))
    kept = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)

    def trim(x):
        x = x.astype(jnp.float32)
        x = jnp.where(jnp.isnan(x), jnp.inf, x)
        # Uncounted rows sort after every counted value, so ranks [0, n) are the counted ones.
        ordered = jnp.sort(jnp.where(_rows(mask, x), x, jnp.inf), axis=0)
        rank = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        keep = (rank >= k) & (rank < n - k)
        out = jnp.sum(jnp.where(keep, ordered, 0.0), axis=0) / kept
        return jnp.where(n > 0, out, 0.0)

    return jax.tree.map(trim, stacked)


# --- Krum and multi-Krum ----------------------------------------------------------------------


def _pairwise_sq_distances(matrix: jax.Array) -> jax.Array:
    """``[C, C]`` squared distances between rows, from the differences themselves.

    One row at a time (``[C, P]`` memory), rather than through the Gram matrix, whose
    cancellation an attacker with a huge upload could exploit.
    """
    return jax.lax.map(lambda row: jnp.sum(jnp.square(matrix - row), axis=1), matrix)


def krum_scores(stacked: PyTree, mask: ArrayLike, num_byzantine: ArrayLike) -> jax.Array:
    """Krum scores: each counted client's summed squared distance to its nearest neighbours.

    ``score_i`` is the sum of the squared L2 distances (over the whole pytree) from client ``i``
    to its ``n - f - 2`` nearest other counted clients, with ``n`` the number of counted clients
    and ``f = num_byzantine``. Where ``n - f - 2 < 1`` (more Byzantine clients than Krum
    tolerates) the single nearest neighbour is used; a lone counted client scores 0.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      num_byzantine: ``f``, the assumed number of Byzantine clients; may be a traced array.

    Returns:
      ``[C]`` float32 scores, lower is more central; +inf for clients that do not count, and for
      counted clients whose upload is not finite (they are infinitely far from everyone).

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
      Descent", Section 4 (Krum).
    """
    mask = _counted(mask)
    matrix, _ = flatten_clients(_zero_uncounted(stacked, mask))
    num_clients = matrix.shape[0]
    n = jnp.sum(mask, dtype=jnp.int32)
    f = jnp.asarray(num_byzantine).astype(jnp.int32)
    num_neighbours = jnp.clip(n - f - 2, 1, n - 1)

    dist = _pairwise_sq_distances(matrix)
    dist = jnp.where(jnp.isnan(dist), jnp.inf, dist)  # inf - inf in a non-finite upload
    others = mask[None, :] & ~jnp.eye(num_clients, dtype=bool)
    nearest = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    rank = jax.lax.broadcasted_iota(jnp.int32, nearest.shape, 1)
    scores = jnp.sum(jnp.where(rank < num_neighbours, nearest, 0.0), axis=1)
    return jnp.where(mask, scores, jnp.inf)


def krum_selection(
    stacked: PyTree,
    mask: ArrayLike,
    num_byzantine: ArrayLike,
    num_selected: ArrayLike = 1,
) -> jax.Array:
    """Which clients (multi-)Krum selects: the ``m`` counted clients of lowest Krum score.

    Ties are broken by the lower client index; ``m`` is clipped to ``[1, n]``.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      num_byzantine: ``f``, the assumed number of Byzantine clients; may be a traced array.
      num_selected: ``m``, how many clients to select (1 is Krum); may be a traced array.

    Returns:
      ``[C]`` float32 selection weights, 1 for the selected clients and 0 elsewhere (all 0 where
      no client counts).

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
      Descent", Section 4 (Krum) and Section 5 (multi-Krum).
    """
    mask = _counted(mask)
    scores = krum_scores(stacked, mask, num_byzantine)
    scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
    n = jnp.sum(mask, dtype=jnp.int32)
    m = jnp.clip(jnp.asarray(num_selected).astype(jnp.int32), 1, n)
    # Rank by (does not count, score, index): a strict total order, so exactly m are selected.
    index = jnp.arange(scores.shape[0])
    uncounted = ~mask
    before = (uncounted[None, :] < uncounted[:, None]) | (
        (uncounted[None, :] == uncounted[:, None])
        & (
            (scores[None, :] < scores[:, None])
            | ((scores[None, :] == scores[:, None]) & (index[None, :] < index[:, None]))
        )
    )
    rank = jnp.sum(before, axis=1)
    return ((rank < m) & mask).astype(jnp.float32)


def krum(
    stacked: PyTree,
    mask: ArrayLike,
    num_byzantine: ArrayLike,
    num_selected: ArrayLike | None = None,
) -> PyTree:
    """Krum (``num_selected=None`` or 1) or multi-Krum: the mean of the selected uploads.

    See `krum_selection` for which clients are selected and `krum_scores` for their scores.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      num_byzantine: ``f``, the assumed number of Byzantine clients; may be a traced array.
      num_selected: ``m``, how many of the lowest-score clients to average; None means Krum
        (``m = 1``); an int or a traced array.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
      Descent", Section 4 (Krum) and Section 5 (multi-Krum).
    """
    if num_selected is None:
        num_selected = 1
    selection = krum_selection(stacked, mask, num_byzantine, num_selected)
    return weighted_mean(stacked, selection)


# --- geometric median -------------------------------------------------------------------------


def geometric_median(
    stacked: PyTree,
    mask: ArrayLike,
    weights: ArrayLike | None = None,
    num_iters: int = 10,
    eps: ArrayLike = 1e-6,
) -> PyTree:
    """Weighted geometric median by the smoothed Weiszfeld algorithm of RFA.

    Approximately minimizes ``sum_i w_i max(eps, ||v - x_i||)`` over ``v`` (L2 norm over the
    whole pytree), starting from the weighted mean and iterating
    ``v <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(eps, ||v - x_i||)``.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      weights: ``[C]`` non-negative weights (e.g. example counts); default the mask. Only
        clients that count and have a positive weight take part.
      num_iters: number of Weiszfeld iterations (a Python int).
      eps: the smoothing nu > 0 that keeps a step near a data point finite; may be traced.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.

    References:
      Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation for Federated Learning",
      Algorithm 3 (smoothed Weiszfeld); Weiszfeld 1937.
    """
    mask = _counted(mask)
    if weights is None:
        w = mask.astype(jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        mask = mask & (w > 0)
        w = jnp.where(mask, w, 0.0)
    matrix, unflatten = flatten_clients(_zero_uncounted(stacked, mask))
    eps = jnp.asarray(eps, jnp.float32)

    def average(beta):
        return jnp.sum(beta[:, None] * matrix, axis=0) / jnp.maximum(jnp.sum(beta), _TINY)

    def step(_, v):
        dist = jnp.sqrt(jnp.sum(jnp.square(matrix - v), axis=1))
        beta = jnp.where(mask, w / jnp.maximum(eps, dist), 0.0)
        return average(beta)

    v = jax.lax.fori_loop(0, num_iters, step, average(w))
    return unflatten(v)


# --- norm bounding ----------------------------------------------------------------------------


def norm_bounded_mean(stacked: PyTree, weights: ArrayLike, bound: ArrayLike) -> PyTree:
    """Weighted mean of the uploads after clipping each to a global L2 norm of ``bound``.

    Client ``i``'s whole upload (L2 norm over the pytree) is scaled by
    ``min(1, bound / ||x_i||)``; a counted client with a non-finite upload makes the result
    non-finite.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      weights: ``[C]`` non-negative weights; 0 means the client does not count (its NaN/inf is
        ignored).
      bound: the norm bound M > 0; may be a traced array.

    Returns:
      A params-shaped pytree (float32); zeros where no client counts.

    References:
      Sun et al. 2019, "Can You Really Backdoor Federated Learning?", Section 3 (norm
      thresholding of updates).
    """
    weights = jnp.asarray(weights, jnp.float32)
    mask = weights > 0
    clean = _zero_uncounted(stacked, mask)
    norms = _client_norms(clean)
    scale = jnp.minimum(1.0, jnp.asarray(bound, jnp.float32) / jnp.maximum(norms, _TINY))
    clipped = jax.tree.map(lambda x: x * _rows(scale, x), clean)
    return weighted_mean(clipped, weights)


# --- centered clipping ------------------------------------------------------------------------


def centered_clipping(
    stacked: PyTree,
    mask: ArrayLike,
    center: PyTree,
    radius: ArrayLike,
    num_iters: int = 1,
) -> PyTree:
    """Centered clipping: steps from ``center`` by the mean of the clipped differences.

    Iterates ``v <- v + (1/n) sum_i clip(x_i - v, radius)`` over the ``n`` counted clients,
    where ``clip(d, r) = d * min(1, r / ||d||)`` with the L2 norm over the whole pytree.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      mask: ``[C]`` bool or 0/1, which clients count.
      center: params-shaped pytree to start from, e.g. the previous round's aggregate (or the
        server momentum).
      radius: the clipping radius tau > 0; may be a traced array.
      num_iters: number of clipping iterations L (a Python int).

    Returns:
      A params-shaped pytree (float32); zeros (not ``center``) where no client counts, as for
      the other kernels.

    References:
      Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization",
      Section 4 (centered clipping, CC).
    """
    mask = _counted(mask)
    n = jnp.sum(mask, dtype=jnp.int32)
    clean = _zero_uncounted(stacked, mask)
    radius = jnp.asarray(radius, jnp.float32)
    denom = jnp.maximum(n, 1).astype(jnp.float32)

    def step(_, v):
        diff = jax.tree.map(lambda x, c: jnp.where(_rows(mask, x), x - c, 0.0), clean, v)
        scale = jnp.minimum(1.0, radius / jnp.maximum(_client_norms(diff), _TINY))
        return jax.tree.map(lambda c, d: c + jnp.sum(d * _rows(scale, d), axis=0) / denom, v, diff)

    v = jax.tree.map(lambda c: jnp.asarray(c, jnp.float32), center)
    v = jax.lax.fori_loop(0, num_iters, step, v)
    return jax.tree.map(lambda c: jnp.where(n > 0, c, 0.0), v)
