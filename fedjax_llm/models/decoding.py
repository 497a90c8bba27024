"""Greedy decoding.

There is no KV cache yet: every new token re-runs the full forward pass over a fixed-size token
buffer. The buffer's shape never changes, so the whole loop is one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def greedy_decode(
    logits_fn: Callable[[jax.Array], jax.Array],
    prompt_tokens: jax.Array,
    prompt_len: jax.Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Generates tokens by repeatedly taking the argmax next token.

    Step i (0-based) runs `logits_fn` on the whole buffer, takes the argmax of the logits at
    position `prompt_len + i - 1` of each row and writes it at position `prompt_len + i`. Because
    the model is causal, the pads after a row's current end do not affect its next-token logits, so
    no attention mask is needed. Jittable with `logits_fn` closed over and `max_new_tokens`,
    `eos_id`, `pad_id` static.

    Args:
      logits_fn: Maps tokens [B, T] to logits [B, T, V] (causal).
      prompt_tokens: Prompts, integer [B, T], right-padded with `pad_id`. T must be at least
        max(prompt_len) + max_new_tokens; this is checked when `prompt_len` is concrete, while under
        `jax.jit` only T >= 1 + max_new_tokens can be checked, and longer prompts then silently
        generate fewer tokens (writes past the buffer are dropped; later logits are garbage).
      prompt_len: Number of prompt tokens per row, int32 [B], each >= 1.
      max_new_tokens: Number of tokens to generate (static, >= 1).
      eos_id: End-of-sequence id. It is emitted, and every later output of that row is `pad_id`.
      pad_id: Padding id.

    Returns:
      Generated tokens [B, max_new_tokens], same dtype as `prompt_tokens`.

    Raises:
      ValueError: If shapes are inconsistent, max_new_tokens < 1, or the buffer is too short.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    prompt_tokens = jnp.asarray(prompt_tokens)
    prompt_len = jnp.asarray(prompt_len)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, length], got {prompt_tokens.shape}.")
    batch, length = prompt_tokens.shape
    if tuple(prompt_len.shape) != (batch,):
        raise ValueError(f"prompt_len must have shape [{batch}], got {tuple(prompt_len.shape)}.")
    if length < 1 + max_new_tokens:
        raise ValueError(
            f"Token buffer length {length} is shorter than 1 prompt token + max_new_tokens "
            f"({max_new_tokens}); pad prompt_tokens to at least max(prompt_len) + max_new_tokens."
        )
    try:
        lens = np.asarray(prompt_len)
    except jax.errors.TracerArrayConversionError:
        lens = None  # Traced under jit: only the static check above is possible.
    if lens is not None:
        if lens.min() < 1:
            raise ValueError("Every prompt needs at least one token (prompt_len >= 1).")
        if lens.max() + max_new_tokens > length:
            raise ValueError(
                f"Token buffer length {length} < max(prompt_len) ({lens.max()}) + max_new_tokens "
                f"({max_new_tokens}); pad prompt_tokens to a longer length."
            )

    dtype = prompt_tokens.dtype
    rows = jnp.arange(batch)
    prompt_len = prompt_len.astype(jnp.int32)

    def step(i, state):
        buffer, generated, done = state
        logits = logits_fn(buffer)
        next_logits = logits[rows, prompt_len + i - 1]
        token = jnp.argmax(next_logits, axis=-1).astype(dtype)
        token = jnp.where(done, jnp.asarray(pad_id, dtype), token)
        generated = generated.at[:, i].set(token)
        buffer = buffer.at[rows, prompt_len + i].set(token, mode="drop")
        done = done | (token == eos_id)
        return buffer, generated, done

    generated = jnp.full((batch, max_new_tokens), pad_id, dtype)
    done = jnp.zeros((batch,), bool)
    _, generated, _ = jax.lax.fori_loop(0, max_new_tokens, step, (prompt_tokens, generated, done))
    return generated
