"""Initialization of prefix-tuning keys and values.

References:
  Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation". We learn the
  per-layer keys/values directly, without the paper's reparameterization MLP (which only stabilizes
  optimization and is discarded after training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.models.llama import LlamaConfig


def init_prefix(
    config: LlamaConfig, key: jax.Array, num_virtual_tokens: int
) -> dict[str, jax.Array]:
    """Initializes P learned key/value slots per layer.

    Args:
      config: The architecture.
      key: PRNG key.
      num_virtual_tokens: Number of prefix slots P > 0.

    Returns:
      {'key': [L, P, KV, hd], 'value': [L, P, KV, hd]}, float32, normal(config.initializer_range).

    Raises:
      ValueError: If `num_virtual_tokens` is not positive.
    """
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise ValueError(
            f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}."
        )
    shape = (config.num_layers, num_virtual_tokens, config.num_kv_heads, config.resolved_head_dim)
    key_key, value_key = jax.random.split(key)
    std = config.initializer_range
    return {
        "key": std * jax.random.normal(key_key, shape, jnp.float32),
        "value": std * jax.random.normal(value_key, shape, jnp.float32),
    }
