"""bfloat16 products written as float32-result products rounded once (fedjax_llm.models.matmul)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fedjax_llm.models import llama, matmul
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss


@pytest.fixture(autouse=True)
def _fresh_traces():
    """Traces made under a forced form must not be reused by other tests."""
    yield
    jax.clear_caches()


def _use_form(monkeypatch, fast: bool) -> None:
    """Forces the float32-result products on or off (the CPU backend has them on)."""
    monkeypatch.setattr(matmul, "rounds_float32_products", lambda: fast)
    jax.clear_caches()  # traces of the other form must not be reused


@pytest.fixture(params=[True, False], ids=["float32-result", "plain"])
def formulation(request, monkeypatch):
    """Runs a test under each form."""
    _use_form(monkeypatch, request.param)
    return request.param


def _bf16(rng, shape):
    return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def _f64(a):
    return np.asarray(a, np.float64)


def _round_bf16(a):
    return _f64(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16))


def _close_in_bf16(got, want):
    # One rounding to bfloat16 (8 significant bits) of a float32 sum: within 2 ulps of the
    # exact product rounded, whatever the order of the float32 additions.
    np.testing.assert_allclose(_f64(got), _round_bf16(want), rtol=2**-7, atol=1e-6)


def test_product_and_its_gradients_match_numpy_by_hand(formulation):
    rng = np.random.default_rng(0)
    x, w, g = _bf16(rng, (3, 5, 16)), _bf16(rng, (16, 12)), _bf16(rng, (3, 5, 12))
    y, vjp = jax.vjp(matmul.matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    _close_in_bf16(y, _f64(x) @ _f64(w))
    _close_in_bf16(dx, _f64(g) @ _f64(w).T)
    _close_in_bf16(dw, np.einsum("btd,btf->df", _f64(x), _f64(g)))


def test_shared_weight_under_vmap_gets_the_sum_of_the_clients_gradients(formulation):
    rng = np.random.default_rng(1)
    x, w = _bf16(rng, (4, 6, 8)), _bf16(rng, (8, 5))

    def loss(w, x):
        return jnp.sum(matmul.matmul(x, w).astype(jnp.float32) ** 2)

    per_client = jax.vmap(jax.grad(loss), (None, 0))(w, x)
    summed = jax.grad(lambda w: jnp.sum(jax.vmap(loss, (None, 0))(w, x)))(w)
    by_hand = sum(2 * _f64(x[c]).T @ (_f64(x[c]) @ _f64(w)) for c in range(4))
    # Sums of bfloat16-rounded terms: an error relative to the gradient's scale.
    tolerance = 1e-2 * np.abs(by_hand).max()
    np.testing.assert_allclose(_f64(summed), by_hand, rtol=0, atol=tolerance)
    np.testing.assert_allclose(_f64(summed), _f64(per_client).sum(0), rtol=0, atol=tolerance)


def _dots(lowered_text: str) -> list[str]:
    """(operand types -> result type) of every dot_general in a lowered StableHLO module."""
    return re.findall(r"stablehlo\.dot_general.*?: \((.*?)\) -> (\S+)", lowered_text)


def test_cpu_products_take_bfloat16_operands_and_give_float32_results(monkeypatch):
    """Forward and backward products of the fast form: bfloat16 in, float32 out (the form
    XLA's CPU backend sends to its bfloat16 kernels); the plain form has bfloat16 results."""
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, (4, 8, 16)), _bf16(rng, (16, 32))

    def loss(x, w):
        return jnp.sum(matmul.matmul(x, w).astype(jnp.float32) ** 2)

    def grads(x, w):
        return jax.grad(loss, (0, 1))(x, w)

    _use_form(monkeypatch, True)
    fast = _dots(jax.jit(grads).lower(x, w).as_text())
    assert len(fast) == 3, fast  # forward, dx, dw
    for operands, result in fast:
        assert operands.count("bf16") == 2 and "f32" in result, (operands, result)
    # A frozen weight gets no gradient product.
    frozen = jax.jit(jax.grad(lambda x: loss(x, w)))
    assert len(_dots(frozen.lower(x).as_text())) == 2

    _use_form(monkeypatch, False)
    plain = _dots(jax.jit(grads).lower(x, w).as_text())
    assert any("bf16" in result for _, result in plain), plain


def test_cpu_attention_products_take_bfloat16_operands(monkeypatch):
    """Attention's two products and their four backward products, in the fast form."""
    _use_form(monkeypatch, True)
    rng = np.random.default_rng(6)
    q, k, v = _bf16(rng, (2, 8, 2, 2, 4)), _bf16(rng, (2, 8, 2, 4)), _bf16(rng, (2, 8, 2, 4))

    def attention(q, k, v):
        scores = matmul.einsum("btkgd,bskd->bkgts", q, k, jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(jnp.bfloat16)
        out = matmul.einsum("bkgts,bskd->btkgd", probs, v)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    dots = _dots(jax.jit(jax.grad(attention, (0, 1, 2))).lower(q, k, v).as_text())
    assert len(dots) == 6, dots
    for operands, result in dots:
        assert operands.count("bf16") == 2 and "f32" in result, (operands, result)


@pytest.mark.parametrize(
    "spec, a_shape, b_shape, out_dtype",
    [
        ("btkgd,bskd->bkgts", (2, 5, 2, 3, 4), (2, 6, 2, 4), jnp.float32),  # attention scores
        ("bkgts,bskd->btkgd", (2, 2, 3, 5, 6), (2, 6, 2, 4), None),  # probabilities @ values
    ],
)
def test_einsum_and_its_gradients_match_numpy_by_hand(
    formulation, spec, a_shape, b_shape, out_dtype
):
    rng = np.random.default_rng(5)
    a, b = _bf16(rng, a_shape), _bf16(rng, b_shape)
    y, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, out_dtype), a, b)
    g = jnp.asarray(rng.normal(size=y.shape), y.dtype)
    da, db = vjp(g)
    want = np.einsum(spec, _f64(a), _f64(b))
    if out_dtype == jnp.float32:  # not rounded: float32 sums of exact bfloat16 products
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(_f64(y), want, rtol=1e-5, atol=1e-5)
    else:
        assert y.dtype == jnp.bfloat16
        _close_in_bf16(y, want)
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    # The fast form rounds a float32 cotangent to bfloat16 for its products: errors relative
    # to the gradient's scale.
    for got, operand_spec, other, other_spec in ((da, sa, b, sb), (db, sb, a, sa)):
        exact = np.einsum(f"{out},{other_spec}->{operand_spec}", _f64(g), _f64(other))
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(_f64(got), exact, rtol=0, atol=2e-2 * np.abs(exact).max())


def test_float32_products_are_the_plain_product():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    assert "custom_vjp" not in str(jax.make_jaxpr(matmul.matmul)(x, w))
    np.testing.assert_array_equal(matmul.matmul(x, w), jax.lax.dot(x, w))


def test_dense_with_the_hook_equals_flax_dense(formulation):
    rng = np.random.default_rng(4)
    x = _bf16(rng, (2, 3, 8))
    plain = nn.Dense(6, dtype=jnp.bfloat16)
    hooked = nn.Dense(6, dtype=jnp.bfloat16, dot_general=matmul.dense_dot_general)
    params = plain.init(jax.random.key(0), x)
    _close_in_bf16(hooked.apply(params, x), _f64(plain.apply(params, x)))


def _lora_setup(dtype: str, remat: str = "none"):
    cfg = llama.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
        dtype=dtype,
        remat=remat,
    )
    trainable = make_trainable(cfg, "lora", lora_rank=4, lora_targets=("q", "v", "down"))
    base = llama.init_params(cfg, jax.random.key(0))
    frozen, params = trainable.frozen(base), trainable.init(jax.random.key(1), base)
    # Non-zero B factors, so that the LoRA products matter.
    params = jax.tree.map(lambda p: p + 0.05, params)
    tokens = jax.random.randint(jax.random.key(2), (2, 4, 16), 1, cfg.vocab_size)
    batch = {
        "tokens": tokens,
        "loss_mask": jnp.ones(tokens.shape, jnp.float32),
        "example_weight": jnp.ones(tokens.shape[:2], jnp.float32),
    }
    objective = next_token_loss(trainable.apply, 0)

    def loss_and_grad(p, b):
        return jax.value_and_grad(lambda q: objective.loss(frozen, q, b, None)[0])(p)

    return jax.vmap(loss_and_grad, (None, 0)), params, batch


def test_bfloat16_lora_loss_and_gradients_agree_across_formulations(monkeypatch):
    """The two formulations are the same arithmetic (float32 sums rounded once), so a bfloat16
    model's loss and LoRA gradients agree to bfloat16 precision, and both track float32."""
    results = {}
    for fast in (True, False):
        _use_form(monkeypatch, fast)
        fn, params, batch = _lora_setup("bfloat16")
        results[fast] = jax.jit(fn)(params, batch)
    fn, params, batch = _lora_setup("float32")
    reference = jax.jit(fn)(params, batch)
    for fast, (loss, grads) in results.items():
        np.testing.assert_allclose(loss, reference[0], rtol=5e-3)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]), strict=True):
            assert got.dtype == jnp.float32
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, atol=0.05 * scale, err_msg=f"fast={fast}")
    for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())


def test_layer_dots_remat_keeps_the_rounded_products(monkeypatch):
    """`remat: layer_dots` saves the shared-weight products in the fast form too (a policy
    sees them as custom-VJP calls, not dots): more memory than `layer`, as in float32."""
    _use_form(monkeypatch, True)
    temps = {}
    for remat in ("layer", "layer_dots"):
        fn, params, batch = _lora_setup("bfloat16", remat)
        compiled = jax.jit(fn).lower(params, batch).compile()
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["layer_dots"] > 1.2 * temps["layer"], temps
