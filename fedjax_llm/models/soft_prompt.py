"""Initialization of soft prompts (prompt tuning).

References:
  Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.models.llama import LlamaConfig

PROMPT_INITS = ("vocab", "random")


def init_soft_prompt(
    config: LlamaConfig,
    base_params: dict,
    key: jax.Array,
    num_virtual_tokens: int,
    init: str = "vocab",
) -> jax.Array:
    """Initializes P learned input vectors to prepend to the token embeddings.

    Args:
      config: The architecture.
      base_params: Base model parameters; "vocab" init reads `base_params['embed']['embedding']`.
      key: PRNG key.
      num_virtual_tokens: Number of prompt vectors P > 0.
      init: "vocab" copies the embedding rows of P token ids drawn uniformly from the whole
        vocabulary (Lester et al. draw from the 5,000 most frequent tokens; token frequencies are
        not known here); "random" draws normal(config.initializer_range).

    Returns:
      The soft prompt, float32 [P, D].

    Raises:
      ValueError: If `num_virtual_tokens` is not positive, `init` is not in PROMPT_INITS, or
        "vocab" init finds no embedding of shape [V, D] in `base_params`.
    """
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise ValueError(
            f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}."
        )
    if init == "random":
        shape = (num_virtual_tokens, config.hidden_size)
        return config.initializer_range * jax.random.normal(key, shape, jnp.float32)
    if init != "vocab":
        raise ValueError(f"Unknown soft prompt init {init!r}; choose one of {PROMPT_INITS}.")
    try:
        embedding = base_params["embed"]["embedding"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            "Soft prompt init 'vocab' needs base_params['embed']['embedding']; pass the base "
            "model's params or use init='random'."
        ) from e
    if tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"Embedding shape {tuple(embedding.shape)} does not match the config "
            f"[{config.vocab_size}, {config.hidden_size}]."
        )
    ids = jax.random.randint(key, (num_virtual_tokens,), 0, config.vocab_size)
    return jnp.asarray(embedding, jnp.float32)[ids]
