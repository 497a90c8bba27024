"""Tests of fedjax_llm.models.{lora, soft_prompt, prefix, trainable}."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.models import llama
from fedjax_llm.models.llama import LlamaConfig
from fedjax_llm.models.lora import LORA_TARGETS, init_lora
from fedjax_llm.models.prefix import init_prefix
from fedjax_llm.models.soft_prompt import init_soft_prompt
from fedjax_llm.models.trainable import TRAINABLE_MODES, make_trainable

TINY = LlamaConfig(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=16,
    initializer_range=0.3,
)

MODE_OPTIONS = {
    "full": {},
    "lora": {"lora_rank": 3, "lora_alpha": 6.0, "lora_targets": ("q", "v", "down")},
    "soft_prompt": {"num_virtual_tokens": 3},
    "prefix": {"num_virtual_tokens": 3},
}


@pytest.fixture(scope="module")
def base_params():
    return llama.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 6), 0, 37, dtype=jnp.int32)


def _loss(trainable, apply, frozen, tokens):
    logits = apply(frozen, trainable, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ---------------------------------------------------------------------------------------------
# LoRA.


def test_init_lora_shapes_and_zero_b():
    lora = init_lora(TINY, jax.random.key(0), rank=3, targets=LORA_TARGETS)
    dims = llama.lora_target_dims(TINY)
    assert set(lora) == set(LORA_TARGETS)
    for target, (d_in, d_out) in dims.items():
        chex.assert_shape(lora[target]["a"], (2, d_in, 3))
        chex.assert_shape(lora[target]["b"], (2, 3, d_out))
        chex.assert_trees_all_equal(lora[target]["b"], jnp.zeros((2, 3, d_out)))
        # PEFT's Kaiming-uniform bound 1/sqrt(d_in).
        assert float(jnp.max(jnp.abs(lora[target]["a"]))) <= 1 / np.sqrt(d_in)
    # A target's init does not depend on which other targets are chosen.
    only_v = init_lora(TINY, jax.random.key(0), rank=3, targets=["v"])
    chex.assert_trees_all_equal(only_v["v"], lora["v"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0, "targets": ("q",)}, "rank"),
        ({"rank": 2, "targets": ("q", "qkv")}, "Unknown LoRA target"),
        ({"rank": 2, "targets": ()}, "at least one"),
        ({"rank": 2, "targets": "gate"}, "sequence of names"),
    ],
)
def test_init_lora_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        init_lora(TINY, jax.random.key(0), **kwargs)


def test_lora_zero_b_is_bit_exact(base_params, tokens):
    trainable = make_trainable(TINY, "lora", lora_rank=4, lora_targets=LORA_TARGETS)
    lora = trainable.init(jax.random.key(3), base_params)
    got = jax.jit(trainable.apply)(trainable.frozen(base_params), lora, tokens)
    want = jax.jit(llama.apply, static_argnums=0)(TINY, base_params, tokens)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("targets", [("q", "v"), LORA_TARGETS])
def test_lora_equals_merged_weights(base_params, tokens, targets):
    rank, alpha = 3, 5.0
    trainable = make_trainable(TINY, "lora", lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    lora = trainable.init(jax.random.key(3), base_params)
    lora = {
        t: {"a": f["a"], "b": 0.3 * jax.random.normal(jax.random.key(i), f["b"].shape)}
        for i, (t, f) in enumerate(lora.items())
    }
    scaling = alpha / rank
    sites = {
        "q": ("attn", "q_proj"),
        "k": ("attn", "k_proj"),
        "v": ("attn", "v_proj"),
        "o": ("attn", "o_proj"),
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj"),
    }
    merged = jax.tree_util.tree_map(lambda x: x, base_params)
    for target, factors in lora.items():
        module, name = sites[target]
        kernel = merged["layers"][module][name]["kernel"]
        delta = jnp.einsum("lir,lro->lio", factors["a"], factors["b"])
        merged["layers"][module][name] = {"kernel": kernel + scaling * delta}
    got = jax.jit(trainable.apply)(trainable.frozen(base_params), lora, tokens)
    want = jax.jit(llama.apply, static_argnums=0)(TINY, merged, tokens)
    assert not np.allclose(got, jax.jit(llama.apply, static_argnums=0)(TINY, base_params, tokens))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_vmap_over_clients_equals_loop(base_params, tokens):
    num_clients = 3
    trainable = make_trainable(TINY, "lora", lora_rank=2, lora_targets=("q", "v", "up"))
    keys = jax.random.split(jax.random.key(5), num_clients)
    # Nonzero b, different per client, so clients really differ.
    client_lora = jax.vmap(
        lambda k: jax.tree_util.tree_map(
            lambda x: x + 0.3 * jax.random.normal(k, x.shape), trainable.init(k, base_params)
        )
    )(keys)
    client_tokens = jax.random.randint(jax.random.key(6), (num_clients, 2, 6), 0, 37)
    frozen = trainable.frozen(base_params)

    @jax.jit
    def all_clients(client_lora, client_tokens):
        # The frozen base is closed over: one copy shared by every client.
        return jax.vmap(lambda lora, t: trainable.apply(frozen, lora, t))(
            client_lora, client_tokens
        )

    got = all_clients(client_lora, client_tokens)
    one_client = jax.jit(trainable.apply)
    for c in range(num_clients):
        lora_c = jax.tree_util.tree_map(lambda x, c=c: x[c], client_lora)
        chex.assert_trees_all_close(
            got[c], one_client(frozen, lora_c, client_tokens[c]), atol=1e-5, rtol=1e-5
        )
    assert not np.allclose(got[0], got[1])


def _all_shapes(jaxpr):
    """Shapes of every intermediate value, including inside scan / pjit sub-programs."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns"):
                    yield from _all_shapes(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _all_shapes(sub.jaxpr)


def test_lora_vmap_never_materializes_per_client_kernels():
    config = dataclasses.replace(TINY, hidden_size=24, intermediate_size=40)
    base = llama.init_params(config, jax.random.key(0))
    trainable = make_trainable(config, "lora", lora_rank=2, lora_targets=LORA_TARGETS)
    num_clients = 3
    client_lora = jax.vmap(lambda k: trainable.init(k, base))(
        jax.random.split(jax.random.key(1), 3)
    )
    tokens = jnp.zeros((2, 5), jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda lora: jax.vmap(trainable.apply, in_axes=(None, 0, None))(base, lora, tokens)
    )(client_lora).jaxpr
    shapes = set(_all_shapes(jaxpr))
    for d_in, d_out in llama.lora_target_dims(config).values():
        assert (num_clients, d_in, d_out) not in shapes
        assert (num_clients, config.num_layers, d_in, d_out) not in shapes


# ---------------------------------------------------------------------------------------------
# Soft prompt and prefix.


def test_init_soft_prompt(base_params):
    prompt = init_soft_prompt(TINY, base_params, jax.random.key(0), 5, init="vocab")
    chex.assert_shape(prompt, (5, 16))
    embedding = np.asarray(base_params["embed"]["embedding"])
    for row in np.asarray(prompt):
        assert np.any(np.all(embedding == row, axis=-1)), "vocab init must copy embedding rows"
    random = init_soft_prompt(TINY, base_params, jax.random.key(0), 5, init="random")
    chex.assert_shape(random, (5, 16))
    assert float(jnp.std(random)) == pytest.approx(0.3, rel=0.5)
    with pytest.raises(ValueError, match="vocab"):
        init_soft_prompt(TINY, base_params, jax.random.key(0), 5, init="zeros")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        init_soft_prompt(TINY, base_params, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="embedding"):
        init_soft_prompt(TINY, {}, jax.random.key(0), 2)


def test_init_prefix():
    prefix = init_prefix(TINY, jax.random.key(0), 5)
    chex.assert_shape([prefix["key"], prefix["value"]], (2, 5, 2, 4))
    assert not np.allclose(prefix["key"], prefix["value"])
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        init_prefix(TINY, jax.random.key(0), -1)


@pytest.mark.parametrize("mode", ["soft_prompt", "prefix"])
def test_prompt_modes_change_logits_and_get_gradients(base_params, tokens, mode):
    trainable = make_trainable(TINY, mode, num_virtual_tokens=3)
    params = trainable.init(jax.random.key(2), base_params)
    frozen = trainable.frozen(base_params)
    logits = jax.jit(trainable.apply)(frozen, params, tokens)
    chex.assert_shape(logits, (2, 6, 37))
    base_logits = jax.jit(llama.apply, static_argnums=0)(TINY, base_params, tokens)
    assert not np.allclose(logits, base_logits, atol=1e-3)
    grads = jax.jit(jax.grad(_loss), static_argnums=1)(params, trainable.apply, frozen, tokens)
    chex.assert_trees_all_equal_shapes(grads, params)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
        assert float(jnp.linalg.norm(leaf)) > 1e-6
    if mode == "prefix":
        # Every layer's prefix receives gradient.
        for layer in range(TINY.num_layers):
            assert float(jnp.linalg.norm(grads["key"][layer])) > 1e-8
            assert float(jnp.linalg.norm(grads["value"][layer])) > 1e-8


def test_soft_prompt_shifts_positions(base_params, tokens):
    # With a soft prompt equal to the embeddings of real tokens, the model must see exactly the
    # concatenated sequence: prompt at positions 0..P-1, real tokens from P on.
    trainable = make_trainable(TINY, "soft_prompt", num_virtual_tokens=3)
    prefix_ids = jnp.array([4, 9, 2], jnp.int32)
    prompt = base_params["embed"]["embedding"][prefix_ids]
    got = jax.jit(trainable.apply)(base_params, prompt, tokens)
    full = jnp.concatenate([jnp.broadcast_to(prefix_ids, (2, 3)), tokens], axis=1)
    want = jax.jit(llama.apply, static_argnums=0)(TINY, base_params, full)[:, 3:]
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_soft_prompt_is_always_attended(base_params, tokens):
    trainable = make_trainable(TINY, "soft_prompt", num_virtual_tokens=3)
    prompt = trainable.init(jax.random.key(2), base_params)
    mask = jnp.ones((2, 6), bool).at[:, 1].set(False)
    logits = jax.jit(trainable.apply)(base_params, prompt, tokens, attention_mask=mask)
    other = jax.jit(trainable.apply)(base_params, prompt * 2.0, tokens, attention_mask=mask)
    assert np.isfinite(np.asarray(logits)).all()
    assert not np.allclose(logits[:, 0], other[:, 0])


# ---------------------------------------------------------------------------------------------
# All modes.


@pytest.mark.parametrize("mode", TRAINABLE_MODES)
def test_modes_vmap_over_clients_equals_loop(base_params, tokens, mode):
    trainable = make_trainable(TINY, mode, **MODE_OPTIONS[mode])
    keys = jax.random.split(jax.random.key(7), 2)
    client_params = jax.vmap(
        lambda k: jax.tree_util.tree_map(
            lambda x: x + 0.1 * jax.random.normal(k, x.shape), trainable.init(k, base_params)
        )
    )(keys)
    frozen = trainable.frozen(base_params)
    chex.clear_trace_counter()  # The counter is keyed by code location, shared across params.

    @jax.jit
    @chex.assert_max_traces(n=1)
    def all_clients(client_params, tokens):
        return jax.vmap(trainable.apply, in_axes=(None, 0, None))(frozen, client_params, tokens)

    got = all_clients(client_params, tokens)
    all_clients(client_params, tokens + 1)  # Same shapes: no re-trace.
    chex.assert_shape(got, (2, 2, 6, 37))
    assert got.dtype == jnp.float32
    for c in range(2):
        one = jax.tree_util.tree_map(lambda x, c=c: x[c], client_params)
        chex.assert_trees_all_close(
            got[c], jax.jit(trainable.apply)(frozen, one, tokens), atol=1e-5, rtol=1e-5
        )


def test_full_mode(base_params, tokens):
    trainable = make_trainable(TINY, "full")
    assert trainable.mode == "full"
    params = trainable.init(jax.random.key(0), base_params)
    assert params is base_params
    assert trainable.frozen(base_params) == {}
    got = jax.jit(trainable.apply)({}, params, tokens)
    want = jax.jit(llama.apply, static_argnums=0)(TINY, base_params, tokens)
    chex.assert_trees_all_equal(got, want)
    grads = jax.jit(jax.grad(_loss), static_argnums=1)(params, trainable.apply, {}, tokens)
    chex.assert_trees_all_equal_shapes(grads, base_params)


@pytest.mark.parametrize("mode", ["lora", "soft_prompt", "prefix"])
def test_frozen_is_base(base_params, mode):
    trainable = make_trainable(TINY, mode, **MODE_OPTIONS[mode])
    assert trainable.frozen(base_params) is base_params


@pytest.mark.parametrize(
    "mode, kwargs, match",
    [
        ("adapter", {}, "full"),
        ("lora", {"lora_rank": 0}, "lora_rank"),
        ("lora", {"lora_targets": ("q", "x")}, "Unknown LoRA target"),
        ("soft_prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ("soft_prompt", {"prompt_init": "zeros"}, "vocab"),
        ("prefix", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ],
)
def test_make_trainable_errors(mode, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainable(TINY, mode, **kwargs)


def test_make_trainable_validates_config():
    with pytest.raises(ValueError, match="dtype"):
        make_trainable(dataclasses.replace(TINY, dtype="fp8"), "lora")
