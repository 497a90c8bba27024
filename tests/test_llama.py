"""Tests of fedjax_llm.models.llama."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.models import llama
from fedjax_llm.models.llama import LlamaConfig

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

apply_jit = jax.jit(llama.apply, static_argnums=0)


def _tokens(key, shape, vocab):
    return jax.random.randint(key, shape, 0, vocab, dtype=jnp.int32)


def _paths(tree):
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _perturb_ones_and_zeros(params, key):
    """Replaces ones-init norm scales and zero-init biases by random values, so tests see them."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    new = []
    for i, (path, leaf) in enumerate(leaves):
        if path[-1].key in ("scale", "bias"):
            leaf = leaf + 0.3 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
        new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


# ---------------------------------------------------------------------------------------------
# Config.


def test_config_defaults_validate():
    LlamaConfig().validate()
    assert LlamaConfig().resolved_head_dim == 16
    assert LlamaConfig(head_dim=8).resolved_head_dim == 8


def test_scan_unroll_default_and_outputs_unchanged():
    assert TINY.resolved_scan_unroll == 2
    deep = dataclasses.replace(TINY, num_layers=llama.UNROLL_LAYERS_UP_TO + 1)
    assert deep.resolved_scan_unroll == 1
    assert dataclasses.replace(deep, scan_unroll=3).resolved_scan_unroll == 3
    params = _perturb_ones_and_zeros(llama.init_params(deep, jax.random.key(0)), jax.random.key(1))
    tokens = _tokens(jax.random.key(2), (2, 7), 37)
    rolled = apply_jit(deep, params, tokens)
    for unroll in (2, deep.num_layers):
        unrolled = apply_jit(dataclasses.replace(deep, scan_unroll=unroll), params, tokens)
        chex.assert_trees_all_close(unrolled, rolled, atol=1e-6, rtol=1e-6)


def _loss_and_grads(config, params, lora, tokens):
    def loss(params, lora):
        logits = llama.apply(config, params, tokens, lora=lora, lora_scaling=2.0)
        return jnp.mean(jax.nn.log_softmax(logits)[:, :-1, 0])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("remat, dtype", [("layer", "float32"), ("layer_dots", "bfloat16")])
def test_remat_keeps_loss_and_gradients(remat, dtype):
    from fedjax_llm.models.lora import init_lora

    # Rolled (as remat resolves scan_unroll) so the two differ only by the recomputation.
    config = dataclasses.replace(TINY, dtype=dtype, scan_unroll=1)
    params = llama.init_params(config, jax.random.key(0))
    params = _perturb_ones_and_zeros(params, jax.random.key(1))
    lora = init_lora(config, jax.random.key(2), 4, ("q", "v", "down"))
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # b = 0 at init would hide its gradients
    tokens = _tokens(jax.random.key(3), (3, 9), 37)
    plain = _loss_and_grads(config, params, lora, tokens)(params, lora)
    rematted = _loss_and_grads(dataclasses.replace(config, remat=remat), params, lora, tokens)
    # The same operations in the same order, only scheduled differently: float32 agrees to
    # rounding (measured: at most 1e-6 apart); bfloat16 came out bit-identical here, but each of
    # its ops rounds to 2^-8, so another fusion on another CPU may flip a last bit.
    tol = 1e-5 if dtype == "float32" else 1e-2
    chex.assert_trees_all_close(rematted(params, lora), plain, rtol=tol, atol=tol)


def test_remat_rolls_the_scan_over_layers_by_default():
    # Unrolled, XLA schedules the recomputation next to the forward pass and nothing is saved.
    assert TINY.resolved_scan_unroll == TINY.num_layers
    assert dataclasses.replace(TINY, remat="layer").resolved_scan_unroll == 1
    assert dataclasses.replace(TINY, remat="layer", scan_unroll=2).resolved_scan_unroll == 2


def test_remat_lowers_the_memory_of_the_gradient():
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_layers=4, max_seq_len=128)
    tokens = _tokens(jax.random.key(0), (8, 128), config.vocab_size)

    def temp_bytes(config):
        params = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
        grad = _loss_and_grads(config, params, None, tokens)
        stats = grad.lower(params, None).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        return stats.temp_size_in_bytes

    # Activations dominate here (8 x 128 tokens, d=64, 4 layers, a 259-token vocabulary):
    # measured 54 MiB of temporaries without remat, 16 MiB with 'layer' (20 MiB with
    # 'layer_dots'; jaxlib 0.10.2, CPU).
    plain = temp_bytes(dataclasses.replace(config, scan_unroll=1))
    layer = temp_bytes(dataclasses.replace(config, remat="layer"))
    assert layer < 0.5 * plain


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": 30}, "divisible by num_heads"),
        ({"num_kv_heads": 3}, "divisible by num_kv_heads"),
        ({"dtype": "float16"}, "float32"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"head_dim": 7}, "even"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"scan_unroll": 0}, "scan_unroll"),
        ({"remat": "full"}, "remat"),
    ],
)
def test_config_validate_errors(changes, match):
    config = dataclasses.replace(LlamaConfig(), **changes)
    with pytest.raises(ValueError, match=match):
        config.validate()
    with pytest.raises(ValueError, match=match):
        llama.init_params(config, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Parameter tree.


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_param_tree_shapes(tie, bias):
    config = dataclasses.replace(TINY, tie_embeddings=tie, attention_bias=bias, head_dim=6)
    params = llama.init_params(config, jax.random.key(0))
    v, d, f, layers, h, kv, hd = 37, 16, 24, 2, 4, 2, 6
    expected = {
        "embed/embedding": (v, d),
        "layers/attn_norm/scale": (layers, d),
        "layers/attn/q_proj/kernel": (layers, d, h * hd),
        "layers/attn/k_proj/kernel": (layers, d, kv * hd),
        "layers/attn/v_proj/kernel": (layers, d, kv * hd),
        "layers/attn/o_proj/kernel": (layers, h * hd, d),
        "layers/mlp_norm/scale": (layers, d),
        "layers/mlp/gate_proj/kernel": (layers, d, f),
        "layers/mlp/up_proj/kernel": (layers, d, f),
        "layers/mlp/down_proj/kernel": (layers, f, d),
        "final_norm/scale": (d,),
    }
    if bias:
        expected["layers/attn/q_proj/bias"] = (layers, h * hd)
        expected["layers/attn/k_proj/bias"] = (layers, kv * hd)
        expected["layers/attn/v_proj/bias"] = (layers, kv * hd)
    if not tie:
        expected["lm_head/kernel"] = (d, v)
    assert _paths(params) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    assert llama.count_params(params) == sum(int(np.prod(s)) for s in expected.values())
    # Layers are initialized independently, norms at one.
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.allclose(q[0], q[1])
    chex.assert_trees_all_equal(params["final_norm"]["scale"], jnp.ones(d))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_shape_and_dtype(tie):
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    params = llama.init_params(config, jax.random.key(0))
    logits = apply_jit(config, params, _tokens(jax.random.key(1), (3, 5), 37))
    chex.assert_shape(logits, (3, 5, 37))
    assert logits.dtype == jnp.float32
    assert ("lm_head" in params) == (not tie)


# ---------------------------------------------------------------------------------------------
# Masking.


def test_causal():
    params = llama.init_params(TINY, jax.random.key(0))
    tokens = _tokens(jax.random.key(1), (2, 8), 37)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 37)
    a = apply_jit(TINY, params, tokens)
    b = apply_jit(TINY, params, changed)
    chex.assert_trees_all_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_padding_mask_left_padding_matches_unpadded():
    # RoPE attention depends only on relative positions, so left-padding by `pad` tokens (masked
    # out) must reproduce the unpadded logits of the real tokens.
    params = llama.init_params(TINY, jax.random.key(0))
    pad = 3
    real = _tokens(jax.random.key(1), (2, 6), 37)
    padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), real], axis=1)
    mask = jnp.arange(pad + 6)[None, :] >= pad
    mask = jnp.broadcast_to(mask, padded.shape)
    got = apply_jit(TINY, params, padded, attention_mask=mask)
    want = apply_jit(TINY, params, real)
    assert np.isfinite(np.asarray(got)).all()  # Fully masked pad rows stay finite.
    chex.assert_trees_all_close(got[:, pad:], want, atol=1e-5, rtol=1e-5)
    # The values behind masked positions are never seen.
    other = padded.at[:, :pad].set(7)
    got_other = apply_jit(TINY, params, other, attention_mask=mask)
    chex.assert_trees_all_close(got_other[:, pad:], got[:, pad:], atol=1e-6, rtol=0)


def test_padding_mask_middle_position():
    params = llama.init_params(TINY, jax.random.key(0))
    tokens = _tokens(jax.random.key(1), (2, 7), 37)
    mask = jnp.ones((2, 7), bool).at[:, 2].set(False)
    a = apply_jit(TINY, params, tokens, attention_mask=mask)
    b = apply_jit(TINY, params, tokens.at[:, 2].set(11), attention_mask=mask)
    chex.assert_trees_all_close(a[:, 3:], b[:, 3:], atol=1e-6, rtol=0)
    unmasked = apply_jit(TINY, params, tokens)
    assert not np.allclose(a[:, 3:], unmasked[:, 3:])


# ---------------------------------------------------------------------------------------------
# Attention variants.


def test_gqa_equals_mha_with_repeated_kv():
    gqa = TINY
    mha = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    params = llama.init_params(gqa, jax.random.key(0))
    repeats = gqa.num_heads // gqa.num_kv_heads
    hd = gqa.resolved_head_dim

    def repeat_heads(kernel):
        layers, d, _ = kernel.shape
        per_head = kernel.reshape(layers, d, gqa.num_kv_heads, hd)
        # Query head h reads kv head h // repeats (HF repeat_kv).
        return jnp.repeat(per_head, repeats, axis=2).reshape(layers, d, gqa.num_heads * hd)

    mha_params = jax.tree_util.tree_map(lambda x: x, params)
    attn = mha_params["layers"]["attn"]
    attn["k_proj"] = {"kernel": repeat_heads(attn["k_proj"]["kernel"])}
    attn["v_proj"] = {"kernel": repeat_heads(attn["v_proj"]["kernel"])}
    tokens = _tokens(jax.random.key(1), (2, 7), 37)
    chex.assert_trees_all_close(
        apply_jit(gqa, params, tokens), apply_jit(mha, mha_params, tokens), atol=1e-5, rtol=1e-5
    )


def test_rotary_matches_pairwise_rotation():
    # HF "rotate_half": dimension i pairs with i + hd/2 and turns by pos * theta^(-2i/hd).
    hd, theta = 8, 500.0
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, hd)), np.float64)
    positions = np.arange(5) + 3
    got = jax.jit(llama.apply_rotary, static_argnums=2)(
        jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta
    )
    want = np.empty_like(x)
    half = hd // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            angle = pos * theta ** (-2 * i / hd)
            c, s = np.cos(angle), np.sin(angle)
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            want[0, t, :, i] = a * c - b * s
            want[0, t, :, i + half] = b * c + a * s
    chex.assert_trees_all_close(got, want.astype(np.float32), atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    hd, theta = 16, 10000.0
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, hd))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, hd))
    rotate = jax.jit(llama.apply_rotary, static_argnums=2)

    def score(m, n):
        qm = rotate(q, jnp.array([m]), theta)
        kn = rotate(k, jnp.array([n]), theta)
        return float(jnp.sum(qm * kn))

    for m, n in [(3, 1), (7, 7), (2, 9)]:
        for shift in (1, 5, 20):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(4, 1), abs=1e-3)
    # Closed form: with hd = 2 the score is |q||k| cos(angle(q) - angle(k) + (m - n)).
    q2, k2 = jnp.array([[[[1.0, 0.0]]]]), jnp.array([[[[0.0, 1.0]]]])
    s = float(jnp.sum(rotate(q2, jnp.array([4]), 1.0) * rotate(k2, jnp.array([1]), 1.0)))
    assert s == pytest.approx(np.cos(3.0 - np.pi / 2), abs=1e-6)


def test_bfloat16_compute_close_to_float32():
    f32 = TINY
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    params = llama.init_params(f32, jax.random.key(0))
    tokens = _tokens(jax.random.key(1), (2, 8), 37)
    a = apply_jit(f32, params, tokens)
    b = apply_jit(bf16, params, tokens)
    assert b.dtype == jnp.float32
    assert np.isfinite(np.asarray(b)).all()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op). On this config the largest
    # difference measured about 1.4% of the largest f32 logit; the bound is 5% of it, a loose
    # check that bf16 computes the same function, not a precision claim.
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) <= 0.05 * scale


def test_bfloat16_params_stay_float32():
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    params = llama.init_params(bf16, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------------------------
# Reference forward pass (float64 numpy, one query head at a time, no shared code with the model).


def _reference_forward(
    config, params, tokens, attention_mask=None, lora=None, scaling=1.0, prompt=None, prefix=None
):
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    lora = (
        None if lora is None else jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), lora)
    )
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    mask = np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask)
    h, kv, hd = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    half = hd // 2

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + config.rms_norm_eps) * scale

    def rope(x, positions):  # x: [N, heads, hd]
        out = x.copy()
        for i in range(half):
            angle = positions * config.rope_theta ** (-2 * i / hd)
            c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
            out[:, :, i] = x[:, :, i] * c - x[:, :, i + half] * s
            out[:, :, i + half] = x[:, :, i + half] * c + x[:, :, i] * s
        return out

    logits = np.zeros((batch, length, config.vocab_size))
    for bi in range(batch):
        x = p["embed"]["embedding"][tokens[bi]]
        valid = mask[bi]
        num_prompt = 0
        if prompt is not None:
            num_prompt = prompt.shape[0]
            x = np.concatenate([np.asarray(prompt, np.float64), x])
            valid = np.concatenate([np.ones(num_prompt, bool), valid])
        n = x.shape[0]
        # A token's position counts the real tokens before it (HF's position_ids from the mask).
        positions = np.maximum(np.cumsum(valid) - 1, 0).astype(np.float64)
        for layer in range(config.num_layers):
            lp = jax.tree_util.tree_map(lambda w, layer=layer: w[layer], p["layers"])

            def linear(inp, module, name, target, lp=lp, layer=layer):
                out = inp @ lp[module][name]["kernel"]
                if "bias" in lp[module][name]:
                    out = out + lp[module][name]["bias"]
                if lora is not None and target in lora:
                    out = (
                        out + scaling * (inp @ lora[target]["a"][layer]) @ lora[target]["b"][layer]
                    )
                return out

            y = rms(x, lp["attn_norm"]["scale"])
            q = rope(linear(y, "attn", "q_proj", "q").reshape(n, h, hd), positions)
            k = rope(linear(y, "attn", "k_proj", "k").reshape(n, kv, hd), positions)
            v = linear(y, "attn", "v_proj", "v").reshape(n, kv, hd)
            num_prefix = 0
            if prefix is not None:
                num_prefix = prefix["key"].shape[1]
                k = np.concatenate([np.asarray(prefix["key"][layer], np.float64), k])
                v = np.concatenate([np.asarray(prefix["value"][layer], np.float64), v])
            allowed = np.zeros((n, num_prefix + n), bool)
            allowed[:, :num_prefix] = True
            for i in range(n):
                for j in range(i + 1):
                    allowed[i, num_prefix + j] = valid[j]
            heads = []
            for head in range(h):
                kv_head = head // (h // kv)
                s = q[:, head] @ k[:, kv_head].T / np.sqrt(hd)
                s = np.where(allowed, s, -np.inf)
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                heads.append((s / s.sum(axis=-1, keepdims=True)) @ v[:, kv_head])
            x = x + linear(np.concatenate(heads, axis=-1), "attn", "o_proj", "o")
            y = rms(x, lp["mlp_norm"]["scale"])
            gate = linear(y, "mlp", "gate_proj", "gate")
            up = linear(y, "mlp", "up_proj", "up")
            x = x + linear(gate / (1 + np.exp(-gate)) * up, "mlp", "down_proj", "down")
        x = rms(x, p["final_norm"]["scale"])[num_prompt:]
        if config.tie_embeddings:
            logits[bi] = x @ p["embed"]["embedding"].T
        else:
            logits[bi] = x @ p["lm_head"]["kernel"]
    return logits.astype(np.float32)


ONE_LAYER = dataclasses.replace(TINY, num_layers=1)


@pytest.mark.parametrize(
    "config",
    [
        ONE_LAYER,
        dataclasses.replace(ONE_LAYER, tie_embeddings=False, attention_bias=True, head_dim=6),
        dataclasses.replace(ONE_LAYER, num_kv_heads=1, rope_theta=50.0),
        dataclasses.replace(TINY, num_kv_heads=4),
    ],
    ids=["tied", "untied_bias_headdim", "mqa_theta", "two_layers_mha"],
)
def test_matches_reference_forward(config):
    params = _perturb_ones_and_zeros(
        llama.init_params(config, jax.random.key(0)), jax.random.key(2)
    )
    tokens = _tokens(jax.random.key(1), (2, 7), 37)
    mask = jnp.ones((2, 7), bool).at[1, 1].set(False)
    got = apply_jit(config, params, tokens, attention_mask=mask)
    want = _reference_forward(config, params, tokens, attention_mask=mask)
    assert float(np.abs(want).max()) > 0.1  # Logits are not trivially small.
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_matches_reference_with_lora_prompt_and_prefix():
    config = ONE_LAYER
    params = _perturb_ones_and_zeros(
        llama.init_params(config, jax.random.key(0)), jax.random.key(2)
    )
    keys = iter(jax.random.split(jax.random.key(3), 20))
    dims = llama.lora_target_dims(config)
    lora = {
        t: {
            "a": 0.3 * jax.random.normal(next(keys), (1, dims[t][0], 3)),
            "b": 0.3 * jax.random.normal(next(keys), (1, 3, dims[t][1])),
        }
        for t in ("q", "v", "o", "down")
    }
    prompt = 0.3 * jax.random.normal(next(keys), (2, 16))
    prefix = {
        "key": 0.3 * jax.random.normal(next(keys), (1, 3, 2, 4)),
        "value": 0.3 * jax.random.normal(next(keys), (1, 3, 2, 4)),
    }
    tokens = _tokens(jax.random.key(1), (2, 6), 37)
    mask = jnp.ones((2, 6), bool).at[0, 2].set(False)
    kwargs = dict(lora=lora, prompt_embeddings=prompt, prefix=prefix, attention_mask=mask)
    got = apply_jit(config, params, tokens, lora_scaling=0.7, **kwargs)
    want = _reference_forward(
        config,
        params,
        tokens,
        attention_mask=mask,
        lora=lora,
        scaling=0.7,
        prompt=prompt,
        prefix=prefix,
    )
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_query_blocks_tile_the_queries_and_reach_the_keys_up_to_their_end():
    assert llama.query_blocks(10, 3, 4) == [(0, 4, 7), (4, 8, 11), (8, 10, 13)]
    assert llama.query_blocks(8, 0, 8) == [(0, 8, 8)]
    assert llama.query_blocks(5, 2, 128) == [(0, 5, 7)]


def test_attention_block_value_and_gradients_equal_softmax_attention():
    """Normalizing after the product with the values (and the stopped maximum) changes
    nothing: value and gradients equal softmax(q k^T / sqrt(d), masked) @ v."""
    kq, kk, kv_, km, kg = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(kq, (2, 3, 2, 5, 4))  # [b, kv, g, t, d]
    k = 3.0 * jax.random.normal(kk, (2, 3, 7, 4))  # large scores: the maximum matters
    v = jax.random.normal(kv_, (2, 3, 7, 4))
    mask = jax.random.bernoulli(km, 0.6, (2, 5, 7)).at[:, :, 0].set(True)
    cotangent = jax.random.normal(kg, q.shape)

    def plain(q, k, v):
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) / 2.0
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("bkgts,bksd->bkgtd", probs, v)

    def blocked(q, k, v):
        return llama._attend_block(q, k, v, mask, jnp.float32)

    got, got_vjp = jax.vjp(blocked, q, k, v)
    want, want_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_vjp(cotangent), want_vjp(cotangent), rtol=1e-5, atol=1e-5)


def _trainable_inputs(config, key, num_layers):
    """LoRA factors, a soft prompt and prefix keys/values for `config`, drawn from `key`."""
    keys = iter(jax.random.split(key, 20))
    dims = llama.lora_target_dims(config)
    lora = {
        t: {
            "a": 0.3 * jax.random.normal(next(keys), (num_layers, dims[t][0], 3)),
            "b": 0.3 * jax.random.normal(next(keys), (num_layers, 3, dims[t][1])),
        }
        for t in ("q", "v", "o")
    }
    kv, hd = config.num_kv_heads, config.resolved_head_dim
    prompt = 0.3 * jax.random.normal(next(keys), (2, config.hidden_size))
    prefix = {
        "key": 0.3 * jax.random.normal(next(keys), (num_layers, 3, kv, hd)),
        "value": 0.3 * jax.random.normal(next(keys), (num_layers, 3, kv, hd)),
    }
    return lora, prompt, prefix


def test_blocked_causal_attention_matches_reference_and_the_one_block_attention(monkeypatch):
    """Queries in blocks of 3 (12 positions with the soft prompt: 4 blocks, keys up to each
    block's end, the 3 prefix slots always) give the float64 reference's logits, and the same
    logits and gradients as one block over all keys; pads (a leading one, a middle one) too."""
    config = TINY
    params = _perturb_ones_and_zeros(
        llama.init_params(config, jax.random.key(0)), jax.random.key(2)
    )
    lora, prompt, prefix = _trainable_inputs(config, jax.random.key(3), config.num_layers)
    tokens = _tokens(jax.random.key(1), (2, 10), 37)
    mask = jnp.ones((2, 10), bool).at[0, 0].set(False).at[1, 4].set(False)
    weights = jax.random.normal(jax.random.key(4), (2, 10, config.vocab_size))

    def loss(trained):
        lora, prompt, prefix = trained
        logits = llama.apply(
            config,
            params,
            tokens,
            attention_mask=mask,
            lora=lora,
            lora_scaling=0.7,
            prompt_embeddings=prompt,
            prefix=prefix,
        )
        return jnp.sum(logits * weights), logits

    def run(block):
        monkeypatch.setattr(llama, "ATTENTION_QUERY_BLOCK", block)
        fn = jax.value_and_grad(loss, has_aux=True)  # a new function: traced for this block
        products = str(jax.make_jaxpr(fn)((lora, prompt, prefix))).count("dot_general")
        (_, logits), grads = jax.jit(fn)((lora, prompt, prefix))
        return logits, grads, products

    blocked_logits, blocked_grads, blocked_products = run(3)
    plain_logits, plain_grads, plain_products = run(1_000)
    assert blocked_products > plain_products  # the blocks are separate products
    want = _reference_forward(
        config,
        params,
        tokens,
        attention_mask=mask,
        lora=lora,
        scaling=0.7,
        prompt=prompt,
        prefix=prefix,
    )
    np.testing.assert_allclose(blocked_logits, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(blocked_logits, plain_logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(blocked_grads, plain_grads, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Input checking and transforms.


def test_bad_inputs_raise():
    params = llama.init_params(TINY, jax.random.key(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="Unknown LoRA target"):
        llama.apply(
            TINY,
            params,
            tokens,
            lora={"qq": {"a": jnp.zeros((2, 16, 2)), "b": jnp.zeros((2, 2, 16))}},
        )
    with pytest.raises(ValueError, match="expected a="):
        llama.apply(
            TINY,
            params,
            tokens,
            lora={"q": {"a": jnp.zeros((2, 16, 2)), "b": jnp.zeros((2, 3, 16))}},
        )
    with pytest.raises(ValueError, match="prompt_embeddings"):
        llama.apply(TINY, params, tokens, prompt_embeddings=jnp.zeros((3, 15)))
    with pytest.raises(ValueError, match="prefix"):
        llama.apply(
            TINY,
            params,
            tokens,
            prefix={"key": jnp.zeros((2, 3, 4, 4)), "value": jnp.zeros((2, 3, 4, 4))},
        )
    with pytest.raises(ValueError, match="attention_mask"):
        llama.apply(TINY, params, tokens, attention_mask=jnp.ones((1, 5), bool))


def test_jit_traces_once_per_shape():
    params = llama.init_params(TINY, jax.random.key(0))
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, tokens):
        return llama.apply(TINY, params, tokens)

    forward(params, _tokens(jax.random.key(1), (2, 5), 37))
    forward(params, _tokens(jax.random.key(2), (2, 5), 37))
