"""Tests of fedjax_llm/checkpoint.py: save/restore of the global state, metadata, mismatch
errors, config differences and checkpoint retention."""

from __future__ import annotations

import dataclasses
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.checkpoint import (
    RESUMABLE_FIELDS,
    Checkpointer,
    CheckpointMismatchError,
    config_differences,
)
from fedjax_llm.config import config_to_dict


def make_state(seed: int = 0) -> dict:
    """A nested state like a run's: params, optimizer state (a tuple), a client store and the
    PRNG key as key data."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.bfloat16),
        },
        "opt_state": (jnp.asarray(7, jnp.int32), {"mu": jnp.asarray(rng.normal(size=(3, 2)))}),
        "client_store": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
        "key": jax.random.key_data(jax.random.key(seed + 11)),
    }


METADATA = {
    "round": 3,
    "history": [{"round": 1, "train/loss": 2.5}, {"round": 3, "train/loss": 1.25}],
    "config": {"client": {"lr": 0.1}, "run": {"num_rounds": 10}},
}


def test_save_restore_round_trip_of_a_nested_state_with_key_data(tmp_path):
    state = make_state()
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    try:
        checkpointer.save(3, state, METADATA)
        assert os.path.isdir(checkpointer.path(3))
        like = jax.tree.map(jnp.zeros_like, make_state(seed=1))
        restored, meta = checkpointer.restore(3, like)
    finally:
        checkpointer.close()

    assert meta == METADATA
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    # The key data wrap back into a key that draws the same numbers.
    key = jax.random.wrap_key_data(jnp.asarray(restored["key"]))
    np.testing.assert_array_equal(
        jax.random.uniform(key, (4,)), jax.random.uniform(jax.random.key(11), (4,))
    )


def test_restore_raw_returns_flat_key_paths(tmp_path):
    state = make_state()
    checkpointer = Checkpointer(str(tmp_path))
    try:
        checkpointer.save(1, state, METADATA)
        flat, meta = checkpointer.restore_raw(1)
    finally:
        checkpointer.close()
    assert meta == METADATA
    assert set(flat) == {
        "['params']['w']",
        "['params']['b']",
        "['opt_state'][0]",
        "['opt_state'][1]['mu']",
        "['client_store']",
        "['key']",
    }
    np.testing.assert_array_equal(flat["['client_store']"], state["client_store"])


def test_metadata_reads_without_the_arrays(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    try:
        checkpointer.save(2, make_state(), METADATA)
        # Remove the array data: metadata must not need it.
        shutil.rmtree(os.path.join(checkpointer.path(2), "state"))
        assert checkpointer.metadata(2) == METADATA
    finally:
        checkpointer.close()


def test_restore_names_missing_unexpected_and_different_shape_entries(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    try:
        checkpointer.save(1, make_state(), METADATA)
        like = make_state()
        like["params"]["w"] = jnp.zeros((3, 4))  # different shape
        del like["client_store"]  # saved but not in this run: unexpected
        like["control"] = jnp.zeros(2)  # in this run but not saved: missing
        with pytest.raises(CheckpointMismatchError) as error:
            checkpointer.restore(1, like)
    finally:
        checkpointer.close()
    message = str(error.value)
    assert "missing [\"['control']\"]" in message
    assert "unexpected [\"['client_store']\"]" in message
    assert "different shapes [\"['params']['w']\"]" in message
    assert checkpointer.path(1) in message
    assert isinstance(error.value, ValueError)


def test_latest_round_and_keep_only_the_newest(tmp_path):
    directory = str(tmp_path / "checkpoints")
    checkpointer = Checkpointer(directory, keep=2)
    try:
        assert checkpointer.latest_round() is None
        state = make_state()
        for round_num in (2, 4, 6, 8):
            checkpointer.save(round_num, state, {"round": round_num})
            assert checkpointer.latest_round() == round_num
    finally:
        checkpointer.close()
    assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [6, 8]

    # A new checkpointer on the same directory (a resumed run) finds the newest one.
    reopened = Checkpointer(directory, keep=2)
    try:
        assert reopened.latest_round() == 8
        assert reopened.metadata(6) == {"round": 6}
    finally:
        reopened.close()


def test_config_differences_names_dotted_keys_and_ignores_resumable_fields():
    saved = {
        "client": {"lr": 0.1, "optimizer": "sgd"},
        "run": {"num_rounds": 10, "output_dir": "/a", "seed": 0, "log_every": 1},
        "model": {"layers": {"n": 2}},
        "gone": 1,
    }
    current = {
        "client": {"lr": 0.2, "optimizer": "sgd"},
        "run": {"num_rounds": 20, "output_dir": "/b", "seed": 1, "log_every": 5},
        "model": {"layers": {"n": 3}},
        "new": "x",
    }
    assert config_differences(saved, current) == [
        "client.lr: 0.1 -> 0.2",
        "gone: 1 -> None",
        "model.layers.n: 2 -> 3",
        "new: None -> 'x'",
        "run.seed: 0 -> 1",
    ]
    assert config_differences(saved, saved) == []


def test_every_resumable_field_is_ignored():
    saved, current = {}, {}
    for dotted in RESUMABLE_FIELDS:
        section, name = dotted.split(".")
        saved.setdefault(section, {})[name] = 1
        current.setdefault(section, {})[name] = 2
    assert config_differences(saved, current) == []


def test_every_resumable_field_names_a_real_config_field(make_config):
    """A typo in `RESUMABLE_FIELDS` would silently refuse a legal resumption."""
    as_dict = config_to_dict(make_config())
    for dotted in RESUMABLE_FIELDS:
        section, name = dotted.split(".")
        assert name in as_dict[section], dotted


def test_resumable_fields_change_nothing_else_in_a_real_config(make_config):
    config = make_config()
    resumed = dataclasses.replace(
        config,
        run=dataclasses.replace(
            config.run, num_rounds=50, resume=True, log_every=7, keep_checkpoints=9
        ),
    )
    changed_lr = dataclasses.replace(config, client=dataclasses.replace(config.client, lr=0.5))
    assert config_differences(config_to_dict(config), config_to_dict(resumed)) == []
    assert config_differences(config_to_dict(config), config_to_dict(changed_lr)) == [
        f"client.lr: {config.client.lr!r} -> 0.5"
    ]


@pytest.mark.parametrize(
    "field, value",
    [("partition_report", False), ("save_checkpoints", False), ("stop_after", 2)],
)
def test_output_only_run_settings_may_change_on_resume(make_config, field, value):
    config = make_config()
    resumed = dataclasses.replace(config, run=dataclasses.replace(config.run, **{field: value}))
    assert config_differences(config_to_dict(config), config_to_dict(resumed)) == []


@pytest.mark.parametrize(
    "field, value", [("clients_per_chunk", 2), ("devices", 2), ("engine", "sequential")]
)
def test_the_round_layout_may_not_change_on_resume(make_config, field, value):
    """Chunking, devices and engine change the float rounding of the round's sums: a run
    resumed with another layout would not equal the uninterrupted one."""
    config = make_config()
    resumed = dataclasses.replace(config, run=dataclasses.replace(config.run, **{field: value}))
    assert config_differences(config_to_dict(config), config_to_dict(resumed)) == [
        f"run.{field}: {getattr(config.run, field)!r} -> {value!r}"
    ]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_num_rounds_may_change_on_resume_only_under_a_constant_schedule(make_config, schedule):
    from fedjax_llm.simulation import resume_differences

    config = make_config(client={"schedule": schedule})
    longer = dataclasses.replace(config, run=dataclasses.replace(config.run, num_rounds=30))
    diffs = resume_differences(config_to_dict(config), longer)
    if schedule == "constant":
        assert diffs == []
    else:
        assert diffs == [
            f"run.num_rounds: {config.run.num_rounds} -> 30 (the client learning-rate schedule "
            "spans run.num_rounds)"
        ]


def test_a_round_is_never_saved_twice(tmp_path):
    from fedjax_llm.errors import CheckpointWriteError

    checkpointer = Checkpointer(str(tmp_path))
    try:
        checkpointer.save(2, make_state(), METADATA)
        with pytest.raises(CheckpointWriteError, match="round 2 already exists"):
            checkpointer.save(2, make_state(), METADATA)
        assert checkpointer.restore_raw(2)[1] == METADATA
    finally:
        checkpointer.close()


def test_a_checkpoint_saved_before_a_key_existed_resumes_with_its_default(make_config):
    """Sections and keys added to the project later (dpo, public, an algorithm's new setting)
    are absent from an older checkpoint's config; their defaults are what that run did."""
    from fedjax_llm.simulation import resume_differences

    config = make_config(algorithm={"type": "diloco"})
    old = config_to_dict(config)
    del old["dpo"], old["public"], old["algorithm"]["keep_inner_state"], old["client"]["objective"]
    assert resume_differences(old, config) == []
    changed = dataclasses.replace(config, dpo=dataclasses.replace(config.dpo, beta=0.5))
    assert resume_differences(old, changed) == ["dpo.beta: 0.1 -> 0.5"]
