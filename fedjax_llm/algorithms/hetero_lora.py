"""LoRA at a different rank per client: HetLoRA, FlexLoRA, FLoRA and FFA-LoRA.

Clients of different capability hold LoRA adapters of different ranks (``system.tier_lora_ranks``,
`fedjax_llm.client_profiles.LORA_RANK`). The round is compiled once for the maximum rank R
(``trainable.lora_rank``); a client of rank r trains only the first r components (its factors
are masked: ``a[..., :r]`` and ``b[..., :r, :]``; the rest stay exactly zero), so the ranks are
data, never shapes, and changing them never recompiles. Every client uses the LoRA scaling
alpha / R of the compiled maximum.

The four published ways to aggregate adapters of different ranks (trainable params are
``{target: {"a": [L, d_in, R], "b": [L, R, d_out]}}``, the update of a projection being
``scaling * a @ b``):

- **HetLoRA** (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
  Foundation Models"): clients get the global adapter truncated to their rank; the server
  averages the zero-padded client adapters weighted by their example counts times their
  update's Frobenius norm ``||a_i b_i||_F`` (sparsity-weighted aggregation); optional rank
  self-pruning: a regularizer ``lambda / 2 ||tail||^2`` on each client's last component, which
  the client drops (its rank falls by one, kept in its client state) when that component's
  share of the adapter ``||a_r|| ||b_r|| / mean_j ||a_j|| ||b_j||`` falls below a threshold.
- **FlexLoRA** (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources"): the server averages the clients' full-size
  products ``a_i b_i`` and redistributes them by truncated SVD: the global adapter is the best
  rank-R approximation of the average, and a client of rank r takes its first r components,
  the best rank-r approximation (Eckart-Young).
- **FLoRA** (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
  Heterogeneous Low-Rank Adaptations"): the clients' factors are stacked,
  ``[p_1 a_1, ..., p_n a_n] [b_1; ...; b_n] = sum_i p_i a_i b_i``, the exact average of the
  products (`stack_lora`), merged into the frozen base every round; each round starts from a
  fresh adapter (``a`` random, ``b`` zero).
- **FFA-LoRA** (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
  ``a`` stays frozen at its shared initialization and only ``b`` is trained and averaged, so
  ``mean(b) a = mean(b a)`` exactly. With ranks per client (which the paper does not cover),
  each rank component of ``b`` is averaged over the clients that train it.

Each client sends only its adapter's change (zero-padded to the compiled maximum rank R, which
is what ``bytes_up`` counts; FFA-LoRA sends only ``b``'s change and the R flags of the
components it holds, no flags under client-level DP or secure aggregation, where the server
divides by the expected holders instead).
What the server computes from a delivered message before aggregating it is the algorithm's
`Algorithm.expand_upload` (FlexLoRA's and FLoRA's full-size products, HetLoRA's sparsity
weight), so a compressed message is expanded after decompression, as in deployment. FFA-LoRA
expands nothing: its message is a FedAvg upload, which is why it is the one of the four that
client-level DP and secure aggregation can cover (the paper's point).

Every one of them reports ``lora/aggregation_error``: the relative Frobenius error
``||mean(a) mean(b) - mean(a b)|| / ||mean(a b)||`` that averaging the factors separately
would make on this round's client adapters (exactly 0 for FFA-LoRA), computed by the server from the
messages: each client's factors and ``a_i (b_i Z)`` for a fixed probe matrix ``Z`` (the identity
when d_out <= `ERROR_PROBES`, which makes the error exact; otherwise a Gaussian sketch of
`ERROR_PROBES` columns, an unbiased estimate of the squared norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import (
    Algorithm,
    Broadcast,
    ClientOutput,
    ClientTrainState,
    ServerState,
    init_client_optimizer,
    server_optimizer_update,
    sgd_step,
    tree_sub,
)
from fedjax_llm.client_profiles import LORA_RANK
from fedjax_llm.models.lora import merge_into_base
from kernels.ordering import after
from kernels.pytree import PyTree

ERROR_PROBES = 64
"""Columns of the probe matrix of ``lora/aggregation_error`` (exact when d_out is at most this)."""


# ------------------------------------------------------------------------- rank masking
def max_rank(params: PyTree) -> int:
    """The compiled maximum rank R of LoRA params ``{target: {"a", "b"}}``."""
    ranks = {factors["a"].shape[-1] for factors in params.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA targets have different ranks {sorted(ranks)}.")
    return ranks.pop()


def with_client_rank(hparams, params: PyTree):
    """``hparams`` whose values hold the client's LoRA rank: its profile's `LORA_RANK`, or the
    compiled maximum when no rank tiers are configured."""
    if LORA_RANK in hparams.values:
        return hparams
    return hparams._replace(values={**hparams.values, LORA_RANK: jnp.float32(max_rank(params))})


def rank_masks(params: PyTree, rank: jax.Array) -> PyTree:
    """Masks shaped like LoRA params keeping the first ``rank`` components of every factor."""
    rank_max = max_rank(params)
    keep = (jnp.arange(rank_max) < rank).astype(jnp.float32)
    return {target: {"a": keep[None, None, :], "b": keep[None, :, None]} for target in params}


def truncate(params: PyTree, rank: jax.Array) -> PyTree:
    """LoRA params with every component from ``rank`` on set to zero (zero-padded rank r)."""
    return jax.tree.map(lambda x, m: (x * m).astype(x.dtype), params, rank_masks(params, rank))


def lora_products(params: PyTree) -> PyTree:
    """``{target: a @ b}``, each ``[L, d_in, d_out]`` (float32)."""
    return {
        target: jnp.matmul(f["a"].astype(jnp.float32), f["b"].astype(jnp.float32))
        for target, f in params.items()
    }


def product_sq_norm(params: PyTree) -> jax.Array:
    """``sum_targets ||a @ b||_F^2`` without forming the products: ``sum (a^T a) * (b b^T)``."""
    total = jnp.float32(0.0)
    for f in params.values():
        a, b = f["a"].astype(jnp.float32), f["b"].astype(jnp.float32)
        gram_a = jnp.einsum("lir,lis->lrs", a, a)
        gram_b = jnp.einsum("lrj,lsj->lrs", b, b)
        total = total + jnp.sum(gram_a * gram_b)
    return total


def component_norms(params: PyTree) -> jax.Array:
    """``[R]`` each rank component's norm ``sqrt(sum_{targets, layers} ||a_j||^2 ||b_j||^2)``."""
    total = 0.0
    for f in params.values():
        a, b = f["a"].astype(jnp.float32), f["b"].astype(jnp.float32)
        total = total + jnp.sum(jnp.sum(a**2, axis=1) * jnp.sum(b**2, axis=2), axis=0)
    return jnp.sqrt(total)


def svd_factors(products: PyTree, rank: int) -> PyTree:
    """The best rank-``rank`` factors of each product (truncated SVD, Eckart-Young).

    ``a = U_r sqrt(S_r)`` and ``b = sqrt(S_r) V_r^T``, components in decreasing singular value,
    so the first r' <= r components are the best rank-r' approximation too. Ranks above
    ``min(d_in, d_out)`` are zero-padded.

    Args:
      products: ``{target: [L, d_in, d_out]}``.
      rank: the rank R of the factors.

    Returns:
      ``{target: {"a": [L, d_in, R], "b": [L, R, d_out]}}``.
    """
    out, previous = {}, None
    for target, p in products.items():
        # One SVD at a time: two in flight at once can hang XLA:CPU (`kernels.ordering`).
        p = after(p.astype(jnp.float32), previous)
        u, s, vt = jnp.linalg.svd(p, full_matrices=False)
        previous = s
        k = min(rank, s.shape[-1])
        root = jnp.sqrt(s[..., :k])
        a = u[..., :k] * root[..., None, :]
        b = root[..., :, None] * vt[..., :k, :]
        pad = rank - k
        if pad:
            a = jnp.pad(a, ((0, 0), (0, 0), (0, pad)))
            b = jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
        out[target] = {"a": a, "b": b}
    return out


def stack_lora(factors: list[PyTree], weights: jax.Array) -> PyTree:
    """FLoRA's stacking: one adapter of rank ``sum_i r_i`` whose product is ``sum_i w_i a_i b_i``.

    ``a = [w_1 a_1, ..., w_n a_n]`` (concatenated along the rank) and ``b = [b_1; ...; b_n]``,
    so ``a @ b = sum_i w_i a_i @ b_i`` exactly: the stacked adapter carries the weighted average
    of the clients' products with no cross terms (Wang et al. 2024, eq. 6).

    Args:
      factors: the clients' LoRA params.
      weights: ``[n]`` aggregation weights.

    Returns:
      The stacked LoRA params.
    """
    out = {}
    for target in factors[0]:
        a = jnp.concatenate(
            [w * f[target]["a"] for f, w in zip(factors, weights, strict=True)], axis=-1
        )
        b = jnp.concatenate([f[target]["b"] for f in factors], axis=-2)
        out[target] = {"a": a, "b": b}
    return out


# ------------------------------------------------------------------- aggregation error
def _probes(params: PyTree) -> dict:
    """The fixed probe matrix ``Z`` [d_out, p] of each target (identity when d_out is small)."""
    out = {}
    for i, (target, f) in enumerate(sorted(params.items())):
        d_out = f["b"].shape[-1]
        if d_out <= ERROR_PROBES:
            out[target] = jnp.eye(d_out, dtype=jnp.float32)
        else:
            key = jax.random.fold_in(jax.random.key(0x10EA), i)
            z = jax.random.normal(key, (d_out, ERROR_PROBES), jnp.float32)
            out[target] = z / math.sqrt(ERROR_PROBES)
    return out


def error_diagnostics(params: PyTree) -> dict:
    """What a client uploads for ``lora/aggregation_error``: its factors and ``a (b Z)``."""
    probes = _probes(params)
    sketch = {
        t: jnp.matmul(f["a"].astype(jnp.float32), jnp.matmul(f["b"].astype(jnp.float32), probes[t]))
        for t, f in params.items()
    }
    return {"factors": params, "sketch": sketch}


def aggregation_error(mean_diagnostics: dict) -> jax.Array:
    """``||mean(a) mean(b) Z - mean(a b Z)||_F / ||mean(a b Z)||_F`` over all targets.

    Args:
      mean_diagnostics: the weighted mean over clients of `error_diagnostics`.

    Returns:
      The relative error of averaging the factors separately (0 when no client moved).
    """
    factors, sketch = mean_diagnostics["factors"], mean_diagnostics["sketch"]
    probes = _probes(factors)
    err, ref = jnp.float32(0.0), jnp.float32(0.0)
    for t, f in factors.items():
        separate = jnp.matmul(f["a"].astype(jnp.float32), jnp.matmul(f["b"], probes[t]))
        err = err + jnp.sum((separate - sketch[t]) ** 2)
        ref = ref + jnp.sum(sketch[t] ** 2)
    return jnp.sqrt(err / jnp.maximum(ref, 1e-30))


# ------------------------------------------------------------------ shared local training
def _masked_training(
    client_optimizer: optax.GradientTransformation,
    rank_of: Callable,
    frozen_a: bool = False,
    tail_lambda: Callable | None = None,
) -> tuple[Callable, Callable]:
    """``client_init`` and ``client_step`` of LoRA trained at the client's rank.

    Args:
      client_optimizer: the local optimizer.
      rank_of: ``(client_state, hparams) -> rank``.
      frozen_a: FFA-LoRA: ``a``'s gradient is zero (it stays at the broadcast value).
      tail_lambda: ``(hparams) -> lambda`` of HetLoRA's regularizer on the last component.
    """

    def client_init(broadcast, client_state, hparams):
        hparams = with_client_rank(hparams, broadcast.params)
        params = truncate(broadcast.params, rank_of(client_state, hparams))
        if frozen_a:
            # The shared, frozen a is never truncated: b's zero rows already remove its
            # unused columns from the product.
            params = {t: {"a": broadcast.params[t]["a"], "b": f["b"]} for t, f in params.items()}
        opt_state = init_client_optimizer(client_optimizer, params, hparams.client_lr)
        return ClientTrainState(params, opt_state, jnp.zeros((), jnp.int32))

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        hparams = with_client_rank(hparams, broadcast.params)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        rank = rank_of(client_state, hparams)
        if tail_lambda is not None:
            tail = rank_masks(state.params, rank)
            last = rank_masks(state.params, rank - 1)
            lam = tail_lambda(hparams)
            grads = jax.tree.map(
                lambda g, p, m, m1: g + (lam * (m - m1) * p).astype(g.dtype),
                grads,
                state.params,
                tail,
                last,
            )
        masks = rank_masks(state.params, rank)
        if frozen_a:
            masks = {t: {"a": jnp.zeros_like(m["a"]), "b": m["b"]} for t, m in masks.items()}
        grads = jax.tree.map(lambda g, m: (g * m).astype(g.dtype), grads, masks)
        new_state = sgd_step(client_optimizer, state, grads)
        # Weight decay or momentum must not revive masked components.
        params = jax.tree.map(
            lambda new, old, m: jnp.where(m > 0, new, old), new_state.params, state.params, masks
        )
        return new_state._replace(params=params), metrics

    return client_init, client_step


def tier_rank(client_state, hparams) -> jax.Array:
    """The client's rank from its tier (its profile's `LORA_RANK`, see `with_client_rank`)."""
    del client_state
    return hparams.values[LORA_RANK]


def _error_metric(server_state, mean_output, round_info):
    del server_state, round_info
    return {"lora/aggregation_error": aggregation_error(mean_output.extra["diagnostics"])}


# ---------------------------------------------------------------------------------- HetLoRA
class HetLoRAClientState(NamedTuple):
    """A HetLoRA client's state: how many components rank self-pruning removed."""

    pruned: jax.Array


def make_hetlora(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    prune_lambda: float = 0.0,
    prune_threshold: float = 0.0,
) -> Algorithm:
    """Builds HetLoRA (Cho et al. 2024): truncated distribution, sparsity-weighted zero-padded
    aggregation and optional rank self-pruning.

    Args:
      client_optimizer: local optimizer.
      server_optimizer: server optimizer on the pseudo-gradient.
      prune_lambda: the regularizer ``lambda / 2 ||tail||^2`` on each client's last component
        (round hyperparameter ``hetlora_lambda``; 0: none).
      prune_threshold: a client drops its last component when that component's norm is below
        this share of its components' mean norm (0: no pruning). Never below rank 1.

    Returns:
      The `Algorithm`; its client state is `HetLoRAClientState`.
    """

    def rank_of(client_state, hparams):
        return jnp.maximum(hparams.values[LORA_RANK] - client_state.pruned, 1.0)

    client_init, client_step = _masked_training(
        client_optimizer,
        rank_of,
        tail_lambda=(lambda hp: hp.values["hetlora_lambda"]) if prune_lambda else None,
    )

    def client_final(broadcast, state, client_state, hparams):
        hparams = with_client_rank(hparams, broadcast.params)
        rank = rank_of(client_state, hparams)
        local = truncate(state.params, rank)
        pruned = client_state.pruned
        if prune_threshold > 0:
            norms = component_norms(local)
            active = jnp.arange(norms.shape[0]) < rank
            mean = jnp.sum(jnp.where(active, norms, 0.0)) / jnp.maximum(rank, 1.0)
            last = norms[jnp.maximum(rank, 1.0).astype(jnp.int32) - 1]
            drop = jnp.logical_and(last < prune_threshold * mean, rank > 1)
            drop = jnp.logical_and(drop, state.steps > 0)
            pruned = pruned + drop.astype(jnp.float32)
        # The message: the client's zero-padded adapter, as a change from the broadcast.
        return ClientOutput(tree_sub(local, broadcast.params)), HetLoRAClientState(pruned)

    def expand_upload(broadcast, upload):
        local = jax.tree.map(jnp.add, broadcast.params, upload.delta)
        norm = jnp.sqrt(product_sq_norm(local))
        # Sparsity weighting: the server divides the weighted sum by the summed weights.
        delta = jax.tree.map(lambda d: (norm * d).astype(d.dtype), upload.delta)
        return ClientOutput(delta, {"norm": norm, "diagnostics": error_diagnostics(local)})

    def server_update(server_state, mean_output, round_info, key):
        del key
        norm = jnp.maximum(mean_output.extra["norm"], 1e-12)
        mean_delta = jax.tree.map(lambda d: d / norm, mean_output.delta)
        lr = None if round_info.hparams is None else round_info.hparams.server_lr
        return server_optimizer_update(server_optimizer, server_state, mean_delta, lr)

    return Algorithm(
        server_init=lambda params: ServerState(params, server_optimizer.init(params)),
        server_params=lambda s: s.params,
        broadcast=lambda s: Broadcast(s.params),
        client_state_init=lambda params: HetLoRAClientState(jnp.zeros((), jnp.float32)),
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        hyperparams={"hetlora_lambda": float(prune_lambda)} if prune_lambda else {},
        server_metrics=_error_metric,
        expand_upload=expand_upload,
        # One upload stands for its own adapter's change (its norm weight divided out).
        params_delta=lambda params, upload: jax.tree.map(
            lambda d: d / jnp.maximum(upload.extra["norm"], 1e-12), upload.delta
        ),
    )


# --------------------------------------------------------------------------------- FFA-LoRA
def make_ffa_lora(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    holder_shares: tuple[float, ...] | None = None,
) -> Algorithm:
    """Builds FFA-LoRA (Sun et al. 2024): ``a`` frozen at its shared init, ``b`` trained at the
    client's rank and averaged (FedAvg on ``b``; ``mean(b) a = mean(b a)`` exactly, so
    ``lora/aggregation_error`` is exactly 0).

    Each rank component of ``b`` is averaged over the clients that hold it. By default the
    message carries the R flags of the components the client holds and the server divides by
    the holders' share of the round's weight. With ``holder_shares`` (what client-level DP and
    secure aggregation need, which hide or fix who sent what) the message is the change of
    ``b`` alone, a plain FedAvg upload that DP clips and noises and secure aggregation masks
    like any other, and component j is divided by the fixed ``holder_shares[j]``, the expected
    share of the cohort holding it (the paper's DP setting: with every client at the maximum
    rank, all shares are 1 and this is DP-FedAvg on ``b``).

    Args:
      client_optimizer: the clients' optimizer.
      server_optimizer: the server's optimizer.
      holder_shares: None, or for each rank component (R of them) the expected share, in
        (0, 1], of the clients that hold it.

    Returns:
      The `Algorithm`.
    """
    if holder_shares is not None and not all(0 < s <= 1 for s in holder_shares):
        raise ValueError(f"holder shares must be in (0, 1], got {list(holder_shares)}.")

    def client_final(broadcast, state, client_state, hparams):
        hparams = with_client_rank(hparams, broadcast.params)
        rank = tier_rank(client_state, hparams)
        # Only the components of b the client trained (a is frozen: nothing of it is sent).
        trained = truncate(tree_sub(state.params, broadcast.params), rank)
        delta = {t: {"b": f["b"]} for t, f in trained.items()}
        if holder_shares is not None:
            return ClientOutput(delta), client_state
        # The message: the trained components' change and which components the client holds.
        holds = (jnp.arange(max_rank(state.params)) < rank).astype(jnp.float32)
        return ClientOutput(delta, {"holds": holds}), client_state

    def server_update(server_state, mean_output, round_info, key):
        del key
        # Each rank component is averaged over the clients that hold it (weights of the rest
        # removed): the weighted mean of the uploads divided by the holders' share of weight.
        if holder_shares is None:
            share = jnp.maximum(mean_output.extra["holds"], 1e-12)
        else:
            share = jnp.asarray(holder_shares, jnp.float32)
            if share.shape[0] != max_rank(server_state.params):
                raise ValueError(
                    f"{share.shape[0]} holder shares for LoRA rank {max_rank(server_state.params)}."
                )
        mean_delta = {
            t: {"a": jnp.zeros_like(f["a"]), "b": mean_output.delta[t]["b"] / share[None, :, None]}
            for t, f in server_state.params.items()
        }
        lr = None if round_info.hparams is None else round_info.hparams.server_lr
        return server_optimizer_update(server_optimizer, server_state, mean_delta, lr)

    # ``a`` is shared and frozen, so averaging ``b`` is exact: the error is 0 by construction.
    return _rank_masked(
        client_optimizer, server_optimizer, True, client_final, server_update
    )._replace(
        server_metrics=lambda s, mean, info: {"lora/aggregation_error": jnp.float32(0)},
        params_delta=lambda params, upload: {
            t: {"a": jnp.zeros_like(f["a"]), "b": upload.delta[t]["b"]} for t, f in params.items()
        },
    )


def holder_shares(rank: int, tier_ranks: tuple[int, ...], tier_fractions: tuple[float, ...]):
    """The expected share of clients holding each of ``rank`` LoRA components: component j is
    held by the tiers whose rank exceeds j (every client holds all when no tiers are given).

    Args:
      rank: the compiled maximum rank R.
      tier_ranks: each tier's rank (``system.tier_lora_ranks``; empty: all at R).
      tier_fractions: each tier's share of the clients (empty: one tier).

    Returns:
      R floats in (0, 1].

    Raises:
      ValueError: if some component is held by no tier (no client could ever train it).
    """
    if not tier_ranks:
        return (1.0,) * rank
    fractions = tier_fractions or (1.0,) * len(tier_ranks)
    total = float(sum(fractions))
    shares = tuple(
        sum(f for r, f in zip(tier_ranks, fractions, strict=True) if r > j) / total
        for j in range(rank)
    )
    if min(shares) <= 0:
        top = max(r for r, f in zip(tier_ranks, fractions, strict=True) if f > 0)
        raise ValueError(
            f"no tier holds LoRA components {top} to {rank - 1} (the highest rank held is "
            f"{top}, the compiled rank {rank}); lower trainable.lora_rank to {top}."
        )
    return shares


def _rank_masked(
    client_optimizer, server_optimizer, frozen_a, client_final, server_update
) -> Algorithm:
    """The parts the four share: rank-masked local training from the global adapter."""
    client_init, client_step = _masked_training(client_optimizer, tier_rank, frozen_a=frozen_a)
    return Algorithm(
        server_init=lambda params: ServerState(params, server_optimizer.init(params)),
        server_params=lambda s: s.params,
        broadcast=lambda s: Broadcast(s.params),
        client_state_init=lambda params: (),
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        server_metrics=_error_metric,
    )


# -------------------------------------------------------------------------------- FlexLoRA
def make_flexlora(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Algorithm:
    """Builds FlexLoRA (Bai et al. 2024): average the clients' full-size products, redistribute
    by truncated SVD.

    Each client uploads ``a_i b_i - a b`` (its product's change from the global adapter's
    product); the server optimizer steps the product ``a b`` with the pseudo-gradient
    ``-mean(change)`` (with ``sgd(1.0)``: the new product is exactly the weighted mean of the
    clients' products, the paper), and the new global adapter is its best rank-R
    approximation (`svd_factors`). A client of rank r keeps the first r components: the best
    rank-r approximation.

    Returns:
      The `Algorithm`; its server optimizer state lives in product space.
    """

    def client_final(broadcast, state, client_state, hparams):
        rank = tier_rank(client_state, with_client_rank(hparams, broadcast.params))
        # The message: the client's rank-r adapter as a change from the broadcast.
        local = truncate(state.params, rank)
        return ClientOutput(tree_sub(local, broadcast.params)), client_state

    def expand_upload(broadcast, upload):
        # The server forms the client's full-size product from its factors.
        local = jax.tree.map(jnp.add, broadcast.params, upload.delta)
        change = jax.tree.map(jnp.subtract, lora_products(local), lora_products(broadcast.params))
        return ClientOutput(change, {"diagnostics": error_diagnostics(local)})

    def server_init(params):
        return ServerState(params, server_optimizer.init(lora_products(params)))

    def server_update(server_state, mean_output, round_info, key):
        del key
        products = lora_products(server_state.params)
        lr = None if round_info.hparams is None else round_info.hparams.server_lr
        stepped = server_optimizer_update(
            server_optimizer, ServerState(products, server_state.opt_state), mean_output.delta, lr
        )
        factors = svd_factors(stepped.params, max_rank(server_state.params))
        return ServerState(factors, stepped.opt_state)

    return _rank_masked(
        client_optimizer, server_optimizer, False, client_final, server_update
    )._replace(server_init=server_init, expand_upload=expand_upload)


# ----------------------------------------------------------------------------------- FLoRA
class FLoRAServerState(NamedTuple):
    """FLoRA's server state: this round's fresh adapter and the merged base."""

    params: PyTree
    base: PyTree


def fresh_adapter(params: PyTree, key: jax.Array) -> PyTree:
    """A new adapter shaped like ``params``: ``a`` Kaiming-uniform (PEFT's init), ``b`` zero."""
    out = {}
    for i, (target, f) in enumerate(sorted(params.items())):
        d_in = f["a"].shape[-2]
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), f["a"].shape, jnp.float32, -bound, bound
        ).astype(f["a"].dtype)
        out[target] = {"a": a, "b": jnp.zeros_like(f["b"])}
    return out


def make_flora(
    client_optimizer: optax.GradientTransformation,
    scaling: float,
) -> Algorithm:
    """Builds FLoRA (Wang et al. 2024): stacking-exact aggregation merged into the base.

    Every round the clients train a fresh adapter at their rank; the server adds
    ``server_lr * scaling * sum_i p_i a_i b_i`` (the stacked adapter's product, `stack_lora`)
    to the base kernels and draws the next fresh adapter. The server optimizer is plain SGD on
    the merged weights (the round's server learning rate scales the merge).

    Args:
      client_optimizer: local optimizer.
      scaling: the LoRA scaling alpha / R of the trainable.

    Returns:
      The `Algorithm`; its server state (`FLoRAServerState`) holds the merged base.
    """

    def client_final(broadcast, state, client_state, hparams):
        rank = tier_rank(client_state, with_client_rank(hparams, broadcast.params))
        # The message: the client's rank-r adapter as a change from the fresh one.
        local = truncate(state.params, rank)
        return ClientOutput(tree_sub(local, broadcast.params)), client_state

    def expand_upload(broadcast, upload):
        # The fresh adapter's product is zero (b = 0): the client's product is its change;
        # the weighted mean of the products is the stacked adapters' product (`stack_lora`).
        local = jax.tree.map(jnp.add, broadcast.params, upload.delta)
        return ClientOutput(lora_products(local), {"diagnostics": error_diagnostics(local)})

    def server_init(params, frozen):
        return FLoRAServerState(params, frozen)

    def server_update(server_state, mean_output, round_info, key):
        lr = 1.0 if round_info.hparams is None else round_info.hparams.server_lr
        products = jax.tree.map(lambda p: lr * p, mean_output.delta)
        merged = merge_into_base(server_state.base, products, scaling)
        adapter = fresh_adapter(server_state.params, key)
        return FLoRAServerState(adapter, merged)

    return _rank_masked(
        client_optimizer, optax.sgd(1.0), False, client_final, server_update
    )._replace(server_init=server_init, server_frozen=lambda s: s.base, expand_upload=expand_upload)
