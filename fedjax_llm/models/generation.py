"""Text generation with a key/value cache: greedy, temperature and top-p (nucleus) sampling.

Prompts are left-padded to a common width, so every row's last prompt token sits in the last
column and all rows write the cache at the same index. Rotary embeddings depend only on relative
positions, so the pads shift nothing. The prompt (with a soft prompt, if any) fills the cache in
one forward pass; then one token per step, the whole loop one compiled `lax.scan`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_llm.models import llama
from fedjax_llm.models.llama import LlamaConfig

__all__ = ["generate", "left_align_prompts", "sample_next_token"]


def left_align_prompts(
    tokens: jax.Array, prompt_len: jax.Array, pad_id: int, width: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Moves right-padded prompts (as in `TokenizedExamples`) to the right edge of a buffer.

    Args:
      tokens: [B, T] sequences whose first `prompt_len` tokens are the prompt.
      prompt_len: [B] prompt lengths (>= 1).
      pad_id: Padding id.
      width: Buffer width W >= max(prompt_len); default T.

    Returns:
      (prompts [B, W] left-padded with `pad_id`, mask [B, W] True at prompt tokens).
    """
    width = tokens.shape[1] if width is None else width
    shift = width - prompt_len[:, None]  # where each row's prompt starts
    source = jnp.arange(width)[None, :] - shift
    mask = source >= 0
    gathered = jnp.take_along_axis(tokens, jnp.clip(source, 0, tokens.shape[1] - 1), axis=1)
    return jnp.where(mask, gathered, pad_id).astype(tokens.dtype), mask


def sample_next_token(
    logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0
) -> jax.Array:
    """Picks the next token from logits [B, V].

    Args:
      logits: Next-token logits.
      key: PRNG key (unused when greedy).
      temperature: 0 takes the argmax; otherwise logits are divided by it before sampling.
      top_p: Nucleus sampling: sample among the smallest set of most likely tokens whose
        probability reaches `top_p` (1 keeps every token).

    Returns:
      int32 [B] token ids.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        # The most likely token is always kept (before == 0 < top_p).
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "eos_id", "pad_id", "temperature", "top_p"),
)
def generate(
    config: LlamaConfig,
    params: dict,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    model_kwargs: dict[str, Any] | None = None,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> jax.Array:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      config: The architecture (static).
      params: Base parameters.
      prompts: [B, W] left-padded prompt tokens (see `left_align_prompts`).
      prompt_mask: [B, W] True at prompt tokens.
      max_new_tokens: Tokens to generate (static, >= 1).
      eos_id: End of sequence: emitted, then the row only emits `pad_id`.
      pad_id: Padding id.
      model_kwargs: Trainable parts for `Llama.__call__` (`lora`/`lora_scaling`,
        `prompt_embeddings` or `prefix`), e.g. from `Trainable.model_inputs`.
      key: PRNG key; needed when `temperature` > 0.
      temperature: 0 for greedy decoding (static).
      top_p: Nucleus sampling mass (static).

    Returns:
      int32 [B, max_new_tokens] generated tokens, `pad_id` after a row's eos.

    Raises:
      ValueError: For a non-positive `max_new_tokens`, a negative temperature, `top_p` outside
        (0, 1], or sampling without a key.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}.")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key.")
    key = jax.random.key(0) if key is None else key
    model_kwargs = dict(model_kwargs or {})
    batch, width = prompts.shape
    prompt_embeddings = model_kwargs.get("prompt_embeddings")
    num_virtual = 0 if prompt_embeddings is None else prompt_embeddings.shape[0]
    cache = llama.init_cache(config, batch, num_virtual + width + max_new_tokens)
    logits, cache = llama.apply(
        config, params, prompts, attention_mask=prompt_mask, cache=cache, **model_kwargs
    )
    model_kwargs.pop("prompt_embeddings", None)  # already in the cache

    def pick(next_logits, step_key, done):
        token = sample_next_token(next_logits, step_key, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        return token, done | (token == eos_id)

    def step(carry, step_key):
        # Feed the last token, then pick the next one: no forward pass after the final token.
        cache, token, done = carry
        logits, cache = llama.apply(config, params, token[:, None], cache=cache, **model_kwargs)
        token, done = pick(logits[:, -1], step_key, done)
        return (cache, token, done), token

    keys = jax.random.split(key, max_new_tokens)
    first, done = pick(logits[:, -1], keys[0], jnp.zeros((batch,), bool))
    _, rest = jax.lax.scan(step, (cache, first, done), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
