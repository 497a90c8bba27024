"""The output projection fused with the cross entropy (kernels/linear_cross_entropy.py) against
numpy worked by hand, and the next-token loss that uses it against the plain logits path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.dpo import dpo_loss
from fedjax_llm.models import llama
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss
from kernels.linear_cross_entropy import linear_cross_entropy

D, V = 6, 11


def numpy_ce_and_grads(x, w, targets, cot):
    """Loss per row and the gradients of sum(cot * loss) in float64, by hand."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    logits = x @ w
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    rows = np.arange(len(targets))
    loss = -np.log(probs[rows, targets])
    grad_logits = probs.copy()
    grad_logits[rows, targets] -= 1.0
    grad_logits *= np.asarray(cot, np.float64)[:, None]
    return loss, grad_logits @ w.T, x.T @ grad_logits


def problem(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    w = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
    targets = rng.integers(0, V, size=n)
    cot = rng.normal(size=n).astype(np.float32)
    return x, w, targets, cot


@pytest.mark.parametrize(("n", "block"), [(12, 4), (13, 4), (5, 64), (7, 1)])
def test_losses_and_gradients_equal_numpy_for_any_blocking(n, block):
    x, w, targets, cot = problem(n)
    want_loss, want_dx, want_dw = numpy_ce_and_grads(x, w, targets, cot)

    def total(x, w):
        return jnp.sum(cot * linear_cross_entropy(x, w, jnp.asarray(targets), block))

    np.testing.assert_allclose(
        linear_cross_entropy(x, w, jnp.asarray(targets), block), want_loss, rtol=1e-5
    )
    dx, dw = jax.grad(total, (0, 1))(x, w)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-6)
    # Only x differentiated (w frozen, as under LoRA): the same dx, from the forward pass.
    np.testing.assert_allclose(jax.grad(total)(x, w), want_dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jax.grad(total, 1)(x, w), want_dw, rtol=1e-4, atol=1e-6)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
    x, w, targets, cot = problem(16, seed=2)
    _, want_dx, want_dw = numpy_ce_and_grads(x, w, targets, cot)

    def total(x, w):
        return jnp.sum(cot * linear_cross_entropy(x, w, jnp.asarray(targets), 8))

    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    dx, dw = jax.grad(total, (0, 1))(xb, wb)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    scale_x, scale_w = np.abs(want_dx).max(), np.abs(want_dw).max()
    np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, atol=0.03 * scale_x)
    np.testing.assert_allclose(np.asarray(dw, np.float32), want_dw, atol=0.03 * scale_w)
    frozen_w = jax.grad(total)(xb, wb)  # the forward-pass gradient (w not differentiated)
    np.testing.assert_allclose(np.asarray(frozen_w, np.float32), np.asarray(dx, np.float32))


def test_leading_axes_and_vmap_over_clients_sharing_w():
    x, w, targets, cot = problem(24, seed=1)
    xs = x.reshape(2, 3, 4, D)  # 2 clients x [3, 4] positions
    ts = jnp.asarray(targets.reshape(2, 3, 4))

    def client_total(xc, tc, cc):
        return jnp.sum(cc * linear_cross_entropy(xc, w, tc, 5))

    dx = jax.jit(jax.vmap(jax.grad(client_total)))(xs, ts, cot.reshape(2, 3, 4))
    _, want_dx, _ = numpy_ce_and_grads(x, w, targets, cot)
    np.testing.assert_allclose(dx.reshape(24, D), want_dx, rtol=1e-4, atol=1e-6)


def test_shape_mismatches_are_refused():
    x, w, targets, _ = problem(4)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(x, w, jnp.asarray(targets[:3]))
    with pytest.raises(ValueError, match="last axis"):
        linear_cross_entropy(x[:, :3], w, jnp.asarray(targets))


def small_model(mode="lora", vocab=97, tied=True, length=16):
    """A one-layer Llama, its `Trainable`, frozen part and trainable params."""
    config = llama.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=length,
        tie_embeddings=tied,
    )
    trainable = make_trainable(config, mode, lora_rank=2, num_virtual_tokens=3)
    base = llama.init_params(config, jax.random.key(0))
    return trainable, trainable.frozen(base), trainable.init(jax.random.key(1), base)


@pytest.mark.parametrize(
    ("mode", "tied"), [("lora", False), ("full", False), ("soft_prompt", True), ("prefix", False)]
)
def test_next_token_loss_fused_equals_the_logits_path(mode, tied):
    """The default objective on `Trainable.apply` (fused) and on a plain logits function (not
    fused): equal losses and gradients, for every trainable mode and a tied embedding."""
    trainable, frozen, params = small_model(mode, tied=tied)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(1, 97, size=(3, 10)), jnp.int32),
        "loss_mask": jnp.asarray(rng.integers(0, 2, size=(3, 10)), jnp.float32),
        "example_weight": jnp.asarray([1.0, 0.0, 2.0]),
    }
    fused = next_token_loss(trainable.apply, 0, block_rows=4)
    plain = next_token_loss(lambda f, p, t: trainable.apply(f, p, t), 0)

    def value_and_grad(objective):
        return jax.jit(jax.value_and_grad(lambda p: objective.loss(frozen, p, batch, None)[0]))(
            params
        )

    (loss, grads), (want_loss, want_grads) = value_and_grad(fused), value_and_grad(plain)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_dpo_fused_equals_the_logits_path():
    """DPO's policy and reference log-probabilities through the fused head equal those from
    the logits: same loss, metrics and LoRA gradients."""
    trainable, frozen, params = small_model(vocab=53)
    # B of the LoRA factors is zero at init: move it so that policy and reference differ.
    params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params
    )
    rng = np.random.default_rng(0)
    batch = {
        "chosen": jnp.asarray(rng.integers(1, 53, size=(2, 9)), jnp.int32),
        "rejected": jnp.asarray(rng.integers(1, 53, size=(2, 9)), jnp.int32),
        "chosen_mask": jnp.asarray(rng.integers(0, 2, size=(2, 9)), jnp.float32),
        "rejected_mask": jnp.asarray(rng.integers(0, 2, size=(2, 9)), jnp.float32),
        "example_weight": jnp.ones(2),
    }

    def plain_apply(frozen, params, tokens, adapter=True):
        return trainable.apply(frozen, params, tokens, adapter=adapter)

    def run(apply_fn):
        objective = dpo_loss(apply_fn, beta=0.5)
        grad = jax.value_and_grad(lambda p: objective.loss(frozen, p, batch, None), has_aux=True)
        return jax.jit(grad)(params)

    (loss, metrics), grads = run(trainable.apply)
    (want_loss, want_metrics), want_grads = run(plain_apply)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-4, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_fused_loss_never_holds_the_whole_logits():
    """XLA's memory analysis of a LoRA client's gradient: the fused loss needs less temporary
    memory than the plain one by at least the [tokens, vocab] logits it no longer makes."""
    trainable, frozen, params = small_model(vocab=2048, length=64)
    tokens = jnp.ones((8, 64), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((8, 64)), "example_weight": jnp.ones(8)}

    def temp_bytes(objective):
        grad = jax.jit(jax.grad(lambda p: objective.loss(frozen, p, batch, None)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(next_token_loss(trainable.apply, 0, block_rows=64))
    plain = temp_bytes(next_token_loss(lambda f, p, t: trainable.apply(f, p, t), 0))
    logits_bytes = 8 * 64 * 2048 * 4
    assert fused < plain - logits_bytes, (fused, plain)
