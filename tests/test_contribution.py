"""Client contribution scores (`fedjax_llm.contribution`): each score in closed form on a tiny
least-squares problem, the upload recording around any aggregator, and end-to-end runs where a
poisoned client ranks last and a duplicated client scores like its twin."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import ALGORITHM, OBJECTIVE, SCHEDULE, M, cohort, hparams_for, make_problem

from fedjax_llm import ClientArrays, ConfigError, Simulation
from fedjax_llm.algorithms import ClientOutput
from fedjax_llm.config import ByzantineConfig
from fedjax_llm.contribution import (
    CONTRIBUTION_TOTALS,
    CONTRIBUTIONS,
    RECORD_AGGREGATE,
    RECORD_CLIENT_IDS,
    RECORD_UPLOADS,
    RECORD_WEIGHTS,
    ContributionScoring,
    UploadRecord,
    contribution_totals,
    gtg_shapley,
    guided_permutations,
    make_contribution_scorer,
    upload_record,
    with_upload_record,
)
from fedjax_llm.data import ByteTokenizer
from fedjax_llm.metrics import read_jsonl
from fedjax_llm.pipeline import (
    AggregationPipeline,
    Gathered,
    coordinate_median_aggregator,
    identity,
    split_recorded,
    weighted_mean,
)
from fedjax_llm.robustness import malicious_clients, with_attack
from fedjax_llm.round import init_round_state, make_round_fn, round_hparams
from fedjax_llm.sampling import cohort_slots
from fedjax_llm.simulation import build_data

# --------------------------------------------------------------- least squares by hand
D = 3


def eval_set(seed: int = 1, n: int = 10):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    return {"x": x, "y": y, "example_weight": np.ones(n, np.float32)}


def np_loss(params, batch) -> float:
    """The held-out loss in float64 numpy."""
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    r = x @ np.asarray(params["w"], np.float64) + float(params["b"]) - y
    return float(np.mean(0.5 * r**2))


def np_grad(params, batch) -> dict:
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    r = x @ np.asarray(params["w"], np.float64) + float(params["b"]) - y
    return {"w": x.T @ r / len(y), "b": np.mean(r)}


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in ("b", "w")])


def problem(num_slots: int = 5, seed: int = 0):
    """Pre-round params, per-slot deltas ``[C, ...]`` and weights (the last slot padding, with
    garbage that must not leak)."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.float32(-0.4)}
    target = np.array([1.0, -2.0, 0.5, 0.3])  # the step towards the held-out solution
    start = np.concatenate([np.asarray(params["w"]), [float(params["b"])]])
    base = target - start
    scale = rng.uniform(0.1, 0.6, size=(num_slots, 1))
    noise = rng.normal(size=(num_slots, D + 1))
    steps = (scale * base + 0.4 * noise).astype(np.float32)
    steps[-1] = np.nan
    deltas = {"w": jnp.asarray(steps[:, :D]), "b": jnp.asarray(steps[:, D])}
    weights = np.asarray(rng.integers(1, 5, size=num_slots), np.float32)
    weights[-1] = 0.0
    return params, deltas, jnp.asarray(weights)


def np_value(params, deltas, weights, subset, server_lr, batch) -> float:
    """``v(S) = -L(theta + server_lr * weighted mean of S's deltas)`` in float64."""
    moved = {"w": np.asarray(params["w"], np.float64), "b": float(params["b"])}
    w = np.asarray(weights, np.float64)
    total = sum(w[i] for i in subset)
    if subset:
        for k in ("w", "b"):
            d = np.asarray(deltas[k], np.float64)
            moved[k] = moved[k] + server_lr * sum(w[i] * d[i] for i in subset) / total
    return -np_loss(moved, batch)


def score(params, deltas, weights, order, server_lr=0.7, truncation=0.0, aggregate=None, **kw):
    batch = eval_set()
    if aggregate is None:
        aggregate = {"w": jnp.ones(D), "b": jnp.float32(1.0)}
    scorer = make_contribution_scorer(OBJECTIVE, **kw)
    return scorer(
        {},
        params,
        deltas,
        weights,
        aggregate,
        batch,
        jnp.asarray(order, jnp.int32),
        jnp.float32(server_lr),
        jnp.float32(truncation),
    )


def all_orders(players, num_slots):
    rest = [c for c in range(num_slots) if c not in players]
    return [list(p) + rest for p in itertools.permutations(players)]


# ---------------------------------------------------------------------------- the scores
def test_cosine_is_the_cosine_with_the_aggregate():
    params, deltas, weights = problem()
    aggregate = {"w": jnp.asarray([0.3, -1.0, 2.0]), "b": jnp.float32(0.5)}
    out = score(params, deltas, weights, all_orders([0], 5)[:1], aggregate=aggregate)
    a = flat(aggregate)
    for c in range(5):
        if weights[c] > 0:
            d = np.concatenate([[float(deltas["b"][c])], np.asarray(deltas["w"][c], np.float64)])
            expected = d @ a / (np.linalg.norm(d) * np.linalg.norm(a))
            assert float(out.cosine[c]) == pytest.approx(expected, rel=1e-5)
        else:  # padding with NaN garbage: 0, not NaN
            assert float(out.cosine[c]) == 0.0


def test_loo_is_the_first_order_leave_one_out_change_of_the_held_out_loss():
    params, deltas, weights = problem()
    server_lr, batch = 0.7, eval_set()
    out = score(params, deltas, weights, all_orders([0], 5)[:1], server_lr=server_lr)
    g = flat(np_grad(params, batch))
    w = np.asarray(weights, np.float64)
    d = np.stack(
        [np.concatenate([[float(deltas["b"][c])], np.asarray(deltas["w"][c])]) for c in range(5)]
    )
    counted = w > 0
    step_all = server_lr * (w[counted] @ d[counted]) / w[counted].sum()
    for i in range(5):
        if not counted[i]:
            assert float(out.loo[i]) == 0.0
            continue
        keep = counted.copy()
        keep[i] = False
        step_without = server_lr * (w[keep] @ d[keep]) / w[keep].sum()
        # Positive when client i helped: without it the (linearized) loss would be higher.
        expected = g @ (step_without - step_all)
        assert float(out.loo[i]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(out.value_before) == pytest.approx(-np_loss(params, batch), rel=1e-6)


def test_loo_sign_agrees_with_the_real_leave_one_out_for_a_small_step():
    params, deltas, weights = problem()
    server_lr, batch = 1e-3, eval_set()
    out = score(params, deltas, weights, all_orders([0], 5)[:1], server_lr=server_lr)
    players = [0, 1, 2, 3]
    v_all = np_value(params, deltas, weights, players, server_lr, batch)
    for i in players:
        v_without = np_value(
            params, deltas, weights, [p for p in players if p != i], server_lr, batch
        )
        # L(without i) - L(all) = v(all) - v(without i), to first order in the step.
        assert float(out.loo[i]) == pytest.approx(v_all - v_without, rel=2e-2)


def test_shapley_over_every_permutation_is_the_exact_shapley_value():
    params, deltas, weights = problem(num_slots=4)  # 3 clients and a padding slot
    server_lr, batch, players = 0.7, eval_set(), [0, 1, 2]
    orders = all_orders(players, 4)
    assert len(orders) == 6
    out = score(params, deltas, weights, orders, server_lr=server_lr)

    def v(subset):
        return np_value(params, deltas, weights, sorted(subset), server_lr, batch)

    n = len(players)
    for i in players:
        others = [p for p in players if p != i]
        exact = sum(
            math.factorial(len(s))
            * math.factorial(n - len(s) - 1)
            / math.factorial(n)
            * (v(set(s) | {i}) - v(s))
            for k in range(n)
            for s in itertools.combinations(others, k)
        )
        assert float(out.shapley[i]) == pytest.approx(exact, rel=1e-5, abs=1e-6)
    assert float(out.shapley[3]) == 0.0
    # Efficiency: the values add up to the round's whole change of value.
    assert float(jnp.sum(out.shapley)) == pytest.approx(v(players) - v([]), rel=1e-5)
    assert not bool(out.shapley_skipped)
    assert int(out.evaluations) == 2 + 6 * (n - 1)
    # The evaluation in batches of 4 rows (2 examples x 2 candidates) gives the same values.
    small = score(params, deltas, weights, orders, server_lr=server_lr, batch_size=4)
    chex.assert_trees_all_close(small.shapley, out.shapley, rtol=1e-5, atol=1e-6)


def gtg_reference(value, players, orders, truncation):
    """GTG-Shapley's truncated Monte Carlo, sequentially in float64; also returns the subsets
    the batched implementation evaluates and the smallest distance of a truncation test from
    its threshold."""
    v0, v_all = value(()), value(tuple(players))
    tol = truncation * abs(v_all)
    margin = abs(abs(v_all - v0) - tol)
    n, num = len(players), len(orders)
    shapley = {p: 0.0 for p in players}
    if abs(v_all - v0) < tol:
        return shapley, 2, True, margin
    prev = [v0] * num
    positions = 0
    for j in range(n):
        open_ = [abs(v_all - prev[p]) >= tol for p in range(num)]
        margin = min([margin] + [abs(abs(v_all - prev[p]) - tol) for p in range(num)])
        if j < n - 1 and any(open_):
            positions += 1
        for p, order in enumerate(orders):
            if not open_[p]:
                continue
            new = v_all if j == n - 1 else value(tuple(sorted(order[: j + 1])))
            shapley[order[j]] += (new - prev[p]) / num
            prev[p] = new
        if not any(open_):
            break
    return shapley, 2 + num * positions, False, margin


def test_within_round_truncation_matches_the_sequential_algorithm():
    params, deltas, weights = problem(num_slots=5, seed=3)
    server_lr, batch, players = 0.7, eval_set(), [0, 1, 2, 3]
    orders = [list(o) for o in np.random.default_rng(0).permuted(np.tile(players, (6, 1)), axis=1)]
    orders = [o + [4] for o in orders]

    def value(subset):
        return np_value(params, deltas, weights, list(subset), server_lr, batch)

    truncation = 0.2
    expected, evaluations, skipped, margin = gtg_reference(value, players, orders, truncation)
    assert margin > 1e-4  # no truncation test sits on the threshold (float32 vs float64)
    full = 2 + len(orders) * (len(players) - 1)
    assert 2 < evaluations < full  # some permutations were cut short, not all at once
    out = score(params, deltas, weights, orders, server_lr=server_lr, truncation=truncation)
    assert not skipped and not bool(out.shapley_skipped)
    assert int(out.evaluations) == evaluations
    for p in players:
        assert float(out.shapley[p]) == pytest.approx(expected[p], rel=1e-4, abs=1e-6)


def test_truncation_stops_after_the_first_client_when_all_updates_agree():
    params, deltas, weights = problem(num_slots=4)
    same = {k: jnp.broadcast_to(v[:1], v.shape) for k, v in deltas.items()}
    orders = all_orders([0, 1, 2], 4)[:3]
    out = score(params, same, weights, orders, truncation=1e-3)
    # Every prefix is the whole round's step: one batch of first clients, then all truncated.
    assert int(out.evaluations) == 2 + 3
    gain = float(out.value_after - out.value_before)
    firsts = [o[0] for o in orders]
    for p in (0, 1, 2):
        assert float(out.shapley[p]) == pytest.approx(gain * firsts.count(p) / 3, rel=1e-4)


def test_a_round_that_changes_nothing_is_skipped():
    params, deltas, weights = problem(num_slots=4)
    tiny = {k: v * 1e-7 for k, v in deltas.items()}
    out = score(params, tiny, weights, all_orders([0, 1, 2], 4), truncation=0.01)
    assert bool(out.shapley_skipped) and int(out.evaluations) == 2
    np.testing.assert_array_equal(np.asarray(out.shapley), 0.0)
    # No truncation: the same round is scored.
    out = score(params, tiny, weights, all_orders([0, 1, 2], 4), truncation=0.0)
    assert not bool(out.shapley_skipped)


def test_gtg_shapley_without_counted_clients_or_permutations_is_zero():
    def values(masks):
        return jnp.sum(masks, axis=1).astype(jnp.float32)

    order = jnp.asarray([[0, 1, 2]] * 2, jnp.int32)
    shapley, evaluations, skipped = gtg_shapley(
        values, jnp.zeros(3, bool), order, jnp.float32(0.0), jnp.float32(0.0), jnp.float32(1.0)
    )
    assert bool(skipped) and int(evaluations) == 0 and not np.any(np.asarray(shapley))
    counted = jnp.asarray([True, True, False])
    shapley, evaluations, _ = gtg_shapley(
        values, counted, order[:0], jnp.float32(0.0), jnp.float32(0.0), jnp.float32(2.0)
    )
    assert int(evaluations) == 0 and not np.any(np.asarray(shapley))


def test_guided_permutations_put_each_counted_client_first_in_turn():
    counted = jnp.asarray([True, False, True, True, False, True])
    ids = jnp.asarray([40, 7, 11, 3, 9, 25], jnp.int32)
    permute = jax.jit(guided_permutations, static_argnums=3)
    orders = np.asarray(permute(jax.random.key(3), counted, ids, 8))
    assert orders.shape == (8, 6)
    for row in orders:
        assert sorted(row) == list(range(6))
        assert set(row[:4]) == {0, 2, 3, 5} and set(row[4:]) == {1, 4}
    firsts = [int(r[0]) for r in orders]
    assert all(firsts.count(c) == 2 for c in (0, 2, 3, 5))
    # The same clients in other slots (another chunk size or engine): the same permutations
    # of client ids.
    moved = np.asarray([3, 0, 5, 2, 1, 4])
    again = np.asarray(permute(jax.random.key(3), counted[moved], ids[moved], 8))
    np.testing.assert_array_equal(np.asarray(ids)[moved][again], np.asarray(ids)[orders])


def test_scores_do_not_depend_on_the_slots_clients_sit_in():
    params, deltas, weights = problem(num_slots=4)  # 3 clients and a padding slot
    ids = jnp.asarray([12, 5, 30, 0], jnp.int32)
    aggregate = ClientOutput({"w": jnp.ones(D), "b": jnp.float32(0.5)})
    scoring = ContributionScoring(OBJECTIVE, eval_set(), 6, 0.01)

    def run(slots):  # the clients in other slots, with more padding (another chunk size)
        pick = jnp.asarray(slots)
        record = UploadRecord(
            ClientOutput(jax.tree.map(lambda x: x[pick], deltas)),
            weights[pick],
            aggregate,
            ids[pick],
        )
        out = scoring.score({}, params, record, jax.random.key(5), jnp.float32(0.7))
        return {
            int(ids[s]): (out.cosine[k], out.loo[k], out.shapley[k])
            for k, s in enumerate(slots)
            if weights[s] > 0
        }

    chex.assert_trees_all_close(run([0, 1, 2, 3]), run([3, 2, 3, 0, 1, 3]), rtol=1e-5, atol=1e-7)


def test_scorer_does_not_retrace_when_round_values_change():
    params, deltas, weights = problem()
    scorer = make_contribution_scorer(OBJECTIVE)
    args = ({}, params, deltas, weights, {"w": jnp.ones(D), "b": jnp.float32(1.0)}, eval_set())
    order = jnp.asarray(all_orders([0, 1], 5)[:2], jnp.int32)
    scorer(*args, order, jnp.float32(1.0), jnp.float32(0.0))
    scorer(*args, order + 0, jnp.float32(0.5), jnp.float32(0.1))
    assert scorer._cache_size() == 1


# ------------------------------------------------------------------------ the recording
def uploads_and_weights(num: int = 6):
    rng = np.random.default_rng(0)
    delta = {
        "w": jnp.asarray(rng.normal(size=(num, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(num,)), jnp.float32),
    }
    delta["w"] = delta["w"].at[2].set(jnp.nan)  # a zero-weight slot's garbage
    weights = jnp.asarray([2.0, 1.0, 0.0, 3.0, 5.0, 1.0])
    return ClientOutput(delta, ()), weights


@pytest.mark.parametrize("chunk", [None, 2])
def test_recording_leaves_a_streaming_aggregate_bit_identical(chunk):
    uploads, weights = uploads_and_weights()
    inner = weighted_mean()
    like = jax.eval_shape(lambda: jax.tree.map(lambda x: x[0], uploads))
    hparams, key = round_hparams(0.1), jax.random.key(0)

    @jax.jit
    def plain(uploads, weights):
        acc = inner.start((), like)
        step = chunk or 6
        for begin in range(0, 6, step):  # the round's chunks, in slot order
            part = jax.tree.map(lambda x, b=begin: x[b : b + step], uploads)
            acc = inner.accumulate(acc, part, weights[begin : begin + step], (), hparams)
        return inner.finalize((), acc, key, hparams)

    recorded = with_upload_record(inner, chunk)
    assert recorded.gathers and recorded.hyperparams == inner.hyperparams
    ids = jnp.arange(6, dtype=jnp.int32)
    out, state, metrics = jax.jit(recorded.finalize)(
        (), Gathered(uploads, weights, ids), key, hparams
    )
    expected, _, _ = plain(uploads, weights)
    chex.assert_trees_all_equal(out, expected)
    scalars, arrays = split_recorded(metrics)
    assert scalars == {}
    assert set(arrays) == {RECORD_UPLOADS, RECORD_WEIGHTS, RECORD_AGGREGATE, RECORD_CLIENT_IDS}
    record = upload_record(arrays)
    chex.assert_trees_all_equal(record.uploads, uploads)
    chex.assert_trees_all_equal(record.weights, weights)
    chex.assert_trees_all_equal(record.aggregate, expected)
    chex.assert_trees_all_equal(record.client_ids, ids)


def test_recording_a_gathering_aggregator_passes_the_gathered_uploads_through():
    uploads, weights = uploads_and_weights()
    inner = coordinate_median_aggregator()
    gathered = Gathered(uploads, weights, jnp.arange(6, dtype=jnp.int32))
    hparams, key = round_hparams(0.1), jax.random.key(0)
    expected, _, metrics = jax.jit(inner.finalize)((), gathered, key, hparams)
    out, _, recorded = jax.jit(with_upload_record(inner).finalize)((), gathered, key, hparams)
    chex.assert_trees_all_equal(out, expected)
    assert split_recorded(recorded)[0] == metrics


def test_an_attack_around_the_recording_records_the_attacked_uploads():
    uploads, weights = uploads_and_weights()
    uploads = uploads._replace(delta={k: jnp.nan_to_num(v) for k, v in uploads.delta.items()})
    table = np.zeros(6, bool)
    table[1] = True
    attacked = with_attack(
        with_upload_record(weighted_mean()), table, "sign_flip", ByzantineConfig()
    )
    gathered = Gathered(uploads, weights, jnp.arange(6, dtype=jnp.int32))
    _, _, metrics = attacked.finalize((), gathered, jax.random.key(0), round_hparams(0.1))
    record = upload_record(metrics)
    scale = ByzantineConfig().scale
    np.testing.assert_allclose(record.uploads.delta["w"][1], -scale * uploads.delta["w"][1])
    np.testing.assert_array_equal(record.uploads.delta["w"][0], uploads.delta["w"][0])
    assert float(metrics["byzantine/malicious"]) == 1.0


@pytest.mark.parametrize("inner", [weighted_mean, coordinate_median_aggregator])
def test_the_recording_round_equals_the_plain_round_bit_for_bit(inner):
    data, params = make_problem()
    ids, delivered, chunk = [0, 2, 3, 4, 5], [True, True, False, True, True], 2
    slots = cohort_slots(len(ids), chunk, 1)

    def run(aggregator):
        pipeline = AggregationPipeline(identity(), aggregator)
        fn = make_round_fn(
            ALGORITHM,
            OBJECTIVE,
            SCHEDULE,
            num_clients_total=M,
            clients_per_chunk=chunk,
            pipeline=pipeline,
        )
        state = init_round_state(ALGORITHM, params, M, pipeline)
        return jax.jit(fn)(
            {}, state, data, cohort(ids, delivered, slots), jax.random.key(7), hparams_for(pipeline)
        )

    plain_state, plain_out = run(inner())
    state, out = run(with_upload_record(inner(), chunk))
    chex.assert_trees_all_equal(state, plain_state)
    scalars, recorded = split_recorded(out.pipeline)
    assert scalars == plain_out.pipeline
    record = upload_record(recorded)
    assert record.weights.shape == (slots,)
    chex.assert_trees_all_equal(record.weights, out.weights)
    assert jax.tree.leaves(record.uploads)[0].shape[0] == slots
    np.testing.assert_array_equal(np.asarray(record.weights) > 0, [1, 1, 0, 1, 1, 0])


# -------------------------------------------------------------------------- config and totals
@pytest.mark.parametrize(
    "sections,message",
    [
        ({"privacy": {"level": "client", "noise_multiplier": 1.0}}, "client-level DP"),
        ({"secure_aggregation": {"enabled": True}}, "only learns their sum"),
    ],
)
def test_scores_are_refused_where_they_would_reveal_what_is_hidden(make_config, sections, message):
    config = make_config(contribution={"enabled": True}, **sections)
    with pytest.raises(ConfigError, match=message):
        config.validate()


@pytest.mark.parametrize(
    "algorithm,message",
    [
        ("flora", "changes the base"),
        ("flexlora", "computes from the uploads"),
    ],
)
def test_scores_are_refused_for_uploads_that_are_not_a_step_of_the_params(
    make_config, algorithm, message
):
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 2, "lora_targets": ("q", "v")},
        algorithm={"type": algorithm},
        contribution={"enabled": True},
    )
    with pytest.raises(ConfigError, match=message):
        Simulation(config, verbose=False)


@pytest.mark.parametrize(
    "algorithm,sections",
    [
        ({"type": "fedper", "personal_layers": 1}, {"model": {"num_layers": 2}}),
        ({"type": "personal_prompt"}, {"trainable": {"lora_soft_prompt": 2}}),
        ({"type": "ffa_lora"}, {}),
    ],
)
def test_scores_of_uploads_that_stand_for_a_params_change_step_like_the_server(
    make_config, algorithm, sections
):
    """A personal part left out of the upload (FedPer, a personal prompt) or FFA-LoRA's b alone:
    the scores step the global params by what each upload stands for (`params_delta`). With a
    plain SGD server that is exactly the server's step, so the held-out loss the scorer sees
    after round 1 is the loss it sees before round 2 (the same params)."""
    trainable = {"mode": "lora", "lora_rank": 2, "lora_targets": ("q", "v")}
    trainable.update(sections.pop("trainable", {}))
    config = fast_config(
        make_config,
        trainable=trainable,
        algorithm=algorithm,
        contribution={"shapley_permutations": 2},
        client={"lr": 0.05},
        run={"num_rounds": 2},
        eval={"every": 0},
        **sections,
    )
    history = Simulation(config, verbose=False).run()
    first, second = (h for h in history if "contribution/loss_after" in h)
    assert first["contribution/loss_after"] != pytest.approx(first["contribution/loss_before"])
    assert second["contribution/loss_before"] == pytest.approx(
        first["contribution/loss_after"], rel=1e-5
    )
    lines = read_jsonl(os.path.join(config.run.output_dir, CONTRIBUTIONS))
    assert len(lines) == 16 and all(np.isfinite(r["loo"]) for r in lines)
    assert any(r["cosine"] != 0 for r in lines)


def test_hetlora_scores_each_client_by_its_own_adapter_change(make_config):
    """HetLoRA uploads its change times its norm weight; the scores divide the weight out."""
    config = fast_config(
        make_config,
        trainable={"mode": "lora", "lora_rank": 4, "lora_targets": ("q", "v")},
        algorithm={"type": "hetlora"},
        system={"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (2, 4)},
        contribution={"shapley_permutations": 2},
        run={"num_rounds": 1},
        eval={"every": 0},
    )
    Simulation(config, verbose=False).run()
    lines = read_jsonl(os.path.join(config.run.output_dir, CONTRIBUTIONS))
    cosines = np.array([r["cosine"] for r in lines])
    # Each client's change is a rescaled piece of the aggregate: cosines are real cosines.
    assert np.all(np.abs(cosines) <= 1 + 1e-6) and np.all(cosines > 0)


def test_totals_sum_the_counted_rounds_and_rank_by_shapley():
    lines = [
        {"round": 1, "client": 3, "counted": True, "cosine": 0.5, "loo": 0.1, "shapley": 0.2},
        {"round": 1, "client": 1, "counted": True, "cosine": 0.1, "loo": -0.2, "shapley": -0.1},
        {"round": 2, "client": 3, "counted": False, "cosine": None, "loo": None, "shapley": None},
        {"round": 2, "client": 1, "counted": True, "cosine": 0.3, "loo": 0.1, "shapley": 0.5},
        {"round": 2, "client": 7, "counted": False, "cosine": None, "loo": None, "shapley": None},
    ]
    totals = contribution_totals(lines)
    assert totals["rounds"] == 2 and totals["ranked_by"] == "shapley_sum"
    assert totals["ranking"] == [1, 3, 7]  # 7 never counted: last
    by_id = {c["client"]: c for c in totals["clients"]}
    assert by_id[1] == {
        "client": 1,
        "rounds_sampled": 2,
        "rounds_counted": 2,
        "mean_cosine": pytest.approx(0.2),
        "loo_sum": pytest.approx(-0.1),
        "shapley_sum": pytest.approx(0.4),
    }
    assert by_id[3]["rounds_sampled"] == 2 and by_id[3]["rounds_counted"] == 1
    assert by_id[7]["shapley_sum"] is None
    no_shapley = [dict(r, shapley=None) for r in lines]
    assert contribution_totals(no_shapley)["ranked_by"] == "loo_sum"


# ---------------------------------------------------------------------------- end to end
FAST = {
    # A smooth regime on the tiny model: Adam clients, every client's whole data in a round.
    "client": {"optimizer": "adamw", "lr": 0.01, "local_steps": 4, "batch_size": 32},
    "data": {
        "task_families": ("copy", "add"),
        "eval_examples_per_family": 24,
        "examples_per_client": 80,
    },
    "eval": {"every": 0},
}


def fast_config(make_config, contribution=None, run=None, **sections):
    merged = {name: dict(fields) for name, fields in FAST.items()}
    for name, fields in sections.items():
        merged.setdefault(name, {}).update(fields)
    return make_config(
        contribution={
            "enabled": True,
            "eval_examples": 48,
            "shapley_permutations": 16,
            **(contribution or {}),
        },
        run={
            "num_clients_per_round": 8,
            "partition_report": False,
            "save_checkpoints": False,
            **(run or {}),
        },
        **merged,
    )


def totals_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, CONTRIBUTION_TOTALS)) as f:
        totals = json.load(f)
    return {c["client"]: c for c in totals["clients"]} | {"ranking": totals["ranking"]}


@pytest.mark.slow
def test_a_client_with_flipped_responses_ranks_last(make_config):
    # One client of eight (chosen from the seed) trains on other task families' responses.
    config = fast_config(
        make_config, byzantine={"attack": "label_flip", "fraction": 0.125}, run={"num_rounds": 8}
    )
    (bad,) = np.flatnonzero(malicious_clients(8, 0.125, config.run.seed))
    history = Simulation(config, verbose=False).run()
    run_dir = config.run.output_dir
    lines = read_jsonl(os.path.join(run_dir, CONTRIBUTIONS))
    # One line per round and sampled client (every client, every round), rounds in order.
    assert sorted((r["round"], r["client"]) for r in lines) == [
        (r, c) for r in range(1, 9) for c in range(8)
    ]
    assert [r["round"] for r in lines] == sorted(r["round"] for r in lines)
    assert all(r["counted"] and r["weight"] > 0 for r in lines)
    totals = totals_of(run_dir)
    clients = [totals[c] for c in range(8)]
    for key in ("shapley_sum", "loo_sum", "mean_cosine"):
        scores = np.array([c[key] for c in clients])
        assert np.argmin(scores) == bad, (key, scores)
    assert totals["ranking"][-1] == bad
    # The lines add up to the totals; the rounds' metrics say what the scores cost.
    shapley = sum(r["shapley"] for r in lines if r["client"] == bad)
    assert totals[bad]["shapley_sum"] == pytest.approx(shapley)
    rounds = history[1:]
    assert all(r["contribution/evaluations"] >= 2 for r in rounds)
    assert rounds[-1]["contribution/loss_after"] < rounds[0]["contribution/loss_before"]
    assert all(r["contribution_time_s"] > 0 for r in rounds)
    assert not any(k.startswith("pipeline/record") for r in rounds for k in r)


@pytest.mark.slow
def test_a_client_holding_a_copy_of_another_clients_data_scores_alike(make_config):
    config = fast_config(
        make_config,
        data={"partitioner": "dirichlet", "dirichlet_alpha": 0.5},
        run={"num_rounds": 5},
    )
    task = build_data(config.data, ByteTokenizer())
    train = task.train
    clients = [
        {
            name: getattr(train.examples, name)[train.client_indices(m)]
            for name in ("tokens", "loss_mask")
        }
        for m in range(train.num_clients)
    ]
    source, copy = 2, 5
    clients[copy] = clients[source]
    data = ClientArrays.from_clients(
        clients, eval={"tokens": task.eval.tokens, "loss_mask": task.eval.loss_mask}
    )
    (size,) = set(data.client_count.tolist())
    # Local steps over each client's whole data: the twins' updates differ by float rounding.
    config = dataclasses.replace(config, client=dataclasses.replace(config.client, batch_size=size))
    Simulation(config, data=data, verbose=False).run()
    totals = totals_of(config.run.output_dir)
    others = [c for c in range(8) if c not in (source, copy)]
    for key in ("shapley_sum", "loo_sum", "mean_cosine"):
        scores = {c: totals[c][key] for c in range(8)}
        gap = abs(scores[source] - scores[copy])
        spread = np.std([scores[c] for c in others])
        assert gap < spread, (key, scores)
        if key != "shapley_sum":  # no Monte Carlo: each twin is the other's nearest
            nearest = min(abs(scores[t] - scores[c]) for t in (source, copy) for c in others)
            assert gap < nearest, (key, scores)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_scores_of_its_past_rounds(make_config):
    sections = {
        "contribution": {"enabled": True, "eval_examples": 16, "shapley_permutations": 4},
        "eval": {"every": 0},
    }
    first = make_config(
        run={"num_rounds": 3, "stop_after": 2, "partition_report": False}, **sections
    )
    Simulation(first, verbose=False).run()
    run_dir = first.run.output_dir
    path = os.path.join(run_dir, CONTRIBUTIONS)
    before = read_jsonl(path)
    assert [r["round"] for r in before] == [1] * 4 + [2] * 4
    assert totals_of(run_dir)["ranking"]  # a stopped run has its totals too
    # A line of a round after the checkpoint (the process died before saving it) is dropped.
    with open(path, "a") as f:
        f.write(json.dumps(dict(before[-1], round=3, client=99)) + "\n")
    resumed = make_config(
        run={"num_rounds": 3, "resume": True, "output_dir": run_dir, "partition_report": False},
        **sections,
    )
    Simulation(resumed, verbose=False).run()
    after = read_jsonl(path)
    assert after[:8] == before  # the past rounds' lines, as they were written
    assert [r["round"] for r in after[8:]] == [3] * 4 and 99 not in {r["client"] for r in after}
    totals = totals_of(run_dir)
    assert sum(totals[c]["rounds_sampled"] for c in range(8) if c in totals) == 12
