"""The compiled round: closed-form FedAvg, equivalences, masking, chunking and re-tracing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms import make_fedavg, make_fedprox, make_scaffold
from fedjax_llm.algorithms.base import RoundInfo
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientData,
    LocalSchedule,
    client_batch_indices,
    lm_loss,
    make_client_update,
    make_round_fn,
    round_hparams,
)
from kernels import weighted_mean

PAD = 0
V = 6


def sgd(lr=0.1):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


def bigram_apply(frozen, params, tokens):
    """A bigram model: logits are a row of a V x V table, so gradients have a closed form."""
    del frozen
    return params["w"][tokens]


def np_bigram_grad(w, tokens, loss_mask):
    """Gradient of the mean masked next-token cross entropy of the bigram model, by hand."""
    logits = w[tokens[:, :-1]]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(V)[tokens[:, 1:]]
    m = loss_mask[:, 1:]
    g_logits = (p - onehot) * m[..., None] / m.sum()
    g = np.zeros_like(w)
    np.add.at(g, tokens[:, :-1], g_logits)
    return g


def make_data(rng, sizes, seq_len=5, vocab=V):
    n = sum(sizes)
    tokens = rng.integers(1, vocab, size=(n, seq_len)).astype(np.int32)
    loss_mask = np.ones((n, seq_len), np.float32)
    loss_mask[:, 0] = 0
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    return ClientData(
        jnp.asarray(tokens),
        jnp.asarray(loss_mask),
        jnp.asarray(starts),
        jnp.asarray(np.asarray(sizes, np.int32)),
    )


@pytest.mark.parametrize("local_steps", [1, 3])
def test_fedavg_sgd_matches_hand_computation(local_steps):
    rng = np.random.default_rng(0)
    sizes = [2, 4, 3]
    data = make_data(rng, sizes)
    w0 = rng.normal(size=(V, V)).astype(np.float32)
    lr = 0.3
    schedule = LocalSchedule(local_steps, 4, max(sizes))
    alg = make_fedavg(sgd(), optax.sgd(1.0))
    round_fn = jax.jit(
        make_round_fn(
            alg, bigram_apply, schedule, num_clients_total=3, clients_per_chunk=None, pad_id=PAD
        )
    )
    round_key = jax.random.key(1)
    new_state, _, out = round_fn(
        {},
        alg.server_init({"w": jnp.asarray(w0)}),
        (),
        data,
        jnp.arange(3, dtype=jnp.int32),
        round_key,
        round_hparams(lr),
    )

    # By hand: each client runs `local_steps` SGD steps with numpy gradients on the batches it
    # draws, and the server averages the deltas weighted by client size.
    tokens, mask = np.asarray(data.tokens), np.asarray(data.loss_mask)
    deltas = []
    for cid in range(3):
        data_key, _ = jax.random.split(jax.random.fold_in(round_key, cid))
        idx, example_mask, _ = client_batch_indices(
            data_key, data.client_start[cid], data.client_count[cid], schedule
        )
        idx, example_mask = np.asarray(idx), np.asarray(example_mask)
        start, n = int(data.client_start[cid]), sizes[cid]
        assert set(idx.reshape(-1)) == set(range(start, start + n))  # its own data only
        w = w0.copy()
        for s in range(local_steps):
            w = w - lr * np_bigram_grad(w, tokens[idx[s]], mask[idx[s]] * example_mask[s][:, None])
        deltas.append(w - w0)
    mean_delta = sum(n * d for n, d in zip(sizes, deltas, strict=True)) / sum(sizes)
    np.testing.assert_allclose(np.asarray(new_state.params["w"]), w0 + mean_delta, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.weights), sizes)


def tiny_llama():
    return LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
    )


def test_one_client_one_step_equals_centralized_sgd():
    config = tiny_llama()
    trainable = make_trainable(config, "full")
    params = init_params(config, jax.random.key(0))
    data = make_data(np.random.default_rng(1), [4], seq_len=8, vocab=32)
    schedule = LocalSchedule(1, 4, 4)
    alg = make_fedavg(sgd(0.05), optax.sgd(1.0))
    round_fn = jax.jit(
        make_round_fn(
            alg, trainable.apply, schedule, num_clients_total=1, clients_per_chunk=None, pad_id=PAD
        )
    )
    state, _, _ = round_fn(
        {},
        alg.server_init(params),
        (),
        data,
        jnp.zeros(1, jnp.int32),
        jax.random.key(3),
        round_hparams(0.05),
    )
    batch = {"tokens": data.tokens, "loss_mask": data.loss_mask, "example_weight": jnp.ones(4)}
    grads = jax.grad(lambda p: lm_loss(trainable.apply, {}, p, batch, PAD)[0])(params)
    expected = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    chex.assert_trees_all_close(state.params, expected, atol=1e-6)


def lora_setup(num_clients=8, sizes=None):
    config = tiny_llama()
    trainable = make_trainable(config, "lora", lora_rank=4, lora_targets=("q", "v", "down"))
    base = init_params(config, jax.random.key(0))
    lora = trainable.init(jax.random.key(1), base)
    # Non-zero B so the adapters matter from the first step.
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    sizes = sizes or [3 + (i % 4) for i in range(num_clients)]
    data = make_data(np.random.default_rng(2), sizes, seq_len=8, vocab=32)
    return trainable, base, lora, data, sizes


@pytest.mark.parametrize("algorithm", ["fedadam", "scaffold"])
def test_vmapped_round_equals_sequential_loop_and_any_chunking(algorithm):
    trainable, base, lora, data, sizes = lora_setup()
    server_opt = optax.adam(0.01, eps=1e-3) if algorithm == "fedadam" else optax.sgd(1.0)
    alg = (make_fedavg if algorithm == "fedadam" else make_scaffold)(sgd(0.1), server_opt)
    schedule = LocalSchedule(3, 2, max(sizes), local_epochs=1.0)
    frozen = trainable.frozen(base)
    ids = jnp.asarray([5, 0, 3, 6], jnp.int32)
    key = jax.random.key(7)
    hparams = round_hparams(0.1)
    store = jax.tree.map(lambda x: jnp.stack([x] * len(sizes)), alg.client_state_init(lora))
    if algorithm == "scaffold":  # non-zero client controls so the correction is exercised
        store = jax.tree.map(
            lambda x: x + 0.01 * jnp.arange(len(sizes)).reshape((-1,) + (1,) * (x.ndim - 1)), store
        )
    server_state = alg.server_init(lora)

    def run_round(chunk, devices=1, client_ids=ids):
        mesh = None
        if devices > 1:  # conftest forces 8 host devices
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (CLIENT_AXIS,))
        round_fn = make_round_fn(
            alg,
            trainable.apply,
            schedule,
            num_clients_total=8,
            clients_per_chunk=chunk,
            pad_id=PAD,
            mesh=mesh,
        )
        return jax.jit(round_fn)(frozen, server_state, store, data, client_ids, key, hparams)

    results = {chunk: run_round(chunk) for chunk in (None, 2, 1)}
    # Reversed client order gives the same result.
    results["reversed"] = run_round(None, client_ids=ids[::-1])
    # Clients sharded over 2 or 4 devices.
    for devices, chunk in ((2, None), (2, 1), (4, None)):
        name = f"{devices} devices, chunk {chunk}"
        results[name] = run_round(chunk, devices)
        np.testing.assert_array_equal(results[name][2].weights, results[None][2].weights)

    # Sequential reference: one jitted client update per client, then aggregate by hand.
    client_update = jax.jit(make_client_update(alg, trainable.apply, schedule, PAD))
    broadcast = alg.broadcast(server_state)
    outputs, new_states, weights = [], [], []
    for cid in np.asarray(ids):
        state_i = jax.tree.map(lambda s, c=cid: s[c], store)
        out, new_state, weight, _ = client_update(
            frozen, broadcast, state_i, data, jnp.int32(cid), key, hparams
        )
        outputs.append(out)
        new_states.append(new_state)
        weights.append(weight)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    mean_output = weighted_mean(stacked, jnp.stack(weights))
    expected_server = alg.server_update(server_state, mean_output, RoundInfo(jnp.int32(4), 8))
    expected_store = jax.tree.map(
        lambda s, *news: s.at[ids].set(jnp.stack(news)), store, *new_states
    )
    for name, (new_server, new_store, _) in results.items():
        chex.assert_trees_all_close(
            new_server, expected_server, atol=2e-6, rtol=1e-5, custom_message=f"chunk={name}"
        )
        chex.assert_trees_all_close(new_store, expected_store, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(sizes)[np.asarray(ids)])


def test_round_does_not_retrace_across_rounds():
    trainable, base, lora, data, sizes = lora_setup()
    alg = make_fedavg(sgd(0.1), optax.sgd(1.0))
    schedule = LocalSchedule(2, 2, max(sizes))
    round_fn = make_round_fn(
        alg, trainable.apply, schedule, num_clients_total=8, clients_per_chunk=2, pad_id=PAD
    )
    traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
    state, store = alg.server_init(lora), ()
    rng = np.random.default_rng(0)
    for r in range(4):
        ids = jnp.asarray(rng.choice(8, 4, replace=False), jnp.int32)
        state, store, out = traced(
            trainable.frozen(base),
            state,
            store,
            data,
            ids,
            jax.random.fold_in(jax.random.key(0), r),
            round_hparams(0.1 / (r + 1)),
        )
        assert np.isfinite(float(out.train_loss))


def test_fedprox_mu0_and_scaffold_zero_controls_equal_fedavg():
    trainable, base, lora, data, sizes = lora_setup()
    schedule = LocalSchedule(3, 2, max(sizes))
    ids = jnp.asarray([1, 2, 7], jnp.int32)
    args = (data, ids, jax.random.key(4), round_hparams(0.1))

    def run(alg):
        fn = jax.jit(
            make_round_fn(
                alg,
                trainable.apply,
                schedule,
                num_clients_total=8,
                clients_per_chunk=None,
                pad_id=PAD,
            )
        )
        store = jax.tree.map(lambda x: jnp.stack([x] * 8), alg.client_state_init(lora))
        return fn(trainable.frozen(base), alg.server_init(lora), store, *args)[0].params

    fedavg = run(make_fedavg(sgd(), optax.sgd(1.0)))
    chex.assert_trees_all_equal(run(make_fedprox(sgd(), optax.sgd(1.0), mu=0.0)), fedavg)
    chex.assert_trees_all_equal(run(make_scaffold(sgd(), optax.sgd(1.0))), fedavg)
    # And mu > 0 really changes the update.
    prox = run(make_fedprox(sgd(), optax.sgd(1.0), mu=10.0))
    assert not all(
        np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(prox), jax.tree.leaves(fedavg), strict=True)
    )


def test_padded_examples_and_zero_weight_clients_contribute_nothing():
    trainable, base, lora, data, _ = lora_setup()
    frozen = trainable.frozen(base)
    real = {
        "tokens": data.tokens[:3],
        "loss_mask": data.loss_mask[:3],
        "example_weight": jnp.ones(3),
    }
    garbage = jnp.full((2, data.tokens.shape[1]), 7, jnp.int32)
    padded = {
        "tokens": jnp.concatenate([real["tokens"], garbage]),
        "loss_mask": jnp.concatenate([real["loss_mask"], jnp.ones_like(garbage, float)]),
        "example_weight": jnp.asarray([1.0, 1, 1, 0, 0]),
    }
    loss_real, _ = lm_loss(trainable.apply, frozen, lora, real, PAD)
    loss_padded, _ = lm_loss(trainable.apply, frozen, lora, padded, PAD)
    np.testing.assert_allclose(loss_padded, loss_real, rtol=1e-6)
    grads = [
        jax.grad(lambda p, b=b: lm_loss(trainable.apply, frozen, p, b, PAD)[0])(lora)
        for b in (real, padded)
    ]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # A zero-weight client cannot leak into the mean, even with a NaN update.
    stacked = {"x": jnp.asarray([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 4.0]])}
    mean = weighted_mean(stacked, jnp.asarray([1.0, 0.0, 3.0]))
    np.testing.assert_allclose(mean["x"], [2.5, 3.5])


def test_local_epochs_mask_steps_for_small_clients():
    schedule = LocalSchedule(local_steps=5, batch_size=2, max_client_examples=6, local_epochs=1.0)
    idx, example_mask, step_mask = client_batch_indices(
        jax.random.key(0), jnp.int32(10), jnp.int32(3), schedule
    )
    # 3 examples, 1 epoch: 2 steps (the second with one real example), 3 steps masked.
    np.testing.assert_array_equal(step_mask, [True, True, False, False, False])
    assert float(example_mask.sum()) == 3
    used = np.asarray(idx).reshape(-1)[np.asarray(example_mask).reshape(-1) > 0]
    assert sorted(used.tolist()) == [10, 11, 12]  # each example exactly once, within the client


def test_lora_round_shares_the_frozen_base():
    """Compiled memory: adding clients costs LoRA-sized state, never a copy of the base."""
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=256,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=8,
    )
    trainable = make_trainable(config, "lora", lora_rank=2, lora_targets=("q",))
    base = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    lora = jax.eval_shape(
        lambda: trainable.init(jax.random.key(1), init_params(config, jax.random.key(0)))
    )
    alg = make_fedavg(sgd(), optax.sgd(1.0))
    base_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))

    def temp_bytes(num_clients):
        data = jax.eval_shape(
            lambda: make_data(np.random.default_rng(0), [2] * num_clients, seq_len=8, vocab=64)
        )
        fn = jax.jit(
            make_round_fn(
                alg,
                trainable.apply,
                LocalSchedule(1, 1, 2),
                num_clients_total=num_clients,
                clients_per_chunk=None,
                pad_id=PAD,
            )
        )
        compiled = fn.lower(
            base,
            jax.eval_shape(alg.server_init, lora),
            (),
            data,
            jax.ShapeDtypeStruct((num_clients,), jnp.int32),
            jax.random.key(0),
            round_hparams(0.1),
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_client = (temp_bytes(16) - temp_bytes(4)) / 12
    # One client's activations + LoRA state are far below the base; a per-client base copy
    # (as with a merged W + BA, or in_axes=0 on the base) would add >= base_bytes per client.
    assert per_client < 0.25 * base_bytes, (per_client, base_bytes)
