"""Cross entropy of a linear output layer, a block of rows at a time.

A language model's next-token loss multiplies the final hidden states ``x`` [N, D] by the
output projection ``w`` [D, V] and takes the cross entropy of each row against its target.
Written plainly, the N x V logits are written out, read back for the softmax, and their
gradient is written and read again for the backward matmul: with a 4096-word vocabulary and
2048 rows, 32 MiB per pass, far beyond a CPU core's cache (and on accelerators the largest
activation of a small model: N x 49152 floats for SmolLM2). Here the rows go in blocks: one
block's logits, log-sum-exp, loss and gradient are made and used while the block is in cache,
and only N losses (and an N x D gradient) are kept.

Each row's loss depends on that row alone, so its gradient with respect to the row is the
cotangent times ``(softmax - one_hot) @ w.T``; that product is computed on the forward pass
(as Liger Kernel's fused linear cross entropy does), so no logits are recomputed and the
matmul count is the plain version's. When ``w`` is trained too (full fine-tuning), its
gradient needs the cotangents, so each row's ``softmax - one_hot`` is kept for the backward
pass (as the plain version keeps the logits' gradient): the memory saving is then gone, the
fused softmax and the single pass over the logits remain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def linear_cross_entropy(
    x: jax.Array, w: jax.Array, targets: jax.Array, block_rows: int = 64
) -> jax.Array:
    """Per-row cross entropy ``-log softmax(x @ w)[target]``, float32.

    Args:
      x: hidden states [..., D] (float32 or bfloat16; the matmuls accumulate in float32).
      w: output projection [D, V], in ``x``'s dtype.
      targets: int [...] (``x``'s leading shape), each in [0, V).
      block_rows: rows per block (the last block is padded).

    Returns:
      float32 [...] losses.
    """
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"x {x.shape} and targets {targets.shape} do not match.")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last axis {x.shape[-1]} is not w's first {w.shape[0]}.")
    lead = targets.shape
    rows = x.reshape(-1, x.shape[-1])
    flat = targets.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    block = max(1, min(block_rows, n))
    pad = -n % block
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        flat = jnp.pad(flat, (0, pad))
    losses = _blocked(rows, w, flat, block)
    return losses[:n].reshape(lead)


def _block_loss(x, w, targets):
    """Loss and softmax probabilities of one block of rows."""
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    shifted = logits - jax.lax.stop_gradient(top)
    exp = jnp.exp(shifted)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(shifted, targets[:, None], axis=-1)[:, 0]
    return jnp.log(total[:, 0]) - picked, exp / total


def _minus_one_hot(probs, targets):
    vocab = jnp.arange(probs.shape[-1], dtype=targets.dtype)
    return probs - (vocab[None, :] == targets[:, None]).astype(probs.dtype)


def _split(a: jax.Array, block: int) -> jax.Array:
    return a.reshape(a.shape[0] // block, block, *a.shape[1:])


def _scan_blocks(fn, block, *arrays):
    """``fn`` over blocks of ``block`` rows of each array, outputs stacked back into rows (one
    block: called directly, no loop)."""
    if arrays[0].shape[0] == block:
        return fn(*arrays)
    _, out = jax.lax.scan(lambda _, blk: (None, fn(*blk)), None, [_split(a, block) for a in arrays])
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x, w, targets, block):
    return _scan_blocks(lambda xb, tb: _block_loss(xb, w, tb)[0], block, x, targets)


def _blocked_fwd(x, w, targets, block):
    x_val, w_val, t_val = x.value, w.value, targets.value
    want_dx, want_dw = x.perturbed, w.perturbed

    def one(xb, tb):
        loss, probs = _block_loss(xb, w_val, tb)
        # Each row's own gradient, d loss_i / d logits_i = softmax_i - one_hot_i.
        grad = _minus_one_hot(probs, tb).astype(w_val.dtype)
        dx = None
        if want_dx:  # d loss_i / d x_i = (softmax_i - one_hot_i) @ w.T
            # Kept in float32 until the cotangent scales it: one rounding to x's dtype, as the
            # plain path's.
            dx = jnp.dot(grad, w_val.T, preferred_element_type=jnp.float32)
        return loss, dx, grad if want_dw else None

    losses, dx, grad = _scan_blocks(one, block, x_val, t_val)
    # x itself only for w's gradient; otherwise an empty array that carries x's dtype.
    return losses, (dx, grad, x_val if want_dw else jnp.zeros((0,), x_val.dtype))


def _blocked_bwd(block, residuals, g):
    del block
    dx_unit, grad, x = residuals
    if isinstance(g, SymbolicZero):
        return None, None, None
    g = g.astype(jnp.float32)
    dx = None
    if dx_unit is not None:
        dx = (g[:, None] * dx_unit).astype(x.dtype)
    dw = None
    if grad is not None:  # w trained: sum_i g_i x_i^T (softmax_i - one_hot_i)
        scaled = (g[:, None] * grad.astype(jnp.float32)).astype(grad.dtype)
        dw = jnp.dot(x.T, scaled, preferred_element_type=jnp.float32).astype(grad.dtype)
    return dx, dw, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd, symbolic_zeros=True)
