"""KV-cache generation: equals recomputing the full forward pass, for every trainable mode."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.models import llama
from fedjax_llm.models.generation import generate, left_align_prompts, sample_next_token
from fedjax_llm.models.llama import LlamaConfig, init_cache
from fedjax_llm.models.trainable import make_trainable

CONFIG = LlamaConfig(
    vocab_size=41,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
    initializer_range=0.4,
)
PAD, EOS = 0, 1


def _perturbed(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _setup(mode):
    base = llama.init_params(CONFIG, jax.random.key(0))
    trainable = make_trainable(CONFIG, mode, lora_rank=4, num_virtual_tokens=3)
    params = trainable.init(jax.random.key(1), base)
    if mode != "full":  # LoRA's B starts at zero: perturb so the adapter changes the output.
        params = _perturbed(params, jax.random.key(2))
    return trainable, trainable.frozen(base), params


def _reference_greedy(trainable, frozen, params, prompts, lens, max_new):
    """Recomputes the whole forward pass per token, one row at a time, without a cache.

    Each row sits right-padded in a fixed buffer: causal attention keeps the pads after the
    last token from changing its logits, and one compiled forward pass serves every length.
    """
    forward = jax.jit(trainable.apply)
    width = int(max(lens)) + max_new
    out = []
    for row, n in zip(np.asarray(prompts), lens, strict=True):
        seq = list(row[:n])
        generated, done = [], False
        for _ in range(max_new):
            if done:
                generated.append(PAD)
                continue
            buffer = np.full((1, width), PAD, np.int32)
            buffer[0, : len(seq)] = seq
            logits = forward(frozen, params, jnp.asarray(buffer))
            token = int(jnp.argmax(logits[0, len(seq) - 1]))
            generated.append(token)
            seq.append(token)
            done = token == EOS
        out.append(generated)
    return np.asarray(out)


@pytest.mark.parametrize("mode", ["full", "lora", "soft_prompt", "prefix"])
def test_cached_greedy_matches_full_recompute(mode):
    trainable, frozen, params = _setup(mode)
    lens = np.array([5, 2, 7])
    tokens = jax.random.randint(jax.random.key(3), (3, 9), 2, CONFIG.vocab_size)
    prompts, mask = left_align_prompts(tokens, jnp.asarray(lens), PAD)
    base, kwargs = trainable.model_inputs(frozen, params)
    got = generate(
        CONFIG, base, prompts, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, model_kwargs=kwargs
    )
    want = _reference_greedy(trainable, frozen, params, tokens, lens, 6)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_eos_stops_a_row():
    trainable, frozen, params = _setup("full")
    # Make EOS the argmax everywhere by boosting its output embedding.
    params = jax.tree.map(lambda x: x, params)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[EOS].mul(50.0)
    tokens = jnp.full((2, 4), 5)
    prompts, mask = left_align_prompts(tokens, jnp.asarray([4, 2]), PAD)
    out = generate(CONFIG, params, prompts, mask, max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    want = _reference_greedy(trainable, frozen, params, tokens, [4, 2], 4)
    np.testing.assert_array_equal(np.asarray(out), want)
    assert (np.asarray(out)[:, 0] == EOS).all() and (np.asarray(out)[:, 1:] == PAD).all()


def test_incremental_logits_equal_full_forward_in_bfloat16_too():
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 0.15)):
        config = dataclasses.replace(CONFIG, dtype=dtype)
        params = llama.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, config.vocab_size)
        apply = jax.jit(llama.apply, static_argnums=0)
        full = apply(config, params, tokens)
        cache = init_cache(config, 2, 12)
        first, cache = apply(config, params, tokens[:, :7], cache=cache)
        rest = []
        for t in range(7, 10):
            logits, cache = apply(config, params, tokens[:, t : t + 1], cache=cache)
            rest.append(logits)
        chex.assert_trees_all_close(
            jnp.concatenate([first, *rest], axis=1), full, atol=tol, rtol=tol
        )
        assert int(cache.index) == 10


def test_left_align_prompts():
    tokens = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]])
    prompts, mask = left_align_prompts(tokens, jnp.asarray([3, 1]), pad_id=0, width=5)
    np.testing.assert_array_equal(prompts, [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def test_top_p_keeps_only_the_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two, top_p=0.5 only the first.
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
    logits = jnp.repeat(logits, 4000, axis=0)
    draws = np.asarray(sample_next_token(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(draws)) == {1, 3}
    np.testing.assert_allclose(np.mean(draws == 1), 0.5 / 0.8, atol=0.03)
    draws = np.asarray(sample_next_token(logits, jax.random.key(1), temperature=1.0, top_p=0.5))
    assert set(np.unique(draws)) == {1}


def test_temperature_sampling_follows_softmax():
    logits = jnp.repeat(jnp.asarray([[0.0, 1.0, 2.0]]), 20000, axis=0)
    for temperature in (0.5, 2.0):
        draws = np.asarray(sample_next_token(logits, jax.random.key(2), temperature=temperature))
        want = np.asarray(jax.nn.softmax(logits[0] / temperature))
        got = np.bincount(draws, minlength=3) / len(draws)
        np.testing.assert_allclose(got, want, atol=0.015)


def test_sampled_generation_is_seeded():
    trainable, frozen, params = _setup("lora")
    base, kwargs = trainable.model_inputs(frozen, params)
    prompts, mask = left_align_prompts(jnp.full((2, 3), 4), jnp.asarray([3, 3]), PAD)
    run = lambda k: np.asarray(  # noqa: E731
        generate(
            CONFIG,
            base,
            prompts,
            mask,
            max_new_tokens=8,
            eos_id=-1,
            pad_id=PAD,
            model_kwargs=kwargs,
            key=jax.random.key(k),
            temperature=1.5,
        )
    )
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_bad_arguments():
    params = llama.init_params(CONFIG, jax.random.key(0))
    prompts, mask = jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), bool)
    with pytest.raises(ValueError, match="key"):
        generate(
            CONFIG, params, prompts, mask, max_new_tokens=2, eos_id=1, pad_id=0, temperature=1.0
        )
    with pytest.raises(ValueError, match="top_p"):
        generate(CONFIG, params, prompts, mask, max_new_tokens=2, eos_id=1, pad_id=0, top_p=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        llama.apply(CONFIG, params, jnp.ones((1, 5), jnp.int32), cache=init_cache(CONFIG, 1, 4))


def test_one_new_token_is_the_first_of_several():
    trainable, frozen, params = _setup("prefix")
    base, kwargs = trainable.model_inputs(frozen, params)
    prompts, mask = left_align_prompts(jnp.full((2, 4), 7), jnp.asarray([4, 2]), PAD)
    run = lambda n: np.asarray(  # noqa: E731
        generate(
            CONFIG,
            base,
            prompts,
            mask,
            max_new_tokens=n,
            eos_id=-1,
            pad_id=PAD,
            model_kwargs=kwargs,
        )
    )
    np.testing.assert_array_equal(run(1), run(3)[:, :1])
