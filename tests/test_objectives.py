"""Tests of fedjax_llm/objectives.py: the next-token loss, per-example metrics, field checks and
the objective registry."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import objectives
from fedjax_llm.config import ConfigError
from fedjax_llm.objectives import (
    LOSS_SUM,
    LOSS_WEIGHT,
    OBJECTIVES,
    Objective,
    check_fields,
    next_token_loss,
    per_example_metrics,
    register_objective,
)

VOCAB = 5
PAD = 0


def bigram_apply(frozen, params, tokens):
    """A bigram model: the logits at a position are the table row of its token (plus a frozen
    bias), so the expected loss is a numpy lookup."""
    return params["table"][tokens] + frozen["bias"]


def make_inputs():
    rng = np.random.default_rng(0)
    frozen = {"bias": jnp.asarray(rng.normal(size=VOCAB), jnp.float32)}
    params = {"table": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32)}
    tokens = np.array(
        [
            [1, 2, 3, 4, 0, 0],  # two trailing pads (masked out)
            [3, 3, 1, 2, 4, 1],  # zero example weight: excluded entirely
            [2, 4, 4, 1, 3, 0],
            [4, 1, 2, 0, 0, 0],
        ],
        np.int32,
    )
    loss_mask = np.array(
        [
            [0, 0, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 1],
            [0, 1, 1, 0, 1, 0],
            [0, 1, 1, 0, 0, 0],
        ],
        np.float32,
    )
    example_weight = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    batch = {"tokens": tokens, "loss_mask": loss_mask, "example_weight": example_weight}
    return frozen, params, batch


def numpy_sums(frozen, params, batch):
    """Cross entropy of every (example, target position) in float64, then the weighted sums."""
    table = np.asarray(params["table"], np.float64) + np.asarray(frozen["bias"], np.float64)
    tokens, mask, w = batch["tokens"], batch["loss_mask"], batch["example_weight"]
    logits = table[tokens[:, :-1]]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = tokens[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weight = mask[:, 1:] * w[:, None]
    processed = ((tokens != PAD) * w[:, None]).sum()
    return (nll * weight).sum(), weight.sum(), processed


def test_next_token_loss_matches_numpy_cross_entropy():
    frozen, params, batch = make_inputs()
    objective = next_token_loss(bigram_apply, PAD)
    loss, metrics = jax.jit(objective.loss)(frozen, params, batch, jax.random.key(0))
    loss_sum, loss_weight, processed = numpy_sums(frozen, params, batch)

    # Example 0: 2 targets, example 1: weight 0, example 2: 3 targets x 2, example 3: 2 targets.
    assert loss_weight == 2 + 0 + 6 + 2
    assert processed == 4 + 0 + 2 * 5 + 3
    chex.assert_trees_all_close(
        metrics,
        {LOSS_SUM: loss_sum, LOSS_WEIGHT: loss_weight, "tokens": processed},
        rtol=1e-5,
    )
    np.testing.assert_allclose(loss, loss_sum / loss_weight, rtol=1e-5)
    np.testing.assert_allclose(loss, metrics[LOSS_SUM] / metrics[LOSS_WEIGHT], rtol=1e-6)


def test_next_token_loss_ignores_masked_positions_and_zero_weight_examples():
    """Changing a token that is neither a target nor the input of one, or anything in a
    zero-weight example, leaves the loss unchanged."""
    frozen, params, batch = make_inputs()
    loss_fn = jax.jit(next_token_loss(bigram_apply, PAD).loss)
    key = jax.random.key(0)
    base = loss_fn(frozen, params, batch, key)

    changed = {k: np.array(v) for k, v in batch.items()}
    changed["tokens"][1] = [4, 4, 4, 4, 4, 4]  # the zero-weight example
    changed["tokens"][0, 4] = 3  # position 4 of example 0: not a target, not an input of one
    changed["loss_mask"][1] = 1.0
    chex.assert_trees_all_close(loss_fn(frozen, params, changed, key)[0], base[0], rtol=0, atol=0)
    chex.assert_trees_all_close(
        loss_fn(frozen, params, changed, key)[1][LOSS_SUM], base[1][LOSS_SUM], rtol=0, atol=0
    )


def test_next_token_loss_of_an_all_masked_batch_is_zero_not_nan():
    frozen, params, batch = make_inputs()
    batch = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    loss, metrics = jax.jit(next_token_loss(bigram_apply, PAD).loss)(
        frozen, params, batch, jax.random.key(0)
    )
    assert float(loss) == 0.0
    assert float(metrics[LOSS_WEIGHT]) == 0.0


def test_per_example_metrics_equal_the_loss_on_each_example_alone():
    frozen, params, batch = make_inputs()
    objective = next_token_loss(bigram_apply, PAD)
    key = jax.random.key(1)
    per_example = jax.jit(per_example_metrics, static_argnums=0)(
        objective, frozen, params, batch, key
    )
    n = batch["example_weight"].shape[0]
    assert set(per_example) == {LOSS_SUM, LOSS_WEIGHT, "tokens"}
    for name, value in per_example.items():
        assert value.shape == (n,), name

    loss_fn = jax.jit(objective.loss)  # one compile: every single-example batch has one shape
    alone = [
        loss_fn(frozen, params, {k: v[i : i + 1] for k, v in batch.items()}, key)[1]
        for i in range(n)
    ]
    chex.assert_trees_all_close(
        per_example, jax.tree.map(lambda *xs: jnp.stack(xs), *alone), rtol=1e-6
    )

    # The per-example sums add up to the batch's sums.
    _, whole = loss_fn(frozen, params, batch, key)
    chex.assert_trees_all_close(jax.tree.map(jnp.sum, per_example), whole, rtol=1e-5)
    # A zero-weight example contributes nothing.
    assert all(float(v[1]) == 0.0 for v in per_example.values())


def test_check_fields_names_the_missing_field_and_the_ones_present():
    objective = next_token_loss(bigram_apply, PAD)
    check_fields(objective, {"tokens": 0, "loss_mask": 0, "extra": 0}, "the data")
    with pytest.raises(ValueError, match=r"\['loss_mask'\].*the eval set.*\['extra', 'tokens'\]"):
        check_fields(objective, {"tokens": 0, "extra": 0}, "the eval set")


def test_register_objective_adds_a_builder_configs_can_select(make_config):
    def builder(apply_fn, pad_id, config):
        return Objective(lambda frozen, params, batch, key: (0.0, {}), ("x",))

    name = "test_objectives_custom"
    config = make_config(client={"objective": name})
    with pytest.raises(ConfigError, match=name):
        config.validate()
    try:
        register_objective(name, builder)
        assert OBJECTIVES[name] is builder
        assert objectives.OBJECTIVES is OBJECTIVES
        config.validate()
        assert OBJECTIVES[name](bigram_apply, PAD, config).fields == ("x",)
    finally:
        OBJECTIVES.pop(name, None)


def test_the_default_objective_is_the_next_token_loss(make_config):
    frozen, params, batch = make_inputs()
    built = OBJECTIVES["next_token"](bigram_apply, PAD, make_config())
    assert built.fields == ("tokens", "loss_mask")
    key = jax.random.key(0)
    chex.assert_trees_all_close(
        jax.jit(built.loss)(frozen, params, batch, key),
        jax.jit(next_token_loss(bigram_apply, PAD).loss)(frozen, params, batch, key),
    )
