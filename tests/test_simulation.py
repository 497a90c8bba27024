"""End-to-end runs through `Simulation`: each training mode, resume equality, failures."""

from __future__ import annotations

import json
import os
import re

import chex
import jax
import numpy as np
import pytest

from fedjax_llm import ConfigError, DivergenceError, RunDirectoryError, Simulation, simulate
from fedjax_llm.metrics import read_jsonl


@pytest.mark.parametrize(
    "trainable,client",
    [
        ({"mode": "full"}, {"lr": 0.02}),
        ({"mode": "lora", "lora_rank": 4, "lora_targets": ("q", "v", "up")}, {"lr": 0.05}),
        ({"mode": "soft_prompt", "num_virtual_tokens": 4}, {"lr": 0.1}),
        ({"mode": "prefix", "num_virtual_tokens": 4}, {"lr": 0.1}),
    ],
)
def test_each_mode_trains_and_writes_the_run_directory(make_config, trainable, client):
    config = make_config(trainable=trainable, client=client, run={"num_rounds": 4})
    history = simulate(config)
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    before, after = history[0], history[-1]
    assert before["round"] == 0 and after["round"] == 4
    assert after["eval/loss"] < before["eval/loss"]
    for key in (
        "client/loss_mean",
        "client/loss_worst10",
        "eval/exact_match/copy",
        "bytes_up",
        "bytes_down",
        "tokens_per_s",
        "client_updates_per_s",
    ):
        assert key in after
    assert after["client/loss_worst10"] >= after["client/loss_mean"]
    run_dir = config.run.output_dir
    for name in ("config.yaml", "metrics.jsonl", "partition.json", "summary.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert read_jsonl(os.path.join(run_dir, "metrics.jsonl")) == history
    assert "compile_time_s" in history[1]
    # The whole wall time is accounted for, and every record says when it was written.
    for key in ("load_time_s", "data_time_s", "eval_time_s"):
        assert history[0][key] >= 0.0, key
    assert after["checkpoint_bytes"] > 0 and after["checkpoint_time_s"] > 0
    times = [h["time"] for h in history]
    assert times == sorted(times)
    spent = json.load(open(os.path.join(run_dir, "summary.json")))["wall_time_s"]
    parts = sum(v for k, v in spent.items() if k != "total")
    assert parts == pytest.approx(spent["total"]) and spent["rounds"] > 0
    # Every client's held-out results, per evaluation: which clients are worst, not only how bad.
    clients = read_jsonl(os.path.join(run_dir, "eval_clients.jsonl"))
    assert [c["round"] for c in clients] == [0] * 8 + [4] * 8
    final = [c for c in clients if c["round"] == 4]
    assert [c["client"] for c in final] == list(range(8))
    worst = sorted(c["loss"] for c in final)[-1:]
    assert after["client/loss_worst10"] == pytest.approx(np.mean(worst), rel=1e-5)


def test_bytes_sent_match_the_trainable_size(make_config):
    config = make_config(
        trainable={"mode": "lora", "lora_rank": 2, "lora_targets": ("q",)}, run={"num_rounds": 1}
    )
    sim = Simulation(config, verbose=False)
    lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(sim.params))
    record = sim.run()[-1]
    assert record["bytes_down"] == 4 * lora_bytes
    assert record["bytes_up"] == record["participants"] * lora_bytes


# FedAdam (server optimizer state) is resumed bit for bit in tests/test_faults.py, after kills.
@pytest.mark.parametrize("algorithm", ["scaffold"])
def test_resume_is_bit_for_bit(make_config, algorithm):
    sections = {
        "algorithm": {"type": algorithm},
        "server": {"lr": 0.01 if algorithm == "fedadam" else 1.0},
        # SCAFFOLD's option II needs plain SGD clients; FedAdam gets momentum ones.
        "client": {
            "schedule": "cosine",
            "optimizer": "sgd" if algorithm == "scaffold" else "momentum",
            "lr": 0.2,
        },
    }
    straight = Simulation(make_config(run={"num_rounds": 5}, **sections), verbose=False)
    straight_history = straight.run()

    first = make_config(run={"num_rounds": 5, "stop_after": 3, "checkpoint_every": 2}, **sections)
    Simulation(first, verbose=False).run()
    resumed_config = make_config(
        run={"num_rounds": 5, "resume": True, "output_dir": first.run.output_dir}, **sections
    )
    resumed = Simulation(resumed_config, verbose=False)
    resumed_history = resumed.run()

    chex.assert_trees_all_equal(resumed.server_state, straight.server_state)
    chex.assert_trees_all_equal(resumed.client_store, straight.client_store)
    assert [h.get("train_loss") for h in straight_history] == [
        h.get("train_loss") for h in resumed_history
    ]
    assert straight_history[-1]["eval/loss"] == resumed_history[-1]["eval/loss"]
    if algorithm == "scaffold":  # the per-client controls really were restored and used
        assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(resumed.client_store))


def test_resume_refuses_an_incompatible_config(make_config):
    config = make_config(run={"num_rounds": 1})
    Simulation(config, verbose=False).run()
    changed = make_config(
        client={"lr": 0.123},
        run={"num_rounds": 2, "resume": True, "output_dir": config.run.output_dir},
    )
    with pytest.raises(ConfigError, match=r"client\.lr: 0\.02 -> 0\.123"):
        Simulation(changed, verbose=False).run()
    other_mode = make_config(
        trainable={"mode": "lora"},
        run={"num_rounds": 2, "resume": True, "output_dir": config.run.output_dir},
    )
    # Named by the config field, before any array is read.
    with pytest.raises(ConfigError, match=r"trainable\.mode: 'full' -> 'lora'"):
        Simulation(other_mode, verbose=False).run()


def test_existing_run_directory_is_never_overwritten(make_config):
    config = make_config(run={"num_rounds": 1})
    Simulation(config, verbose=False).run()
    metrics = open(os.path.join(config.run.output_dir, "metrics.jsonl")).read()
    with pytest.raises(RunDirectoryError, match="resume"):
        Simulation(config, verbose=False).run()
    assert open(os.path.join(config.run.output_dir, "metrics.jsonl")).read() == metrics


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_resume(make_config):
    broken = make_config(run={"num_rounds": 2})
    # What a run killed before its first checkpoint leaves: its config and round 0's record.
    os.makedirs(os.path.join(broken.run.output_dir, "checkpoints"))
    with open(os.path.join(broken.run.output_dir, "metrics.jsonl"), "w") as f:
        f.write('{"round": 0, "eval/loss": 5.0}\n{"round": 1, "train_lo')
    fixed = make_config(run={"num_rounds": 2, "output_dir": broken.run.output_dir})
    with pytest.raises(RunDirectoryError, match="stopped before its first checkpoint; pass "):
        Simulation(fixed, verbose=False).run()
    restarted = Simulation(
        make_config(run={"num_rounds": 2, "output_dir": broken.run.output_dir, "resume": True}),
        verbose=False,
    )
    history = restarted.run()
    assert restarted.notes == [
        f"{broken.run.output_dir} holds no committed checkpoint: starting from round 0."
    ]
    fresh = Simulation(make_config(run={"num_rounds": 2}), verbose=False).run()
    assert [h.get("train_loss") for h in history] == [h.get("train_loss") for h in fresh]
    assert read_jsonl(os.path.join(broken.run.output_dir, "metrics.jsonl")) == history


def test_divergence_after_resume_names_the_checkpoint_resumed_from(make_config, monkeypatch):
    config = make_config(run={"num_rounds": 2})
    Simulation(config, verbose=False).run()
    resumed = make_config(
        run={"num_rounds": 4, "output_dir": config.run.output_dir, "resume": True}
    )
    run_round = Simulation.run_round

    def nan_loss(self, round_num):
        out, cohort = run_round(self, round_num)
        return out._replace(train_loss=np.float32("nan")), cohort

    monkeypatch.setattr(Simulation, "run_round", nan_loss)
    checkpoint = os.path.join(os.path.abspath(config.run.output_dir), "checkpoints", "2")
    with pytest.raises(DivergenceError, match=f"round 3: .*last good checkpoint is {checkpoint}"):
        Simulation(resumed, verbose=False).run()


def test_a_non_finite_evaluation_loss_stops_before_the_checkpoint(make_config, monkeypatch):
    config = make_config(run={"num_rounds": 2, "checkpoint_every": 1}, eval={"every": 2})
    evaluate = Simulation.evaluate
    monkeypatch.setattr(
        Simulation,
        "evaluate",
        lambda self: (
            {**evaluate(self), "eval/loss": float("inf")} if self.history else evaluate(self)
        ),
    )
    with pytest.raises(DivergenceError, match="round 2: the evaluation loss is inf"):
        Simulation(config, verbose=False).run()
    ckpt = os.path.join(config.run.output_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["1"]


def test_divergence_stops_with_round_and_last_checkpoint(make_config):
    config = make_config(client={"lr": 1e30}, run={"num_rounds": 6, "checkpoint_every": 1})
    pattern = r"round (\d+): (training loss is (nan|inf)|the global parameters are not finite)"
    with pytest.raises(DivergenceError, match=pattern) as e:
        Simulation(config, verbose=False).run()
    assert "checkpoint" in str(e.value)
    records = read_jsonl(os.path.join(config.run.output_dir, "metrics.jsonl"))
    failed = int(re.match(pattern, str(e.value)).group(1))
    assert records[-1]["round"] == failed  # the failing round is on disk too
    assert not os.path.exists(os.path.join(config.run.output_dir, "checkpoints", str(failed)))


def test_lora_on_a_federated_pretrained_base(make_config):
    pretrain = make_config(run={"num_rounds": 2})
    Simulation(pretrain, verbose=False).run()
    finetune = make_config(
        trainable={"mode": "lora", "base_run": pretrain.run.output_dir}, run={"num_rounds": 1}
    )
    sim = Simulation(finetune, verbose=False)
    pretrained = Simulation(
        make_config(run={"num_rounds": 2, "resume": True, "output_dir": pretrain.run.output_dir}),
        verbose=False,
    )
    pretrained._prepare_run_dir()
    chex.assert_trees_all_equal(sim.frozen, pretrained.params)

    # A LoRA run as a base (its adapter merged in): tests/test_training_chain.py.
    with pytest.raises(ConfigError, match="'soft_prompt'; a base must come from"):
        prompt_run = make_config(trainable={"mode": "soft_prompt"}, run={"num_rounds": 1})
        Simulation(prompt_run, verbose=False).run()
        Simulation(
            make_config(trainable={"mode": "lora", "base_run": prompt_run.run.output_dir}),
            verbose=False,
        )


def test_partition_statistics_are_written(make_config):
    config = make_config(
        data={"partitioner": "dirichlet", "dirichlet_alpha": 0.1}, run={"num_rounds": 1}
    )
    Simulation(config, verbose=False).run()
    stats = json.load(open(os.path.join(config.run.output_dir, "partition.json")))
    assert stats["num_clients"] == 8
    assert stats["client_label_entropy_mean"] < stats["global_label_entropy"]


def test_clients_sharded_over_devices_match_one_device(make_config):
    """conftest forces 8 host devices: a run sharded over 4 equals the one-device run."""
    # SGD: AdamW's normalization would amplify float rounding of near-zero gradients.
    client = {"optimizer": "sgd", "lr": 0.5}
    one = Simulation(make_config(run={"num_rounds": 2}, client=client), verbose=False)
    sharded = Simulation(
        make_config(run={"num_rounds": 2, "devices": 4}, client=client), verbose=False
    )
    assert sharded.mesh is not None and sharded.mesh.size == 4
    history_one, history_sharded = one.run(), sharded.run()
    np.testing.assert_allclose(
        [h["train_loss"] for h in history_one[1:]],
        [h["train_loss"] for h in history_sharded[1:]],
        rtol=1e-5,
    )
    chex.assert_trees_all_close(one.params, sharded.params, atol=1e-6, rtol=1e-5)
    # 4 clients over 3 devices: padded to 6 slots (the round's equality with padding over
    # uneven devices is tested in test_round).
    uneven = Simulation(make_config(run={"devices": 3}, client=client), verbose=False)
    assert uneven.slots == 6
    with pytest.raises(ConfigError, match="device"):
        Simulation(
            make_config(run={"devices": 16, "num_clients_per_round": 16}, data={"num_clients": 16}),
            verbose=False,
        )


def _counting_pipeline():
    """A stateful pipeline: per-client state counts a client's delivered uploads, server state
    counts all of them (updated from the summed per-client stats)."""
    import jax.numpy as jnp

    from fedjax_llm import AggregationPipeline, UploadTransform, weighted_mean

    def apply(upload, state, client_state, key, hparams):
        del state, key, hparams
        return upload, client_state + 1.0, {"count": jnp.float32(1.0)}

    transform = UploadTransform(
        init=lambda like: jnp.zeros((), jnp.float32),
        client_init=lambda like: jnp.zeros((), jnp.float32),
        apply=apply,
        update=lambda state, stats, key, hparams: state + stats["count"],
    )
    return AggregationPipeline(transform, weighted_mean())


def test_pipeline_states_are_checkpointed_and_resumed(make_config):
    sections = {"sampling": {"dropout": 0.3}, "client": {"optimizer": "sgd", "lr": 0.3}}
    straight = Simulation(
        make_config(run={"num_rounds": 5}, **sections), pipeline=_counting_pipeline(), verbose=False
    )
    history = straight.run()
    delivered = sum(h["participants"] for h in history[1:])
    assert 0 < delivered < 5 * 4  # some uploads were lost, and not counted
    assert sum(h["dropped"] for h in history[1:]) == 5 * 4 - delivered
    assert float(straight.state.pipeline.transform) == delivered
    assert float(straight.client_store.transform.sum()) == delivered

    first = make_config(run={"num_rounds": 5, "stop_after": 3}, **sections)
    Simulation(first, pipeline=_counting_pipeline(), verbose=False).run()
    resumed = Simulation(
        make_config(
            run={"num_rounds": 5, "resume": True, "output_dir": first.run.output_dir}, **sections
        ),
        pipeline=_counting_pipeline(),
        verbose=False,
    )
    resumed.run()
    chex.assert_trees_all_equal(resumed.state, straight.state)


def test_hyperparam_schedule_changes_values_per_round_without_recompiling(make_config):
    config = make_config(
        aggregation={"transforms": ("clip",), "clip_norm": 0.01}, run={"num_rounds": 3}
    )
    sim = Simulation(
        config, verbose=False, hyperparam_schedule=lambda r: {"clip_norm": [0.01, 100.0, 0.01][r]}
    )
    history = sim.run()
    # Every client is clipped at 0.01, none at 100, all by the one program compiled ahead of
    # time (which accepts no argument of another structure; retracing is tested in test_round).
    assert [h["pipeline/clip/clipped"] for h in history[1:]] == [4.0, 0.0, 4.0]
    with pytest.raises(ConfigError, match="declares"):
        Simulation(config, verbose=False, hyperparam_schedule=lambda r: {"noise": 1.0}).hyperparams(
            0
        )


def test_a_pipeline_piece_that_does_not_fit_the_trainable_fails_before_training(make_config):
    """A transform written for LoRA uploads (it reads ``delta["q"]``) on a full-parameter run
    stops with one ConfigError naming the pieces and the mode, before any round runs."""
    from fedjax_llm import AggregationPipeline, weighted_mean
    from fedjax_llm.pipeline import identity

    def apply(upload, state, client_state, key, hparams):
        return upload._replace(delta={"q": upload.delta["q"]}), client_state, {}

    pipeline = AggregationPipeline(identity()._replace(apply=apply), weighted_mean())
    config = make_config(trainable={"mode": "full"})
    with pytest.raises(ConfigError, match=r"cannot be built: KeyError.*trainable.mode=full"):
        Simulation(config, pipeline=pipeline, verbose=False).run()
    assert not os.path.exists(os.path.join(config.run.output_dir, "checkpoints", "1"))


def test_parameters_that_diverge_in_the_last_local_step_are_never_saved(make_config):
    """The training loss is measured before each local update, so a step that blows up the
    parameters in the last round still reports a finite loss; the run must stop anyway and no
    checkpoint of that round may exist (it used to exit 0 after saving NaN parameters)."""
    config = make_config(
        # lr is inf in float32: the only local step (its loss still finite) makes inf/NaN.
        client={"optimizer": "sgd", "lr": 1e39, "local_steps": 1},
        run={"num_rounds": 1, "checkpoint_every": 1},
    )
    with pytest.raises(DivergenceError, match=r"round 1: the global parameters are not finite"):
        Simulation(config, verbose=False).run()
    records = read_jsonl(os.path.join(config.run.output_dir, "metrics.jsonl"))
    assert np.isfinite(records[-1]["train_loss"])  # the loss alone would not have caught it
    assert not os.path.exists(os.path.join(config.run.output_dir, "checkpoints", "1"))


def test_out_of_device_memory_is_a_named_error_with_the_fix(make_config):
    from fedjax_llm.errors import DeviceMemoryError

    sim = Simulation(make_config(), verbose=False)
    sim.compile()

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."
        )

    sim._compiled = exhausted
    with pytest.raises(
        DeviceMemoryError, match=r"round 1 needs more device memory.*clients_per_chunk"
    ):
        sim.run_round(0)

    def other(*args):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    sim._compiled = other
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        sim.run_round(0)


def test_too_little_disk_for_a_checkpoint_is_warned_before_training(make_config, monkeypatch):
    import shutil

    free = shutil.disk_usage(".")._replace(free=1024)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    sim = Simulation(make_config(run={"num_rounds": 1}), verbose=False)
    sim.run()
    assert any(
        n.startswith("warning: a checkpoint of this run holds") and "saving may fail" in n
        for n in sim.notes
    )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_round_updates_its_donated_state_in_place(make_config, mode):
    import warnings

    from fedjax_llm.simulation import tree_bytes

    sim = Simulation(make_config(trainable={"mode": mode}), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim.compile()
        before = sim.state
        sim.run_round(0)
    # XLA warns "Some donated buffers were not usable" when an output cannot reuse an input.
    assert not [w for w in caught if "donat" in str(w.message).lower()]
    # Every buffer of the state is aliased to an output, and the old state's are consumed.
    stats = sim._compiled.memory_analysis()
    if stats is not None:
        assert stats.alias_size_in_bytes == tree_bytes(before)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(before))
