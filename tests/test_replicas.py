"""Runs that differ only in seeds or round-varying values, as one compiled program
(`fedjax_llm.replicas.ReplicaGroup`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_llm import Simulation
from fedjax_llm.config import ConfigError
from fedjax_llm.replicas import ReplicaGroup, replica_differences
from fedjax_llm.simulation import DivergenceError


def _configs(make_config, lrs=(0.02, 0.04, 0.03), mode="lora", **client):
    return [
        make_config(
            trainable={"mode": mode},
            run={"seed": seed, "num_rounds": 3},
            client={"lr": lr, **client},
            eval={"every": 3},
        )
        for seed, lr in enumerate(lrs)
    ]


def test_group_equals_separate_runs(make_config):
    separate = [Simulation(c, verbose=False) for c in _configs(make_config)]
    for sim in separate:
        sim.run()
    grouped = [Simulation(c, verbose=False) for c in _configs(make_config)]
    group = ReplicaGroup(grouped)
    histories = group.run()
    assert group.errors == [None] * 3 and len(group.round_times) == 3
    for alone, together, history in zip(separate, grouped, histories, strict=True):
        assert together.compile_time_s == group.compile_time_s
        for a, b in zip(
            jax.tree.leaves(alone.params), jax.tree.leaves(together.params), strict=True
        ):
            # Batched matmuls over the replica axis add in another order: float rounding only.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        want = [h["train_loss"] for h in alone.history if "train_loss" in h]
        got = [h["train_loss"] for h in history if "train_loss" in h]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert "eval/loss" in history[-1]


def test_a_failing_replica_leaves_and_the_others_finish(make_config):
    # Plain SGD at a learning rate of 1e30 overflows in the first round.
    lrs = (0.02, 1e30, 0.03)
    alone = Simulation(_configs(make_config, lrs, "full", optimizer="sgd")[2], verbose=False)
    alone.run()
    sims = [
        Simulation(c, verbose=False) for c in _configs(make_config, lrs, "full", optimizer="sgd")
    ]
    group = ReplicaGroup(sims)
    histories = group.run()
    assert isinstance(group.errors[1], DivergenceError) and histories[1] is None
    assert group.errors[0] is None and group.errors[2] is None
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(sims[2].params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_runs_that_differ_in_structure_cannot_group(make_config):
    a = make_config(run={"seed": 0})
    b = make_config(run={"seed": 1}, client={"batch_size": 2})
    assert replica_differences([a, b]) == ["client.batch_size"]
    assert replica_differences([a, make_config(run={"seed": 5}, client={"lr": 0.1})]) == []
    with pytest.raises(ConfigError, match="client.batch_size"):
        ReplicaGroup([Simulation(a, verbose=False), Simulation(b, verbose=False)])
