"""Communication compression: upload transforms with per-client error feedback, and a
compressed broadcast with server-side error feedback.

A `Compressor` wraps one of `kernels.compression`'s compressors: ``compress(tree, key)`` gives
the dense reconstruction the receiver gets and the exact bytes of the message; ``message_bytes``
gives the same count from shapes alone. `compress_upload` turns a compressor into an
`UploadTransform` (config names ``topk``, ``randk``, ``qsgd``, ``sign``, ``lowrank`` in
``aggregation.transforms``) that compresses each client's whole `ClientOutput` (delta and
extra). With error feedback (the default) each client keeps a residual ``e`` in the client
store and sends ``C(u + e)`` for its upload ``u``; its new residual is ``u + e - C(u + e)``,
what compression left out, so nothing is ever lost, only delayed. The residual is committed
only for clients whose upload was delivered (a lost upload leaves the residual as it was).

`with_downlink_compression` wraps an `Algorithm` so that the server, too, sends a compressed
model change: it tracks the params the clients hold and broadcasts ``C(params - client
params)``; the gap it keeps is exactly the server-side error-feedback memory (bidirectional
compression, as DoubleSqueeze).

Stats each compressing transform reports (summed over delivered clients by the round; in the
metrics as ``pipeline/...``): ``compression/bytes_up``, the bytes of the messages, and
``compression/residual_norm_sum``, the L2 norms of what compression left out (the new
residuals, with error feedback). `fedjax_llm.simulation` then reports the exact ``bytes_up`` of
the round and the dense ``bytes_up_dense``.

References:
  Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel
  Distributed Training of Speech DNNs" (error feedback); Stich et al. 2018, "Sparsified SGD with
  Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes"; Alistarh et al. 2017, "QSGD"; Vogels et al. 2019, "PowerSGD"; Tang et
  al. 2019, "DoubleSqueeze: Parallel Stochastic Gradient Descent with Double-Pass
  Error-Compensated Compression".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_llm.algorithms.base import Algorithm, inner_state_hooks
from fedjax_llm.pipeline import UploadTransform
from kernels import (
    global_norm,
    low_rank,
    low_rank_bytes,
    random_k,
    random_k_bytes,
    scaled_sign,
    scaled_sign_bytes,
    stochastic_quantize,
    stochastic_quantize_bytes,
    top_k,
    top_k_bytes,
)
from kernels.pytree import PyTree

BYTES_STAT = "compression/bytes_up"
"""The stat holding a client's message bytes (summed over the round's delivered clients)."""
RESIDUAL_STAT = "compression/residual_norm_sum"
"""The stat holding the L2 norm of what compression left out (summed over delivered clients)."""
DOWNLINK_STREAM = 2**31 - 1
"""``fold_in`` data of the broadcast compression's key, from the server update's key."""


class Compressor(NamedTuple):
    """A lossy compressor of one pytree with an exact message size.

    Attributes:
      compress: ``(tree, key) -> (reconstruction, num_bytes)``: the dense pytree the receiver
        reconstructs (same structure, shapes and dtypes) and the message's bytes. Jittable.
      message_bytes: ``(tree_like) -> int``: the message's bytes from shapes alone (arrays or
        `jax.ShapeDtypeStruct`).
    """

    compress: Callable[[PyTree, jax.Array], tuple[PyTree, Any]]
    message_bytes: Callable[[PyTree], int]


def topk_compressor(ratio: float) -> Compressor:
    """Global top-k sparsification (`kernels.top_k`): ``ceil(ratio * n)`` values and indices.

    Args:
      ratio: the share of values kept, in (0, 1].
    """
    return Compressor(
        compress=lambda tree, key: top_k(tree, ratio),
        message_bytes=lambda like: top_k_bytes(like, ratio),
    )


def randk_compressor(ratio: float, unbiased: bool = True) -> Compressor:
    """Global random-k sparsification (`kernels.random_k`): ``ceil(ratio * n)`` values + a seed.

    Args:
      ratio: the share of values kept, in (0, 1].
      unbiased: scale the kept values by ``n / k`` (without error feedback); off with error
        feedback.
    """
    return Compressor(
        compress=lambda tree, key: random_k(tree, ratio, key, unbiased=unbiased),
        message_bytes=lambda like: random_k_bytes(like, ratio),
    )


def qsgd_compressor(bits: int, scale: str = "max_abs") -> Compressor:
    """Unbiased stochastic quantization to ``bits`` bits per value, one scale per leaf
    (`kernels.stochastic_quantize`).

    Args:
      bits: bits per value, in [2, 16].
      scale: ``max_abs`` or ``l2``.
    """
    return Compressor(
        compress=lambda tree, key: stochastic_quantize(tree, bits, key, scale=scale),
        message_bytes=lambda like: stochastic_quantize_bytes(like, bits),
    )


def sign_compressor() -> Compressor:
    """The scaled sign ``||x||_1 / n * sign(x)`` per leaf (`kernels.scaled_sign`)."""
    return Compressor(
        compress=lambda tree, key: scaled_sign(tree),
        message_bytes=scaled_sign_bytes,
    )


def lowrank_compressor(rank: int) -> Compressor:
    """PowerSGD's rank-``rank`` factors of each matrix leaf, vectors dense (`kernels.low_rank`).

    Args:
      rank: the rank, >= 1.
    """
    return Compressor(
        compress=lambda tree, key: low_rank(tree, rank, key),
        message_bytes=lambda like: low_rank_bytes(like, rank),
    )


def compress_upload(compressor: Compressor, error_feedback: bool = True) -> UploadTransform:
    """The upload transform that sends each client's model change through ``compressor``.

    The change (``ClientOutput.delta``) is compressed; the algorithm's side information
    (``ClientOutput.extra``: SCAFFOLD's control change, FedNova's step count, ...) is sent
    dense, since an algorithm's bookkeeping must arrive intact. With error feedback the
    client's residual ``e`` (zeros before its first round, kept in the
    client store) is added before compressing: it sends ``C(u + e)`` and keeps ``u + e - C(u +
    e)``. So over any number of rounds the sum of what a client sent plus its last residual is
    the sum of its raw uploads. Without it, ``C(u)`` is sent and what it drops is lost.

    Stats (float32, per client; the round sums them over delivered clients): ``BYTES_STAT``,
    the message's bytes, and ``RESIDUAL_STAT``, the L2 norm of what compression left out this
    round.

    Args:
      compressor: the `Compressor`.
      error_feedback: keep and add the per-client residual.

    Returns:
      The `UploadTransform`.

    References:
      Seide et al. 2014 (1-bit SGD with error feedback); Stich et al. 2018, "Sparsified SGD
      with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD".
    """

    def client_init(like):
        if not error_feedback:
            return ()
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like.delta)

    def apply(upload, state, client_state, key, hparams):
        del state, hparams
        delta = upload.delta
        target = jax.tree.map(lambda u, e: u + e, delta, client_state) if error_feedback else delta
        sent, num_bytes = compressor.compress(target, key)
        sent = jax.tree.map(lambda s, u: s.astype(u.dtype), sent, delta)
        left_out = jax.tree.map(lambda t, s: t - s, target, sent)
        stats = {
            BYTES_STAT: jnp.asarray(num_bytes + dense_bytes(upload.extra), jnp.float32),
            RESIDUAL_STAT: global_norm(left_out),
        }
        return upload._replace(delta=sent), left_out if error_feedback else client_state, stats

    return UploadTransform(
        init=lambda like: (),
        client_init=client_init,
        apply=apply,
        update=lambda state, stats, key, hparams: state,
    )


# ------------------------------------------------------------------------------ from configs
COMPRESSORS: dict[str, Callable[[Any], Compressor]] = {
    "topk": lambda config: topk_compressor(config.aggregation.compression_ratio),
    "randk": lambda config: randk_compressor(
        config.aggregation.compression_ratio,
        unbiased=not config.aggregation.error_feedback,
    ),
    "qsgd": lambda config: qsgd_compressor(config.aggregation.quantization_bits),
    "sign": lambda config: sign_compressor(),
    "lowrank": lambda config: lowrank_compressor(config.aggregation.lowrank_rank),
}
"""The built-in compressors by transform name: ``name -> builder(ExperimentConfig)``. Random-k
is unbiased (scaled by ``n / k``) exactly when error feedback is off."""


def compression_transform(name: str, config: Any) -> UploadTransform:
    """The upload transform ``name`` of `COMPRESSORS`, set up from ``config.aggregation``.

    Args:
      name: ``topk``, ``randk``, ``qsgd``, ``sign`` or ``lowrank``.
      config: the `ExperimentConfig` (``aggregation.compression_ratio``,
        ``quantization_bits``, ``lowrank_rank``, ``error_feedback``).

    Returns:
      ``compress_upload(COMPRESSORS[name](config), config.aggregation.error_feedback)``.
    """
    return compress_upload(COMPRESSORS[name](config), config.aggregation.error_feedback)


def compressed_upload_bytes(config: Any, upload_like: PyTree) -> int | None:
    """The exact bytes of one client's compressed upload under ``config``, from shapes alone.

    Args:
      config: the `ExperimentConfig`.
      upload_like: one client's `ClientOutput` (arrays or shape structs).

    Returns:
      The bytes of the (one) compressing transform of ``aggregation.transforms``, or None if
      the config names none.
    """
    for name in config.aggregation.transforms:
        if name in COMPRESSORS:
            compressed = COMPRESSORS[name](config).message_bytes(upload_like.delta)
            return compressed + dense_bytes(upload_like.extra)
    return None


def dense_bytes(tree: PyTree) -> int:
    """Bytes of a pytree sent uncompressed (its arrays' or shape structs' sizes)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------- downlink
class DownlinkState(NamedTuple):
    """Server state of an algorithm wrapped by `with_downlink_compression`.

    Attributes:
      inner: the wrapped algorithm's server state (its params are the server's model).
      client_params: the params every client holds and trains from (the server's model less
        the server-side residual).
      message_bytes: int32, the bytes of each round's compressed broadcast change.
    """

    inner: PyTree
    client_params: PyTree
    message_bytes: jax.Array


def with_downlink_compression(
    algorithm: Algorithm, compressor: Compressor, error_feedback: bool = True
) -> Algorithm:
    """Wraps an algorithm so that its broadcast is a compressed change of the model.

    The server keeps the params its clients hold, ``x_c``, beside its own model ``x`` (the
    wrapped algorithm's, which evaluation and `Algorithm.server_params` report). Clients train
    from ``x_c`` (the broadcast's ``params``; the rest of the broadcast, e.g. SCAFFOLD's
    control, is unchanged and sent dense). After each server update it sends ``C(x - x_c)`` and
    sets ``x_c += C(x - x_c)``: the gap ``x - x_c`` is the server-side error-feedback memory,
    carried into the next message. Without error feedback it sends ``C(x - x_prev)``, the
    round's update alone, and what that drops is never sent.

    Every client is assumed to receive every round's broadcast change (DoubleSqueeze's setting,
    where all workers hold the same model); a client that skipped rounds would need the missed
    changes too, which this does not count. The key of the compression is ``fold_in(key,
    DOWNLINK_STREAM)`` of the server update's key, which the wrapped update receives unchanged.

    Args:
      algorithm: the algorithm to wrap (its broadcast must be a NamedTuple with ``params``).
      compressor: the broadcast's `Compressor`.
      error_feedback: keep the gap between the server's and the clients' params.

    Returns:
      The wrapped `Algorithm`; its server state is a `DownlinkState`.

    References:
      Tang et al. 2019, "DoubleSqueeze: Parallel Stochastic Gradient Descent with Double-Pass
      Error-Compensated Compression"; Philippenko and Dieuleveut 2020, "Bidirectional
      Compression in Heterogeneous Settings for Distributed or Federated Learning with Partial
      Participation" (Artemis).
    """

    def server_init(params, *frozen):
        inner = algorithm.server_init(params, *frozen)
        num_bytes = compressor.message_bytes(params)
        # A copy: the round donates its state, and one buffer must not appear in it twice.
        client_params = jax.tree.map(jnp.copy, params)
        return DownlinkState(inner, client_params, jnp.asarray(num_bytes, jnp.int32))

    def server_params(state):
        return algorithm.server_params(state.inner)

    def broadcast(state):
        return algorithm.broadcast(state.inner)._replace(params=state.client_params)

    def server_update(state, aggregate, info, key):
        inner = algorithm.server_update(state.inner, aggregate, info, key)
        new = algorithm.server_params(inner)
        base = state.client_params if error_feedback else algorithm.server_params(state.inner)
        change = jax.tree.map(lambda a, b: a - b, new, base)
        sent, _ = compressor.compress(change, jax.random.fold_in(key, DOWNLINK_STREAM))
        client_params = jax.tree.map(
            lambda c, s: (c + s).astype(c.dtype), state.client_params, sent
        )
        return DownlinkState(inner, client_params, state.message_bytes)

    server_frozen, server_metrics = inner_state_hooks(algorithm)

    return algorithm._replace(
        server_init=server_init,
        server_params=server_params,
        broadcast=broadcast,
        server_update=server_update,
        server_frozen=server_frozen,
        server_metrics=server_metrics,
    )


def downlink_bytes(server_state: PyTree, broadcast_like: PyTree) -> int | None:
    """Bytes one client downloads per round under `with_downlink_compression`.

    Args:
      server_state: the algorithm's server state.
      broadcast_like: its broadcast (arrays or shape structs).

    Returns:
      The compressed change's bytes plus the dense bytes of the rest of the broadcast, or None
      if ``server_state`` is not a `DownlinkState` (nor wraps one as its ``inner``, as the
      server state of `fedjax_llm.public_training.with_public_steps` does).
    """
    while not isinstance(server_state, DownlinkState) and hasattr(server_state, "inner"):
        server_state = server_state.inner
    if not isinstance(server_state, DownlinkState):
        return None

    rest = dense_bytes(broadcast_like) - dense_bytes(broadcast_like.params)
    return int(server_state.message_bytes) + rest
