"""The plugin story: a user writes a new upload transform, aggregator or objective in their own
file (`tests/user_plugins.py`, tens of lines each, public names only) and runs it from a config
or from Python, inside the same compiled round, without touching the library; results do not
depend on chunk size, client order or device count.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from user_plugins import preference_loss, quantize_leaf, stochastic_quantizer, trimmed_mean

import fedjax_llm
from fedjax_llm import (
    AggregationPipeline,
    ClientArrays,
    ConfigError,
    Objective,
    Simulation,
    make_fedavg,
)
from fedjax_llm.algorithms import ClientOutput
from fedjax_llm.models import make_trainable
from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, OBJECTIVES
from fedjax_llm.pipeline import AGGREGATORS, TRANSFORMS
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientData,
    LocalSchedule,
    init_round_state,
    make_client_update,
    make_round_fn,
    make_sequential_round,
    round_hparams,
)
from fedjax_llm.sampling import Cohort, cohort_slots

SIGMAS = 5.0
"""Statistical bounds are 5 standard deviations: a false failure has probability < 1e-6."""


@pytest.fixture
def registries():
    """Restores the transform, aggregator and objective registries after the test."""
    saved = [(registry, dict(registry)) for registry in (TRANSFORMS, AGGREGATORS, OBJECTIVES)]
    try:
        yield
    finally:
        for registry, copy in saved:
            registry.clear()
            registry.update(copy)


# --------------------------------------------------------------------- (a) the quantizer
def test_quantizer_is_unbiased_and_on_its_levels():
    levels, draws = 3, 20000
    x = jnp.asarray([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], jnp.float32)  # levels 0, 0.5, 1
    keys = jax.random.split(jax.random.key(0), draws)
    q = np.asarray(jax.jit(jax.vmap(lambda k: quantize_leaf(x, k, levels)))(keys), np.float64)
    lower = np.floor(np.asarray(x) / 0.5) * 0.5
    # Every draw is the level just below or just above, exactly.
    assert np.all((q == lower) | (q == lower + 0.5))
    np.testing.assert_array_equal(q[:, [0, 3, 5]], np.broadcast_to([0.0, 0.5, 1.0], (draws, 3)))
    # Unbiased: up with probability frac, so the mean of a draw is x; sd of the mean of n
    # draws is 0.5 * sqrt(frac (1 - frac) / n).
    frac = (np.asarray(x, np.float64) - lower) / 0.5
    sd = 0.5 * np.sqrt(frac * (1 - frac) / draws)
    np.testing.assert_array_less(np.abs(q.mean(0) - np.asarray(x, np.float64)), SIGMAS * sd + 1e-7)
    # A constant leaf has no spread: returned unchanged.
    constant = jnp.full((4,), 0.25)
    np.testing.assert_array_equal(quantize_leaf(constant, jax.random.key(1), levels), constant)


def test_quantizer_keeps_the_error_in_the_client_state():
    transform = stochastic_quantizer(levels=4)
    rng = np.random.default_rng(0)
    uploads = [
        ClientOutput(
            {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.float32(0.7)}
        )
        for _ in range(2)
    ]
    like = jax.eval_shape(lambda: uploads[0])
    residual = transform.client_init(like)
    chex.assert_trees_all_equal(residual, jax.tree.map(jnp.zeros_like, uploads[0]))
    apply = jax.jit(transform.apply)
    hparams = round_hparams(0.1)
    sent = []
    for r, upload in enumerate(uploads):
        corrected = jax.tree.map(jnp.add, upload, residual)
        quantized, new_residual, stats = apply(upload, (), residual, jax.random.key(r), hparams)
        # The state holds exactly what the quantization left out of the corrected upload.
        chex.assert_trees_all_equal(new_residual, jax.tree.map(jnp.subtract, corrected, quantized))
        assert len(np.unique(np.asarray(quantized.delta["w"]))) <= 4
        assert float(stats["quantize/error_norm"]) > 0
        sent.append(quantized)
        residual = new_residual
    # Error feedback telescopes: what was sent plus what is kept is what was trained.
    total_sent = jax.tree.map(lambda a, b: a + b, *sent)
    chex.assert_trees_all_close(
        jax.tree.map(jnp.add, total_sent, residual),
        jax.tree.map(jnp.add, *uploads),
        atol=1e-6,  # float32 rounding of a few additions of O(1) values
    )


# ------------------------------------------------------------------- (b) the trimmed mean
@pytest.mark.parametrize(
    "num_clients,trim,seed", [(7, 0.2, 0), (10, 0.25, 1), (4, 0.25, 2), (3, 0.0, 3)]
)
def test_trimmed_mean_matches_numpy(num_clients, trim, seed):
    rng = np.random.default_rng(seed)
    uploads = {
        "w": rng.normal(size=(num_clients + 2, 3)).astype(np.float32),
        "b": rng.normal(size=(num_clients + 2,)).astype(np.float32),
    }
    # Two uncounted slots (padding, dropped) holding garbage that must not leak.
    uploads["w"][-2:] = np.nan
    uploads["b"][-1] = np.inf
    weights = np.concatenate([rng.uniform(1, 5, num_clients), [0.0, 0.0]]).astype(np.float32)
    aggregator = trimmed_mean(trim)
    hparams = round_hparams(0.1, values={"trim_fraction": trim})
    gathered = fedjax_llm.Gathered(jax.tree.map(jnp.asarray, uploads), jnp.asarray(weights))
    out, _, metrics = jax.jit(aggregator.finalize)((), gathered, jax.random.key(0), hparams)
    k = math.floor(trim * num_clients)
    for name, x in uploads.items():
        kept = np.sort(x[:num_clients].astype(np.float64), axis=0)[k : num_clients - k]
        np.testing.assert_allclose(out[name], kept.mean(0), rtol=1e-6, atol=1e-7)
    assert int(metrics["trimmed_mean/kept"]) == num_clients - 2 * k


# ----------------------------------------------- quantize + trimmed mean in the compiled round
SIZES = (3, 2, 4, 3, 5, 2)
M, D = len(SIZES), 3


def least_squares(frozen, params, batch, key):
    del frozen, key
    weight = batch["example_weight"]
    residual = jnp.sum(batch["x"] * params["w"], axis=-1) + params["b"] - batch["y"]
    loss_sum = jnp.sum(weight * 0.5 * residual**2)
    return loss_sum / jnp.maximum(jnp.sum(weight), 1.0), {
        LOSS_SUM: loss_sum,
        LOSS_WEIGHT: jnp.sum(weight),
    }


def least_squares_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(SIZES), D)).astype(np.float32)
    truth = np.repeat(rng.normal(size=(M, D + 1)), SIZES, axis=0)
    y = (np.sum(x * truth[:, :D], axis=1) + truth[:, D]).astype(np.float32)
    data = ClientData(
        {"x": jnp.asarray(x), "y": jnp.asarray(y)},
        jnp.asarray(np.concatenate([[0], np.cumsum(SIZES)[:-1]]), jnp.int32),
        jnp.asarray(SIZES, jnp.int32),
    )
    params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.float32(0.3)}
    return data, params


def test_quantize_and_trimmed_mean_in_the_round_are_independent_of_layout():
    """The user's transform and aggregator, plugged into the compiled round from Python: the
    same new params and client store for any chunk size, client order, device count or engine,
    equal to numpy's trimmed mean of the clients' quantized uploads."""
    data, params = least_squares_problem()
    algorithm = make_fedavg(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), optax.sgd(1.0))
    objective = Objective(least_squares, ("x", "y"))
    schedule = LocalSchedule(local_steps=2, batch_size=2, max_client_examples=max(SIZES))
    # 4 delivered clients, trim 0.25: the largest and smallest value of each coordinate go.
    pipeline = AggregationPipeline(stochastic_quantizer(levels=4), trimmed_mean(0.25))
    hparams = round_hparams(0.1, values=pipeline.hyperparams)
    ids = np.asarray([4, 0, 3, 1, 5])
    delivered = np.asarray([True, True, False, True, True])  # client 3's upload is lost
    key = jax.random.key(5)

    def cohort(order, slots):
        n = len(ids)
        pad = np.zeros(slots - n, np.int32)
        return Cohort(
            jnp.asarray(np.concatenate([ids[order], pad]), jnp.int32),
            jnp.asarray(np.arange(slots) < n),
            jnp.asarray(np.concatenate([delivered[order], pad.astype(bool)])),
        )

    def compiled(order, chunk, devices):
        mesh = None
        if devices > 1:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (CLIENT_AXIS,))
        fn = make_round_fn(
            algorithm,
            objective,
            schedule,
            num_clients_total=M,
            clients_per_chunk=chunk,
            pipeline=pipeline,
            mesh=mesh,
        )
        state = init_round_state(algorithm, params, M, pipeline)
        slots = cohort_slots(len(ids), chunk, devices)
        return jax.jit(fn)({}, state, data, cohort(order, slots), key, hparams)

    # By hand: each delivered client's quantized upload, then numpy's trimmed mean.
    state0 = init_round_state(algorithm, params, M, pipeline)
    client_update = jax.jit(make_client_update(algorithm, objective, schedule, pipeline))
    uploads, residuals = {}, {}
    for cid in ids[delivered]:
        result = client_update(
            {},
            algorithm.broadcast(state0.server),
            state0.pipeline.transform,
            jax.tree.map(lambda s, c=cid: s[c], state0.clients),
            data,
            jnp.int32(cid),
            jnp.float32(1.0),
            jnp.float32(1.0),
            key,
            hparams,
        )
        uploads[int(cid)] = jax.tree.map(np.asarray, result.upload.delta)
        residuals[int(cid)] = jax.tree.map(np.asarray, result.state.transform.delta)
    k = math.floor(0.25 * len(uploads))
    assert k == 1
    expected = {}
    for name in params:
        stacked = np.sort(np.stack([u[name] for u in uploads.values()]).astype(np.float64), 0)
        expected[name] = np.asarray(params[name]) + stacked[k : len(uploads) - k].mean(0)

    forward = np.arange(len(ids))
    results = {
        "one chunk": compiled(forward, None, 1),
        "reversed, chunks of 2": compiled(forward[::-1], 2, 1),
        "2 devices, chunks of 1": compiled(forward, 1, 2),
    }
    sequential = make_sequential_round(
        algorithm, objective, schedule, num_clients_total=M, pipeline=pipeline
    )
    results["sequential"] = sequential({}, state0, data, cohort(forward, len(ids)), key, hparams)
    for name, (state, out) in results.items():
        # Per-client arithmetic batched differently may round differently: an ulp or two of
        # the O(1) params (observed: at most 3e-8).
        chex.assert_trees_all_close(
            state.server.params, expected, rtol=1e-6, atol=1e-7, custom_message=name
        )
        store = state.clients.transform.delta
        for cid in range(M):
            row = jax.tree.map(lambda s, c=cid: np.asarray(s[c]), store)
            if cid in residuals:  # delivered: holds its quantization error
                chex.assert_trees_all_close(
                    row, residuals[cid], rtol=1e-6, atol=1e-7, custom_message=name
                )
                assert np.any(row["w"] != 0)
            else:  # not sampled, or its upload was lost: the state is unchanged (zeros)
                chex.assert_trees_all_equal(row, jax.tree.map(np.zeros_like, row))
        assert int(out.pipeline["trimmed_mean/kept"]) == 4 - 2 * k


LORA = {"mode": "lora", "lora_rank": 2, "lora_targets": ("q", "v")}
"""Federated fine-tuning of the tiny model with LoRA: small uploads, and a round that compiles
faster than full fine-tuning's."""


def tiny(make_config, **sections):
    """The conftest tiny config with LoRA and plain SGD clients, without evaluation or files
    beyond the metrics."""
    return make_config(
        trainable=LORA,
        client={"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 4},
        eval={"every": 0},
        run={"num_rounds": 3, "save_checkpoints": False, "partition_report": False},
        **sections,
    )


@pytest.mark.slow
def test_registered_transform_and_aggregator_run_from_a_config(make_config, registries):
    fedjax_llm.register_transform("quantize", lambda config: stochastic_quantizer(levels=4))
    fedjax_llm.register_aggregator("trimmed_mean", lambda config: trimmed_mean(0.25))
    config = tiny(
        make_config, aggregation={"transforms": ("quantize",), "aggregator": "trimmed_mean"}
    )
    sim = Simulation(config, verbose=False)
    history = [h for h in sim.run() if "train_loss" in h]
    assert len(history) == 3 and all(np.isfinite(h["train_loss"]) for h in history)
    for record in history:
        assert record["pipeline/quantize/error_norm"] > 0
        # 4 clients, trim 0.25: one dropped at each end of every coordinate.
        assert record["pipeline/trimmed_mean/kept"] == record["participants"] - 2
    sampled = set(np.concatenate([sim.sampler.sample(r) for r in range(3)]).tolist())
    for cid in range(sim.num_clients):
        norm = sum(
            float(jnp.sum(jnp.abs(x[cid]))) for x in jax.tree.leaves(sim.client_store.transform)
        )
        assert (norm > 0) == (cid in sampled), cid


# ------------------------------------------------------------ (c) the preference objective
def bigram_apply(frozen, params, tokens):
    del frozen
    return params["w"][tokens]


def test_preference_loss_matches_numpy():
    rng = np.random.default_rng(0)
    vocab, length, beta = 5, 4, 0.7
    w = rng.normal(size=(vocab, vocab)).astype(np.float32)
    batch = {
        "chosen": rng.integers(0, vocab, (3, length)).astype(np.int32),
        "rejected": rng.integers(0, vocab, (3, length)).astype(np.int32),
        "chosen_mask": np.asarray([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]], np.float32),
        "rejected_mask": np.asarray([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], np.float32),
        "example_weight": np.asarray([1.0, 1.0, 0.0], np.float32),  # the third is padding
    }
    objective = preference_loss(bigram_apply, beta=beta)
    loss, metrics = jax.jit(objective.loss)({}, {"w": jnp.asarray(w)}, batch, jax.random.key(0))

    def logp(tokens, mask):
        logits = w.astype(np.float64)[tokens[:, :-1]]
        logits -= logits.max(-1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_softmax, tokens[:, 1:, None], -1)[..., 0]
        return (picked * mask[:, 1:]).sum(-1)

    margin = beta * (
        logp(batch["chosen"], batch["chosen_mask"])
        - logp(batch["rejected"], batch["rejected_mask"])
    )
    per_pair = np.log1p(np.exp(-margin))  # -log sigmoid(margin)
    weight = batch["example_weight"]
    np.testing.assert_allclose(loss, (per_pair * weight).sum() / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics[LOSS_SUM], (per_pair * weight).sum(), rtol=1e-5)
    assert float(metrics[LOSS_WEIGHT]) == 2.0
    assert float(metrics["pairs_correct"]) == float(((margin > 0) * weight).sum())
    # Equal rows: no preference, loss log 2.
    same = dict(batch, rejected=batch["chosen"], rejected_mask=batch["chosen_mask"])
    np.testing.assert_allclose(
        objective.loss({}, {"w": jnp.asarray(w)}, same, None)[0], math.log(2), rtol=1e-6
    )


def preference_clients(vocab_size: int, num_clients: int = 8, length: int = 12, seed: int = 0):
    """Random pairs: a shared prompt, then a response of low token ids (chosen) or high ones
    (rejected), padded to ``length`` with masks selecting the response tokens."""
    rng = np.random.default_rng(seed)
    clients = []
    for _ in range(num_clients):
        n = int(rng.integers(3, 7))
        prompt = rng.integers(1, vocab_size, (n, 4))
        rows = {}
        for name, (lo, hi) in (("chosen", (3, 60)), ("rejected", (60, 120))):
            response = rng.integers(lo, hi, (n, length - 4))
            mask = np.zeros((n, length), np.float32)
            ends = rng.integers(6, length + 1, n)
            for i, end in enumerate(ends):
                mask[i, 4:end] = 1.0
                response[i, end - 4 :] = 0  # padding past the end
            rows[name] = np.concatenate([prompt, response], axis=1).astype(np.int32)
            rows[f"{name}_mask"] = mask
        clients.append(rows)
    assert max(int(r["rejected"].max()) for r in clients) < vocab_size
    return ClientArrays.from_clients(clients)


def preference_config(make_config, objective="next_token", **run):
    return make_config(
        trainable=LORA,
        client={
            "optimizer": "sgd",
            "lr": 0.5,
            "local_steps": 2,
            "batch_size": 4,
            "objective": objective,
        },
        eval={"every": 0},
        run={"num_rounds": 4, "save_checkpoints": False, "partition_report": False, **run},
    )


@pytest.mark.slow
def test_preference_objective_trains_and_is_independent_of_layout(make_config, registries):
    data = preference_clients(tiny(make_config).model.vocab_size)
    # From a config: the objective registered by name.
    fedjax_llm.register_objective(
        "preference", lambda apply_fn, pad_id, config: preference_loss(apply_fn, beta=1.0)
    )
    config = preference_config(make_config, objective="preference")
    baseline = Simulation(config, verbose=False, data=data)
    frozen, start = baseline.frozen, jax.device_get(baseline.params)  # the state is donated
    history = [h for h in baseline.run() if "train_loss" in h]
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 4 and all(np.isfinite(losses))

    # The loss over every client's pairs, before and after, with the objective itself (each
    # round's train_loss is over other sampled clients, too noisy to compare across rounds).
    # It falls from 5.77 to 5.50 here, round by round; 0.1 is far outside any rounding.
    everything = {name: jnp.asarray(x) for name, x in data.examples.items()}
    everything["example_weight"] = jnp.ones(len(data.examples["chosen"]))
    evaluate = jax.jit(lambda p: baseline.objective.loss(frozen, p, everything, None)[0])
    before, after = float(evaluate(start)), float(evaluate(baseline.params))
    assert after < before - 0.1, (before, after)

    # From Python: the same objective passed in, on other chunk sizes and device counts.
    t = config.trainable
    model = make_trainable(
        config.model,
        t.mode,
        lora_rank=t.lora_rank,
        lora_alpha=t.lora_alpha,
        lora_targets=t.lora_targets,
    )
    # With the baseline (one chunk, one device), chunks of 1, 2 and None, devices 1 and 2.
    for run in ({"clients_per_chunk": 1}, {"clients_per_chunk": 2, "devices": 2}):
        sim = Simulation(
            preference_config(make_config, **run),
            verbose=False,
            objective=preference_loss(model.apply, beta=1.0),
            data=data,
        )
        other = [h for h in sim.run() if "train_loss" in h]
        # Same clients, keys and updates; the sums over clients are grouped differently (chunks,
        # a psum over devices): float32 reassociation, compounded over 4 rounds. Observed here:
        # at most 8e-8 (3 ulps of the largest entry, 0.31); the bound leaves 10x for other CPUs.
        chex.assert_trees_all_close(
            sim.params, baseline.params, rtol=1e-5, atol=1e-6, custom_message=str(run)
        )
        np.testing.assert_allclose([h["train_loss"] for h in other], losses, rtol=1e-5)


def test_missing_field_raises_config_error_before_compiling(make_config):
    traced = []

    def loss(frozen, params, batch, key):
        traced.append(True)
        return preference_loss(bigram_apply).loss(frozen, params, batch, key)

    objective = Objective(loss, ("chosen", "rejected", "chosen_mask", "rejected_mask"))
    full = preference_clients(259, num_clients=4)
    lacking = ClientArrays.from_clients(
        [
            {
                name: x[start : start + count]
                for name, x in full.examples.items()
                if name != "rejected_mask"
            }
            for start, count in zip(full.client_start, full.client_count, strict=True)
        ]
    )
    with pytest.raises(ConfigError, match="rejected_mask"):
        Simulation(tiny(make_config), verbose=False, objective=objective, data=lacking)
    assert not traced  # refused before anything was traced or compiled
