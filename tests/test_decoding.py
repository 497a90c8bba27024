"""Tests of fedjax_llm.models.decoding."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.models import llama
from fedjax_llm.models.decoding import greedy_decode
from fedjax_llm.models.llama import LlamaConfig

# A large init range spreads the logits, so argmax near-ties (where rounding differences between
# the batched and the one-row forward could flip the choice) do not occur.
TINY = LlamaConfig(
    vocab_size=23,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=16,
    initializer_range=1.0,
)
PAD = 0
MAX_NEW = 5


@pytest.fixture(scope="module")
def params():
    return llama.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
    lengths = [3, 1, 6]
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, TINY.vocab_size, size=n).tolist() for n in lengths]
    return rows


_forward = jax.jit(llama.apply, static_argnums=0)


def _naive_decode(params, prompt, max_new_tokens, eos_id, length=12):
    """One row at a time in a Python loop: append the argmax at the last token, stop at eos.

    The row sits in a fixed [1, length] pad-filled buffer so the forward compiles once; causality
    (tested in test_llama) makes the pads after the last token irrelevant.
    """
    tokens = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        if out and out[-1] == eos_id:
            break
        buffer = jnp.asarray([tokens + [PAD] * (length - len(tokens))], jnp.int32)
        logits = _forward(TINY, params, buffer)
        token = int(jnp.argmax(logits[0, len(tokens) - 1]))
        tokens.append(token)
        out.append(token)
    return out + [PAD] * (max_new_tokens - len(out))


def _buffer(prompts, length):
    buffer = np.full((len(prompts), length), PAD, np.int32)
    for i, row in enumerate(prompts):
        buffer[i, : len(row)] = row
    return jnp.asarray(buffer), jnp.asarray([len(row) for row in prompts], jnp.int32)


def _decode_jit(params, eos_id):
    logits_fn = functools.partial(llama.apply, TINY, params)
    return jax.jit(
        functools.partial(
            greedy_decode, logits_fn, max_new_tokens=MAX_NEW, eos_id=eos_id, pad_id=PAD
        )
    )


def test_matches_naive_loop_without_eos(params, prompts):
    buffer, lengths = _buffer(prompts, 12)
    got = _decode_jit(params, eos_id=-1)(buffer, lengths)
    want = [_naive_decode(params, row, MAX_NEW, eos_id=-1) for row in prompts]
    chex.assert_shape(got, (3, MAX_NEW))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_matches_naive_loop_with_eos(params, prompts):
    free = [_naive_decode(params, row, MAX_NEW, eos_id=-1) for row in prompts]
    # Pick as eos the token row 1 emits at step 2, so row 1 must stop mid-way.
    eos_id = free[1][2]
    buffer, lengths = _buffer(prompts, 12)
    got = np.asarray(_decode_jit(params, eos_id=eos_id)(buffer, lengths))
    want = [_naive_decode(params, row, MAX_NEW, eos_id=eos_id) for row in prompts]
    np.testing.assert_array_equal(got, np.asarray(want))
    first_eos = list(got[1]).index(eos_id)
    assert first_eos <= 2
    assert (got[1, first_eos + 1 :] == PAD).all()
    assert (got != PAD).sum() < (np.asarray(free) != PAD).sum()  # eos really cut something.


def test_traces_once_and_independent_of_buffer_tail(params, prompts):
    buffer, lengths = _buffer(prompts, 12)
    logits_fn = functools.partial(llama.apply, TINY, params)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def decode(buffer, lengths):
        return greedy_decode(logits_fn, buffer, lengths, MAX_NEW, eos_id=-1, pad_id=PAD)

    got = decode(buffer, lengths)
    # Garbage after each prompt (where generated tokens go) is overwritten before it is read.
    noisy = jnp.where(jnp.arange(12)[None] >= lengths[:, None], 7, buffer)
    chex.assert_trees_all_equal(decode(noisy, lengths), got)


def test_errors(params):
    logits_fn = functools.partial(llama.apply, TINY, params)
    buffer = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(logits_fn, buffer, jnp.array([1, 1]), 0, eos_id=1, pad_id=PAD)
    with pytest.raises(ValueError, match="shorter"):
        greedy_decode(logits_fn, buffer, jnp.array([1, 1]), 6, eos_id=1, pad_id=PAD)
    with pytest.raises(ValueError, match="max\\(prompt_len\\)"):
        greedy_decode(logits_fn, buffer, jnp.array([4, 1]), 3, eos_id=1, pad_id=PAD)
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        greedy_decode(logits_fn, buffer, jnp.array([0, 1]), 3, eos_id=1, pad_id=PAD)
    with pytest.raises(ValueError, match="shape"):
        greedy_decode(logits_fn, buffer, jnp.array([1, 1, 1]), 3, eos_id=1, pad_id=PAD)
