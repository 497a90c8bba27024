"""The compiled round: closed-form FedAvg, equivalences, masking, padding, chunking, keys,
re-tracing and algorithms that own the frozen base."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rerun_under_default_compiler

from fedjax_llm.algorithms import make_fedavg, make_fedprox, make_scaffold
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss
from fedjax_llm.pipeline import AggregationPipeline, clip_upload
from fedjax_llm.pipeline import weighted_mean as weighted_mean_aggregator
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientData,
    LocalSchedule,
    client_batch_indices,
    init_round_state,
    make_round_fn,
    make_sequential_round,
    round_hparams,
)
from fedjax_llm.sampling import Cohort
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
        {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask)},
        jnp.asarray(starts),
        jnp.asarray(np.asarray(sizes, np.int32)),
    )


def lm_loss(apply_fn, frozen, params, batch, pad_id):
    return next_token_loss(apply_fn, pad_id).loss(frozen, params, batch, None)


def full_cohort(ids, slots=None):
    """The sampled ids on ``slots`` slots (default: no padding); padding slots hold id 0."""
    ids = np.asarray(ids, np.int32)
    slots = slots or len(ids)
    client_ids = np.zeros(slots, np.int32)
    client_ids[: len(ids)] = ids
    mask = np.arange(slots) < len(ids)
    return Cohort(jnp.asarray(client_ids), jnp.asarray(mask), jnp.asarray(mask))


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
            alg,
            next_token_loss(bigram_apply, PAD),
            schedule,
            num_clients_total=3,
            clients_per_chunk=None,
        )
    )
    round_key = jax.random.key(1)
    new_state, out = round_fn(
        {},
        init_round_state(alg, {"w": jnp.asarray(w0)}, 3),
        data,
        full_cohort([0, 1, 2]),
        round_key,
        round_hparams(lr),
    )
    new_state = new_state.server

    # By hand: each client runs `local_steps` SGD steps with numpy gradients on the batches it
    # draws, and the server averages the deltas weighted by client size.
    deltas = []
    for cid in range(3):
        data_key, _ = jax.random.split(jax.random.fold_in(round_key, cid))
        idx, example_mask, _ = client_batch_indices(
            data_key, data.client_start[cid], data.client_count[cid], schedule
        )
        idx, example_mask = np.asarray(idx), np.asarray(example_mask)
        tokens, mask = np.asarray(data.examples["tokens"]), np.asarray(data.examples["loss_mask"])
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
            alg,
            next_token_loss(trainable.apply, PAD),
            schedule,
            num_clients_total=1,
            clients_per_chunk=None,
        )
    )
    state, _ = round_fn(
        {},
        init_round_state(alg, params, 1),
        data,
        full_cohort([0]),
        jax.random.key(3),
        round_hparams(0.05),
    )
    state = state.server
    batch = {**data.examples, "example_weight": jnp.ones(4)}
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


def make_state(alg, lora, num_clients=8, scaffold_controls=False, pipeline=None):
    state = init_round_state(alg, lora, num_clients, pipeline)
    if scaffold_controls:  # non-zero client controls so the correction is exercised
        store = jax.tree.map(
            lambda x: x + 0.01 * jnp.arange(num_clients).reshape((-1,) + (1,) * (x.ndim - 1)),
            state.clients.algorithm,
        )
        state = state._replace(clients=state.clients._replace(algorithm=store))
    return state


def mesh_of(devices):
    # conftest forces 8 host devices.
    return jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (CLIENT_AXIS,))


@pytest.mark.parametrize("algorithm", ["fedadam", "scaffold"])
def test_compiled_round_equals_sequential_reference_for_any_chunking_order_and_devices(algorithm):
    trainable, base, lora, data, sizes = lora_setup()
    server_opt = optax.adam(0.01, eps=1e-3) if algorithm == "fedadam" else optax.sgd(1.0)
    alg = (make_fedavg if algorithm == "fedadam" else make_scaffold)(sgd(0.1), server_opt)
    objective = next_token_loss(trainable.apply, PAD)
    schedule = LocalSchedule(3, 2, max(sizes), local_epochs=1.0)
    frozen = trainable.frozen(base)
    ids = [5, 0, 3, 6]
    key = jax.random.key(7)
    hparams = round_hparams(0.1)
    state = make_state(alg, lora, scaffold_controls=algorithm == "scaffold")

    def run_round(chunk, devices=1, client_ids=ids, slots=None):
        round_fn = make_round_fn(
            alg,
            objective,
            schedule,
            num_clients_total=8,
            clients_per_chunk=chunk,
            mesh=mesh_of(devices) if devices > 1 else None,
        )
        cohort = full_cohort(client_ids, slots)
        return jax.jit(round_fn)(frozen, state, data, cohort, key, hparams)

    results = {"chunk None": run_round(None)}
    if algorithm == "scaffold":
        # The layouts touch per-client state the most; FedAdam checks the server optimizer's
        # path with one vmap and with devices.
        results["chunk 1"] = run_round(1)
        results["reversed"] = run_round(None, client_ids=ids[::-1])
        # Padding: 4 clients in 8 slots, chunks of 4: the second chunk is padding only (skipped).
        results["8 slots, chunk 4"] = run_round(4, slots=8)
    # 2 devices; and 3 devices with 6 slots, the third device holding padding only.
    for devices, chunk, slots in ((2, None, None), (3, 1, 6)):
        results[f"{devices} devices, chunk {chunk}, slots {slots}"] = run_round(
            chunk, devices, slots=slots
        )

    sequential = make_sequential_round(alg, objective, schedule, num_clients_total=8)
    expected_state, expected_out = sequential(frozen, state, data, full_cohort(ids), key, hparams)
    np.testing.assert_allclose(expected_out.weights, np.asarray(sizes)[ids])
    for name, (new_state, out) in results.items():
        chex.assert_trees_all_close(
            new_state.server,
            expected_state.server,
            atol=2e-6,
            rtol=1e-5,
            custom_message=name,
        )
        chex.assert_trees_all_close(new_state.clients, expected_state.clients, atol=2e-6, rtol=1e-5)
        weights = np.asarray(out.weights)[np.asarray(out.participating)]
        order = np.argsort(np.asarray(ids if name != "reversed" else ids[::-1]))
        np.testing.assert_array_equal(
            weights[order], np.asarray(expected_out.weights)[np.argsort(ids)]
        )
        np.testing.assert_allclose(out.train_loss, expected_out.train_loss, rtol=1e-5)


def test_masked_slots_contribute_nothing_and_keep_their_state():
    """A padding slot and a client whose upload is lost change nothing; the rest is the round
    of the delivered clients alone."""
    trainable, base, lora, data, sizes = lora_setup()
    alg = make_scaffold(sgd(0.1), optax.sgd(1.0))
    objective = next_token_loss(trainable.apply, PAD)
    schedule = LocalSchedule(2, 2, max(sizes))
    state = make_state(alg, lora, scaffold_controls=True)
    fn = jax.jit(make_round_fn(alg, objective, schedule, num_clients_total=8, clients_per_chunk=2))
    args = (trainable.frozen(base), state, data)
    key, hparams = jax.random.key(3), round_hparams(0.1)
    # Slots: clients 4, 1 (dropped after training), 6, and a padding slot that repeats id 4.
    cohort = Cohort(
        jnp.asarray([4, 1, 6, 4], jnp.int32),
        jnp.asarray([True, True, True, False]),
        jnp.asarray([True, False, True, False]),
    )
    new_state, out = fn(*args, cohort, key, hparams)
    only_delivered, out_delivered = fn(*args, full_cohort([4, 6], slots=4), key, hparams)
    chex.assert_trees_all_close(new_state.server, only_delivered.server, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(new_state.clients, only_delivered.clients, rtol=1e-6, atol=1e-7)
    # The dropped client's control is exactly what it was; it did train (its loss counts).
    chex.assert_trees_all_equal(
        jax.tree.map(lambda s: s[1], new_state.clients),
        jax.tree.map(lambda s: s[1], state.clients),
    )
    np.testing.assert_array_equal(np.asarray(out.weights)[[1, 3]], [0.0, 0.0])
    assert float(out.client_loss[1]) > 0 and float(out.client_loss[3]) == 0
    assert int(out.metrics["steps"]) == 3 * 2  # three clients trained, padding did not


def test_round_does_not_retrace_when_round_values_change():
    trainable, base, lora, data, sizes = lora_setup()
    alg = make_fedprox(sgd(0.1), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), mu=0.1)
    pipeline = AggregationPipeline(clip_upload(), weighted_mean_aggregator())
    schedule = LocalSchedule(2, 2, max(sizes))
    round_fn = make_round_fn(
        alg,
        next_token_loss(trainable.apply, PAD),
        schedule,
        num_clients_total=8,
        clients_per_chunk=2,
        pipeline=pipeline,
    )
    traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
    state = init_round_state(alg, lora, 8, pipeline)
    rng = np.random.default_rng(0)
    for r in range(4):
        ids = rng.choice(8, 3, replace=False)  # 3 clients padded to 4 slots
        hparams = round_hparams(
            0.1 / (r + 1), server_lr=1.0 - 0.1 * r, values={"prox_mu": 0.1 * r, "clip_norm": 1 + r}
        )
        state, out = traced(
            trainable.frozen(base),
            state,
            data,
            full_cohort(ids, slots=4),
            jax.random.fold_in(jax.random.key(0), r),
            hparams,
        )
        assert np.isfinite(float(out.train_loss))
        assert 0 <= float(out.pipeline["clip/clipped"]) <= 3


def test_fedprox_mu0_and_scaffold_zero_controls_equal_fedavg(request):
    if rerun_under_default_compiler(request):  # two programs, compared bit for bit
        return
    trainable, base, lora, data, sizes = lora_setup()
    schedule = LocalSchedule(3, 2, max(sizes))
    objective = next_token_loss(trainable.apply, PAD)
    cohort = full_cohort([1, 2, 7])

    def run(alg, mu=0.0):
        fn = jax.jit(
            make_round_fn(alg, objective, schedule, num_clients_total=8, clients_per_chunk=None)
        )
        state = init_round_state(alg, lora, 8)
        hparams = round_hparams(0.1, values={"prox_mu": mu} if alg.hyperparams else {})
        new_state, _ = fn(trainable.frozen(base), state, data, cohort, jax.random.key(4), hparams)
        return new_state.server.params

    fedavg = run(make_fedavg(sgd(), optax.sgd(1.0)))
    chex.assert_trees_all_equal(run(make_fedprox(sgd(), optax.sgd(1.0), mu=0.0)), fedavg)
    chex.assert_trees_all_equal(run(make_scaffold(sgd(), optax.sgd(1.0))), fedavg)
    # And mu > 0 really changes the update.
    prox = run(make_fedprox(sgd(), optax.sgd(1.0), mu=10.0), mu=10.0)
    assert not all(
        np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(prox), jax.tree.leaves(fedavg), strict=True)
    )


def test_no_key_is_used_twice():
    """Under JAX's key-reuse checker a whole round (client keys, upload keys, server keys)
    passes: every key is derived once."""
    trainable, base, lora, data, sizes = lora_setup()
    alg = make_fedavg(sgd(0.1), optax.sgd(1.0))
    pipeline = AggregationPipeline(clip_upload(), weighted_mean_aggregator())
    fn = make_round_fn(
        alg,
        next_token_loss(trainable.apply, PAD),
        LocalSchedule(2, 2, max(sizes)),
        num_clients_total=8,
        clients_per_chunk=2,
        pipeline=pipeline,
    )
    state = init_round_state(alg, lora, 8, pipeline)
    hparams = round_hparams(0.1, values={"clip_norm": 1.0})
    with jax.debug_key_reuse(True):
        new_state, out = jax.jit(fn)(
            trainable.frozen(base),
            state,
            data,
            full_cohort([1, 2, 3], slots=4),
            jax.random.key(0),
            hparams,
        )
    assert np.isfinite(float(out.train_loss))


def test_an_algorithm_can_own_and_update_the_frozen_base():
    """An algorithm that declares ``server_frozen`` keeps the base in its server state: the
    round trains against that base and the server update may change it (here: the mean delta
    is merged into the base and the trainable part restarts from zero every round)."""
    tokens_model = {"b": jnp.zeros((V, V))}

    def apply(frozen, params, tokens):
        return (frozen["b"] + params["w"])[tokens]

    fedavg = make_fedavg(sgd(0.5), optax.sgd(1.0))

    class MergingState(NamedTuple):
        params: dict
        opt_state: tuple
        base: dict

    def server_init(params, frozen):
        return MergingState(params, (), frozen)

    def server_update(state, aggregate, info, key):
        del info, key
        merged = jax.tree.map(lambda b, d: b + d, state.base, {"b": aggregate.delta["w"]})
        return MergingState(jax.tree.map(jnp.zeros_like, state.params), (), merged)

    merging = fedavg._replace(
        server_init=server_init,
        server_update=server_update,
        broadcast=lambda s: fedavg.broadcast(s),
        server_frozen=lambda s: s.base,
    )
    data = make_data(np.random.default_rng(0), [3, 4])
    schedule = LocalSchedule(2, 2, 4)
    objective = next_token_loss(apply, PAD)
    fn = jax.jit(
        make_round_fn(merging, objective, schedule, num_clients_total=2, clients_per_chunk=None)
    )
    plain = jax.jit(
        make_round_fn(fedavg, objective, schedule, num_clients_total=2, clients_per_chunk=None)
    )
    zero = {"w": jnp.zeros((V, V))}
    merged_state = init_round_state(merging, zero, 2, frozen=tokens_model)
    plain_state = init_round_state(fedavg, zero, 2)
    for r in range(2):
        args = (data, full_cohort([0, 1]), jax.random.key(r), round_hparams(0.5))
        merged_state, _ = fn(None, merged_state, *args)
        plain_state, _ = plain(tokens_model, plain_state, *args)
    # FedAvg with sgd(1.0) on W = b + w is the same model whether the update lives in w or b.
    np.testing.assert_allclose(
        merged_state.server.base["b"], plain_state.server.params["w"], rtol=1e-5, atol=1e-6
    )
    assert float(jnp.abs(merged_state.server.params["w"]).max()) == 0.0


def test_padded_examples_and_zero_weight_clients_contribute_nothing():
    trainable, base, lora, data, _ = lora_setup()
    frozen = trainable.frozen(base)
    real = {
        "tokens": data.examples["tokens"][:3],
        "loss_mask": data.examples["loss_mask"][:3],
        "example_weight": jnp.ones(3),
    }
    garbage = jnp.full((2, data.examples["tokens"].shape[1]), 7, jnp.int32)
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
                next_token_loss(trainable.apply, PAD),
                LocalSchedule(1, 1, 2),
                num_clients_total=num_clients,
                clients_per_chunk=None,
            )
        )
        compiled = fn.lower(
            base,
            jax.eval_shape(lambda p: init_round_state(alg, p, num_clients), lora),
            data,
            Cohort(
                jax.ShapeDtypeStruct((num_clients,), jnp.int32),
                jax.ShapeDtypeStruct((num_clients,), jnp.bool_),
                jax.ShapeDtypeStruct((num_clients,), jnp.bool_),
            ),
            jax.random.key(0),
            round_hparams(0.1),
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_client = (temp_bytes(16) - temp_bytes(4)) / 12
    # One client's activations + LoRA state are far below the base; a per-client base copy
    # (as with a merged W + BA, or in_axes=0 on the base) would add >= base_bytes per client.
    assert per_client < 0.25 * base_bytes, (per_client, base_bytes)
