"""Lossy compressors of one client's upload (a pytree, no client axis), with exact message sizes.

Every compressor returns the *decompressed* pytree (dense, what the server reconstructs; same
structure, shapes and dtypes as the input) and the exact number of bytes of the message that
would travel: values, indices and scales, nothing else (no framing). Sizes depend only on shapes
and settings, so they are Python ints, computed by the matching ``*_bytes`` function from the
shapes alone (arrays or `jax.ShapeDtypeStruct`); a caller can know the cost of a message before
compiling anything. Use `jax.vmap` for a stack of clients.

Conventions of the wire format (one message per client and round):

* values travel as float32 (4 bytes), whatever the leaf's dtype;
* indices into the flattened upload travel as uint32 (4 bytes; uploads hold fewer than 2**32
  values);
* a scale is one float32 (4 bytes);
* a seed is 4 bytes (the receiver regenerates the random indices from it).

Floating-point uploads only. Each compressor computes in float32 and casts the result back to
the leaf's dtype.

References:
  Stich et al. 2018, "Sparsified SGD with Memory" (top-k and random-k with error feedback);
  Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
  Encoding"; Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems";
  Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
  Schemes" (the scaled sign ``||x||_1 / n * sign(x)``); Vogels et al. 2019, "PowerSGD: Practical
  Low-Rank Gradient Compression for Distributed Optimization".
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from kernels.ordering import after
from kernels.pytree import PyTree

VALUE_BYTES = 4
"""Bytes of one transmitted value (float32)."""
INDEX_BYTES = 4
"""Bytes of one transmitted index into the flattened upload (uint32)."""
SCALE_BYTES = 4
"""Bytes of one transmitted scale (float32)."""
SEED_BYTES = 4
"""Bytes of the seed from which the receiver regenerates random-k's indices."""


# ------------------------------------------------------------------------------------ helpers
def _sizes(tree: PyTree) -> list[int]:
    return [math.prod(x.shape) for x in jax.tree.leaves(tree)]


def _flatten(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def _unflatten(tree: PyTree, flat: jax.Array) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    out, start = [], 0
    for x in leaves:
        n = math.prod(x.shape)
        out.append(flat[start : start + n].reshape(x.shape).astype(x.dtype))
        start += n
    return jax.tree.unflatten(treedef, out)


def num_kept(ratio: float, n: int) -> int:
    """The number of coordinates top-k and random-k keep: ``k = ceil(ratio * n)``, in [1, n].

    ``ratio`` is read as the decimal it prints as (``0.07 * 100`` keeps 7, not the 8 that binary
    floating point would give).

    Args:
      ratio: the kept share, in (0, 1].
      n: the number of values (>= 1).

    Returns:
      k.

    Raises:
      ValueError: if ``ratio`` is outside (0, 1].
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"the compression ratio must be in (0, 1], got {ratio}.")
    k = math.ceil(Fraction(repr(float(ratio))) * n)
    return min(max(k, 1), n)


# -------------------------------------------------------------------------------------- top-k
def top_k_bytes(tree: PyTree, ratio: float) -> int:
    """Bytes of a `top_k` message: ``k * (VALUE_BYTES + INDEX_BYTES)``, 0 for an empty tree."""
    n = sum(_sizes(tree))
    return 0 if n == 0 else num_kept(ratio, n) * (VALUE_BYTES + INDEX_BYTES)


def top_k(tree: PyTree, ratio: float) -> tuple[PyTree, int]:
    """Keeps the ``k = ceil(ratio * n)`` largest-magnitude values of the whole upload.

    The selection is global: over all ``n`` values of all leaves together (a leaf whose values
    are small sends nothing), which keeps the most energy for a given k. Ties are broken
    towards the lower flat index, so exactly k values are kept.

    Args:
      tree: one client's upload.
      ratio: the kept share of values, in (0, 1] (static).

    Returns:
      The dense pytree with every other value zero, and the message's bytes (`top_k_bytes`):
      k values and their k indices.

    References:
      Stich et al. 2018, "Sparsified SGD with Memory"; Aji and Heafield 2017, "Sparse
      Communication for Distributed Gradient Descent".
    """
    nbytes = top_k_bytes(tree, ratio)
    n = sum(_sizes(tree))
    if n == 0:
        return tree, 0
    flat = _flatten(tree)
    k = num_kept(ratio, n)
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    kept = jnp.zeros_like(flat).at[index].set(flat[index])
    return _unflatten(tree, kept), nbytes


# ----------------------------------------------------------------------------------- random-k
def random_k_bytes(tree: PyTree, ratio: float) -> int:
    """Bytes of a `random_k` message: ``k * VALUE_BYTES + SEED_BYTES``, 0 for an empty tree."""
    n = sum(_sizes(tree))
    return 0 if n == 0 else num_kept(ratio, n) * VALUE_BYTES + SEED_BYTES


def random_k(
    tree: PyTree, ratio: float, key: jax.Array, *, unbiased: bool = True
) -> tuple[PyTree, int]:
    """Keeps ``k = ceil(ratio * n)`` coordinates of the whole upload drawn uniformly at random.

    The k coordinates are distinct, drawn from the ``n`` values of all leaves together. Only
    the values and a seed travel: the receiver draws the same indices from the seed.

    Args:
      tree: one client's upload.
      ratio: the kept share of values, in (0, 1] (static).
      key: the client's key of this message (its seed).
      unbiased: scale the kept values by ``n / k``, so that the expectation over keys is the
        input (use without error feedback). Off: the kept values as they are (with error
        feedback, whose memory makes up for what is left out; scaling would inflate it).

    Returns:
      The dense pytree and the message's bytes (`random_k_bytes`).

    References:
      Stich et al. 2018, "Sparsified SGD with Memory"; Wangni et al. 2018, "Gradient
      Sparsification for Communication-Efficient Distributed Optimization".
    """
    nbytes = random_k_bytes(tree, ratio)
    n = sum(_sizes(tree))
    if n == 0:
        return tree, 0
    flat = _flatten(tree)
    k = num_kept(ratio, n)
    index = jax.random.choice(key, n, (k,), replace=False)
    scale = n / k if unbiased else 1.0
    kept = jnp.zeros_like(flat).at[index].set(flat[index] * scale)
    return _unflatten(tree, kept), nbytes


# --------------------------------------------------------------------------- stochastic quant.
def stochastic_quantize_bytes(tree: PyTree, bits: int) -> int:
    """Bytes of a `stochastic_quantize` message: per leaf ``ceil(n * bits / 8) + SCALE_BYTES``."""
    _check_bits(bits)
    return sum(math.ceil(n * bits / 8) + SCALE_BYTES for n in _sizes(tree))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(
            f"quantization bits must be an integer in [2, 16], got {bits!r} (1 bit: use the "
            "scaled sign)."
        )


def stochastic_quantize(
    tree: PyTree, bits: int, key: jax.Array, *, scale: str = "max_abs"
) -> tuple[PyTree, int]:
    """QSGD-style unbiased stochastic uniform quantization, one scale per leaf.

    Each value ``x`` of a leaf with scale ``M`` is sent as a ``bits``-bit signed integer ``q``
    in ``[-s, s]``, ``s = 2**(bits - 1) - 1`` (sign and level, as QSGD), and reconstructed as
    ``q * M / s``. ``|x| * s / M`` is rounded up with probability its fractional part, down
    otherwise, so the reconstruction is unbiased (``E[q * M / s] = x``) and within one step
    ``M / s`` of ``x``. Zero is exact.

    Args:
      tree: one client's upload.
      bits: bits per value, an integer in [2, 16] (static).
      key: the client's key of this message (the rounding's randomness, not sent).
      scale: ``max_abs`` (the leaf's largest magnitude: the finest step for the bits) or
        ``l2`` (the leaf's L2 norm, as in QSGD; coarser steps, a variance bound in the norm).

    Returns:
      The dense reconstruction and the message's bytes (`stochastic_quantize_bytes`): the
      packed integers and one float32 scale per leaf.

    Raises:
      ValueError: for bits outside [2, 16] or an unknown ``scale``.

    References:
      Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
      Encoding".
    """
    if scale not in ("max_abs", "l2"):
        raise ValueError(f"scale must be 'max_abs' or 'l2', got {scale!r}.")
    nbytes = stochastic_quantize_bytes(tree, bits)
    levels = 2 ** (bits - 1) - 1
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))

    def one(x, k):
        x32 = x.astype(jnp.float32)
        m = jnp.max(jnp.abs(x32)) if scale == "max_abs" else jnp.sqrt(jnp.sum(x32 * x32))
        safe = jnp.where(m > 0, m, 1.0)
        level = jnp.abs(x32) * (levels / safe)
        low = jnp.floor(level)
        up = jax.random.uniform(k, x.shape) < (level - low)
        q = jnp.minimum(low + up, levels)
        return (jnp.sign(x32) * q * (safe / levels)).astype(x.dtype)

    out = [one(x, k) for x, k in zip(leaves, keys, strict=False)]
    return jax.tree.unflatten(treedef, out), nbytes


# -------------------------------------------------------------------------------- scaled sign
def scaled_sign_bytes(tree: PyTree) -> int:
    """Bytes of a `scaled_sign` message: per leaf ``ceil(n / 8) + SCALE_BYTES``."""
    return sum(math.ceil(n / 8) + SCALE_BYTES for n in _sizes(tree))


def scaled_sign(tree: PyTree) -> tuple[PyTree, int]:
    """One bit per value and one scale per leaf: ``||x||_1 / n * sign(x)``.

    The scale is the leaf's mean magnitude, which makes the compressor a contraction
    (``||C(x) - x||^2 <= (1 - ||x||_1^2 / (n ||x||^2)) ||x||^2``), the property error feedback
    needs. One bit cannot say zero: ``sign(0)`` is sent as +1.

    Args:
      tree: one client's upload.

    Returns:
      The dense reconstruction and the message's bytes (`scaled_sign_bytes`): the packed sign
      bits and one float32 scale per leaf.

    References:
      Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
      Schemes" (EF-SignSGD); Bernstein et al. 2018, "signSGD".
    """

    def one(x):
        x32 = x.astype(jnp.float32)
        m = jnp.mean(jnp.abs(x32)) if x.size else jnp.float32(0.0)
        return (jnp.where(x32 >= 0, m, -m)).astype(x.dtype)

    return jax.tree.map(one, tree), scaled_sign_bytes(tree)


# ----------------------------------------------------------------------------------- low rank
def _low_rank_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int, int] | None:
    """``(batch, m, n)`` if a leaf of this shape is sent as rank-``rank`` factors, else None."""
    if len(shape) < 2:
        return None
    m, n = shape[-2], shape[-1]
    batch = math.prod(shape[:-2])
    # Factors only where they are smaller than the matrix (else dense is cheaper and exact).
    if rank * (m + n) >= m * n:
        return None
    return batch, m, n


def low_rank_bytes(tree: PyTree, rank: int) -> int:
    """Bytes of a `low_rank` message: ``rank * (m + n) * VALUE_BYTES`` per compressed matrix,
    ``size * VALUE_BYTES`` per leaf sent dense."""
    if rank < 1:
        raise ValueError(f"the rank must be >= 1, got {rank}.")
    total = 0
    for x in jax.tree.leaves(tree):
        found = _low_rank_shape(tuple(x.shape), rank)
        if found is None:
            total += math.prod(x.shape) * VALUE_BYTES
        else:
            batch, m, n = found
            total += batch * rank * (m + n) * VALUE_BYTES
    return total


def low_rank(tree: PyTree, rank: int, key: jax.Array) -> tuple[PyTree, int]:
    """PowerSGD: a rank-``rank`` approximation of each matrix leaf by one power iteration.

    A leaf of shape ``[..., m, n]`` is a stack of ``m x n`` matrices (stacked layers); each
    matrix ``M`` is sent as ``P`` (``m x r``, orthonormal) and ``Q = M^T P`` (``n x r``), with
    ``P`` the orthonormalized ``M Q0`` for a Gaussian ``Q0`` drawn from ``key``; the server
    reconstructs ``P Q^T``. If ``M`` has rank at most ``r`` this is ``M`` itself (its exact
    rank-r SVD truncation). Vectors and scalars, and matrices whose factors would not be
    smaller than the matrix (``r (m + n) >= m n``), are sent dense.

    Each client compresses its own upload with a fresh ``Q0`` (no warm start across rounds,
    and no averaging of factors across clients as the all-reduce of PowerSGD does).

    Args:
      tree: one client's upload.
      rank: the rank r (static, >= 1).
      key: the client's key of this message (``Q0``, not sent).

    Returns:
      The dense reconstruction and the message's bytes (`low_rank_bytes`).

    References:
      Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
      Optimization".
    """
    nbytes = low_rank_bytes(tree, rank)
    leaves, treedef = jax.tree.flatten(tree)
    highest = jax.lax.Precision.HIGHEST

    def one_matrix(matrix, q0):
        p = jnp.matmul(matrix, q0, precision=highest)
        p, _ = jnp.linalg.qr(p)
        q = jnp.matmul(matrix.T, p, precision=highest)
        return jnp.matmul(p, q.T, precision=highest)

    out, previous = [], None
    for i, x in enumerate(leaves):
        found = _low_rank_shape(tuple(x.shape), rank)
        if found is None:
            out.append(x)
            continue
        batch, m, n = found
        # One leaf's QR at a time: two in flight at once can hang XLA:CPU (`kernels.ordering`).
        mats = after(x.astype(jnp.float32).reshape(batch, m, n), previous)
        q0 = jax.random.normal(jax.random.fold_in(key, i), (batch, n, rank), jnp.float32)
        approx = previous = jax.vmap(one_matrix)(mats, q0)
        out.append(approx.reshape(x.shape).astype(x.dtype))
    return jax.tree.unflatten(treedef, out), nbytes
