"""Tests of the model FLOP counts: closed forms checked by hand on a tiny config."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from fedjax_llm.models.flops import (
    forward_flops_per_token,
    matmul_params,
    train_flops_per_token,
)
from fedjax_llm.models.llama import LlamaConfig, count_params, init_params

# D=8, F=12, H=2 heads of hd=4, one KV head, V=10, one layer.
ONE_LAYER = LlamaConfig(
    vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2, num_kv_heads=1
)
T = 4
# Per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up/down 3*8*12 = 480; LM head 8*10 = 80.
LAYER_WEIGHTS, HEAD_WEIGHTS = 480, 80
# Attention per query and layer: scores + values = 2 * 2 * keys * H * hd.
ATTENTION = 2 * 2 * T * 2 * 4  # 128
# LoRA r=2 on q (8 -> 8) and v (8 -> 4): 2*r*(d_in + d_out) each.
LORA_FORWARD = 2 * 2 * (8 + 8) + 2 * 2 * (8 + 4)  # 112
# First-layer q/k/v input gradient, dead when the embedding is frozen: 2 * D * (8 + 4 + 4).
DEAD_BASE = 2 * 8 * 16  # 256
DEAD_LORA = 2 * 8 * 2 * 2  # dx = du @ a.T of the q and v factors: 64


def test_matmul_params_by_hand():
    assert matmul_params(ONE_LAYER) == LAYER_WEIGHTS + HEAD_WEIGHTS


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_match_the_model(tie):
    # Every parameter is a matmul weight except the embedding table (a gather, unless it is also
    # the tied head) and the norm scales (2 per layer + the final norm, D each).
    config = dataclasses.replace(ONE_LAYER, num_layers=3, tie_embeddings=tie)
    total = count_params(init_params(config, jax.random.key(0)))
    d, v = config.hidden_size, config.vocab_size
    norms = (2 * config.num_layers + 1) * d
    embedding_only = 0 if tie else v * d
    assert total == matmul_params(config) + norms + embedding_only


def test_forward_by_hand():
    expected = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) + ATTENTION
    assert forward_flops_per_token(ONE_LAYER, T) == expected == 1248
    assert forward_flops_per_token(ONE_LAYER, T, "lora", 2, ("q", "v")) == expected + LORA_FORWARD


def test_full_is_three_forwards():
    config = dataclasses.replace(ONE_LAYER, num_layers=3, tie_embeddings=False)
    for seq_len in (1, 4, 64):
        assert train_flops_per_token(config, seq_len, "full") == pytest.approx(
            3 * forward_flops_per_token(config, seq_len, "full"), rel=1e-12
        )
    assert train_flops_per_token(ONE_LAYER, T, "full") == 3 * 1248


def test_lora_by_hand():
    forward = 1248 + LORA_FORWARD
    # Activation gradients of the base (= its forward), 2x attention, 2x the LoRA forward (its
    # activation and weight gradients), minus the dead first-layer input gradients.
    backward = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) + 2 * ATTENTION + 2 * LORA_FORWARD
    backward -= DEAD_BASE + DEAD_LORA
    assert train_flops_per_token(ONE_LAYER, T, "lora", 2, ("q", "v")) == forward + backward == 2640


def test_soft_prompt_by_hand():
    # P=2 prompt vectors: the layer runs over 6 positions attending to 6 keys; head over T=4.
    positions = keys = 6
    attention = 2 * 2 * keys * 2 * 4
    forward = (positions * (2 * LAYER_WEIGHTS + attention) + T * 2 * HEAD_WEIGHTS) / T
    layer_backward = 2 * LAYER_WEIGHTS + 2 * attention
    backward = (positions * layer_backward + T * (2 * HEAD_WEIGHTS - DEAD_BASE)) / T
    assert forward_flops_per_token(ONE_LAYER, T, "soft_prompt", num_virtual_tokens=2) == forward
    got = train_flops_per_token(ONE_LAYER, T, "soft_prompt", num_virtual_tokens=2)
    assert got == forward + backward == 3808


def test_prefix_by_hand():
    # P=2 prefix slots: T=4 queries attend to 6 keys.
    attention = 2 * 2 * 6 * 2 * 4
    forward = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) + attention
    backward = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) + 2 * attention - DEAD_BASE
    assert forward_flops_per_token(ONE_LAYER, T, "prefix", num_virtual_tokens=2) == forward
    assert train_flops_per_token(ONE_LAYER, T, "prefix", num_virtual_tokens=2) == forward + backward


def test_orderings_on_a_deeper_model():
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=4096,
    )
    full = train_flops_per_token(config, 64, "full")
    lora = train_flops_per_token(config, 64, "lora")
    prefix = train_flops_per_token(config, 64, "prefix", num_virtual_tokens=8)
    forward = forward_flops_per_token(config, 64)
    # LoRA skips the base weight gradients but adds small factors: between 2x and 3x forward.
    assert 2 * forward * 0.9 < lora < full
    assert prefix < lora
    # The 2N rule holds up to attention.
    assert forward == 2 * matmul_params(config) + 4 * 64 * 8 * 32 * 4


def test_tied_and_untied_heads_cost_the_same():
    untied = dataclasses.replace(ONE_LAYER, tie_embeddings=False)
    for mode in ("full", "lora", "prefix"):
        assert train_flops_per_token(ONE_LAYER, T, mode) == train_flops_per_token(untied, T, mode)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Unknown trainable mode"):
        train_flops_per_token(ONE_LAYER, T, "adapter")
    with pytest.raises(ValueError, match="Unknown LoRA targets"):
        train_flops_per_token(ONE_LAYER, T, "lora", lora_targets=("qq",))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        forward_flops_per_token(ONE_LAYER, T, "prefix", num_virtual_tokens=-1)


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_close_to_xla_cost_analysis_of_one_layer(mode):
    # An independent count: XLA's cost analysis of the compiled gradient step. One layer, because
    # XLA counts a scanned (while-loop) body once. XLA also counts the elementwise work (norms,
    # softmax, rotary, loss) that model FLOPs leave out, about 1% at this width, so it may only
    # exceed our count, and by little.
    import jax.numpy as jnp
    import optax

    from fedjax_llm.models.trainable import make_trainable

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_layers=1,
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=64,
    )
    batch, seq_len = 4, 64
    trainable = make_trainable(config, mode, num_virtual_tokens=8)
    base = init_params(config, jax.random.key(0))
    params, frozen = trainable.init(jax.random.key(1), base), trainable.frozen(base)
    tokens = jnp.zeros((batch, seq_len), jnp.int32)

    def loss(params, frozen):
        # frozen is an argument: as a closed-over constant, XLA would fold work away.
        logits = trainable.apply(frozen, params, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    cost = jax.jit(jax.grad(loss)).lower(params, frozen).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if not cost or "flops" not in cost:
        pytest.skip("this backend gives no XLA cost analysis")
    ours = train_flops_per_token(config, seq_len, mode, num_virtual_tokens=8) * batch * seq_len
    assert ours <= cost["flops"] <= 1.02 * ours
