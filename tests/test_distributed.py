"""One simulation over several processes (`jax.distributed` on localhost, CPU devices joined by
gloo) equals the same config in one process with as many devices, and a launch that does not
match its config stops with one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from fedjax_llm import distributed
from fedjax_llm.checkpoint import Checkpointer
from fedjax_llm.config import ConfigError, DistributedConfig, dump_config
from fedjax_llm.simulation import Simulation

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
LAUNCH = os.path.join(ROOT, "scripts", "launch_local.py")
SIMULATE = os.path.join(ROOT, "scripts", "simulate.py")
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TOLERANCE = 1e-6  # float sums in another order (psum across processes), nothing more


def _launch_local():
    spec = importlib.util.spec_from_file_location("launch_local_script", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(output_dir: str, **run):
    # No evaluation and no partition plot: the run is the round loop and its checkpoint. SGD:
    # AdamW's normalization would amplify the rounding of near-zero gradients.
    return tiny_config(
        output_dir,
        client={"optimizer": "sgd", "lr": 0.5},
        run={"partition_report": False, **run},
        eval={"every": 0},
    )


def _processes(*args: str) -> list[subprocess.Popen]:
    """`scripts/simulate.py` started as each process of a localhost launch, by hand."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    }
    address = f"localhost:{_launch_local().free_port()}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                SIMULATE,
                *args,
                "--distributed.coordinator_address",
                address,
                "--distributed.num_processes",
                str(PROCESSES),
                "--distributed.process_id",
                str(i),
                "--distributed.timeout_s",
                "60",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]


def _launch(config_path: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            LAUNCH,
            "--processes",
            str(PROCESSES),
            "--cpu-devices",
            str(DEVICES_PER_PROCESS),
            "--",
            "--config",
            config_path,
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _flat(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    run_dir = str(tmp_path / "two_processes")
    config_path = str(tmp_path / "config.yaml")
    with open(config_path, "w") as f:
        f.write(dump_config(_config(run_dir)))
    launch = _launch(config_path)
    try:
        # Meanwhile, the same config in this process on as many devices (a 4-device mesh).
        devices = PROCESSES * DEVICES_PER_PROCESS
        reference_config = _config(
            str(tmp_path / "one_process"), devices=devices, save_checkpoints=False
        )
        reference = Simulation(reference_config, verbose=False)
        initial = _flat(reference.params)
        history = reference.run()
        out, err = launch.communicate(timeout=300)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, err[-3000:]
    # Process 0 alone printed the run (to stderr): its header and each round once.
    assert err.count("compiled the round in") == 1, err[-3000:]
    assert err.count("round 3/3") == 1, err[-3000:]

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    losses = np.asarray([r["train_loss"] for r in records[1:]])
    expected_losses = np.asarray([h["train_loss"] for h in history[1:]])
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=TOLERANCE)

    # The checkpoint process 0 saved: the whole state (params, server and client store).
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    try:
        assert checkpointer.rounds() == [3]
        saved, _ = checkpointer.restore_raw(3)
    finally:
        checkpointer.close()
    expected = _flat(jax.device_get(reference._state()))
    assert sorted(saved) == sorted(expected)
    differences = {k: float(np.max(np.abs(saved[k] - expected[k]), initial=0)) for k in saved}
    assert max(differences.values()) <= TOLERANCE, differences
    # Training moved the params, so equal params mean equal training.
    prefix = "['server_state'].params"
    assert all(not np.allclose(saved[prefix + k], v) for k, v in initial.items())


def test_keys_of_a_launch_this_process_is_not_part_of_fail_before_work(tmp_path):
    launch = {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0}
    config = tiny_config(str(tmp_path / "run"), distributed=launch)
    with pytest.raises(ConfigError, match="has not joined a multi-process run") as err:
        Simulation(config, verbose=False)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"process_id=2 is out of range .* ids run from 0 to 1"):
        dataclasses.replace(
            config, distributed=DistributedConfig(**{**launch, "process_id": 2})
        ).validate()
    with pytest.raises(ConfigError, match="set distributed.coordinator_address too"):
        dataclasses.replace(config, distributed=DistributedConfig(num_processes=2)).validate()
    with pytest.raises(ConfigError, match="must be host:port"):
        dataclasses.replace(
            config, distributed=DistributedConfig(coordinator_address="localhost")
        ).validate()
    # One process: nothing to join, nothing changes.
    assert distributed.initialize(tiny_config(str(tmp_path / "one"))) is False


def test_a_process_id_out_of_range_is_one_line_from_the_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            SIMULATE,
            "--run.output_dir",
            str(tmp_path / "run"),
            "--distributed.coordinator_address",
            "localhost:1234",
            "--distributed.num_processes",
            "2",
            "--distributed.process_id",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: distributed.process_id=2 is out of range"), (
        result.stderr
    )
    assert result.stderr.count("\n") == 1, result.stderr


def test_processes_that_do_not_cover_every_device_stop_with_one_line(tmp_path):
    config_path = str(tmp_path / "config.yaml")
    with open(config_path, "w") as f:
        f.write(dump_config(_config(str(tmp_path / "run"))))
    # run.devices 1 (the default) in a 2-process launch: the clients would not span the launch.
    processes = _processes("--config", config_path, "--run.devices", "1")
    try:
        results = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(processes, results, strict=True):
        assert p.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [
            "error: run.devices=1 but this run spans 2 processes with 4 devices in all, and its "
            "clients are sharded over all of them; set run.devices 0 (or 4)."
        ], err[-3000:]
        assert "Traceback" not in err and not out
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
