"""Host-resident client populations (`fedjax_llm.client_store`): the same results as a
device-resident population, a million clients with per-client SCAFFOLD state, checkpoints of
the host store, and the placement choice and its errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rerun_under_default_compiler

from fedjax_llm import Simulation
from fedjax_llm.client_store import (
    BatchPrefetcher,
    HostStateStore,
    choose_placement,
    cohort_batch_indices,
)
from fedjax_llm.config import ConfigError
from fedjax_llm.data import ClientArrays
from fedjax_llm.round import LocalSchedule, client_batch_indices, client_keys

SCAFFOLD_LORA = dict(
    algorithm={"type": "scaffold"},
    trainable={"mode": "lora"},
    client={"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 4},
)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_host_population_equals_device_population(make_config, request):
    """SCAFFOLD (per-client state) with lost uploads and padded chunks: params, client store
    and losses are bit-identical whether the population lives on the host or the device."""
    if rerun_under_default_compiler(request):  # two programs, compared bit for bit
        return
    results = {}
    for placement in ("device", "host"):
        config = make_config(
            **SCAFFOLD_LORA,
            run={"client_data": placement, "num_rounds": 3, "num_clients_per_round": 3},
            sampling={"dropout": 0.3},
        )
        sim = Simulation(config, verbose=False)
        history = sim.run()
        assert sim.placement == placement
        losses = [h["train_loss"] for h in history if "train_loss" in h]
        results[placement] = (_leaves(sim.params), _leaves(sim.client_store), losses)
    device, host = results["device"], results["host"]
    assert host[2] == device[2]
    for a, b in zip(device[0] + device[1], host[0] + host[1], strict=True):
        np.testing.assert_array_equal(a, b)
    # The store did change (SCAFFOLD's controls of the clients that delivered).
    assert any(np.any(x != 0) for x in host[1])


def test_resumed_host_run_equals_uninterrupted_run(make_config, tmp_path):
    """The host store is part of the checkpoint: stop after 2 rounds, resume, and the result
    equals a run of 4 rounds in one go."""
    run = {"client_data": "host", "num_rounds": 4, "checkpoint_every": 1}
    whole = Simulation(make_config(**SCAFFOLD_LORA, run=run), verbose=False)
    whole.run()
    split = make_config(**SCAFFOLD_LORA, run={**run, "stop_after": 2})
    Simulation(split, verbose=False).run()
    resumed_config = dataclasses.replace(
        split, run=dataclasses.replace(split.run, resume=True, stop_after=None)
    )
    resumed = Simulation(resumed_config, verbose=False)
    resumed.run()
    for a, b in zip(
        _leaves(whole.params) + _leaves(whole.client_store),
        _leaves(resumed.params) + _leaves(resumed.client_store),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_million_client_population_with_scaffold_state(make_config, tmp_path):
    """1,000,000 clients of one short example each, SCAFFOLD with a per-client control for
    every client in a memory-mapped store; 16 clients per round. Only the clients that
    trained hold a nonzero control afterwards."""
    n, seq = 1_000_000, 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 200, (n, seq), dtype=np.int32)
    data = ClientArrays(
        examples={"tokens": tokens, "loss_mask": np.ones((n, seq), np.float32)},
        client_start=np.arange(n, dtype=np.int64),
        client_count=np.ones(n, np.int64),
    )
    store_dir = str(tmp_path / "store")
    config = make_config(
        algorithm={"type": "scaffold"},
        trainable={"mode": "soft_prompt", "num_virtual_tokens": 1},
        client={"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 2},
        run={
            "client_data": "host",
            "client_store_dir": store_dir,
            "num_rounds": 2,
            "num_clients_per_round": 16,
            "clients_per_chunk": 8,
            "save_checkpoints": False,
            "partition_report": False,
        },
        data={"num_clients": n},
        eval={"every": 0},
    )
    sim = Simulation(config, data=data, verbose=False)
    history = sim.run()
    assert sim.placement == "host"
    assert all(np.isfinite(h["train_loss"]) for h in history if "train_loss" in h)
    trained = np.unique(np.concatenate([sim.cohort(r).client_ids[:16] for r in range(2)]))
    (control,) = [x for x in sim.host_store.leaves if x.ndim > 1 and x.shape[0] == n][:1]
    assert isinstance(control, np.memmap) and control.shape[0] == n
    nonzero = np.flatnonzero(np.any(control.reshape(n, -1) != 0, axis=1))
    np.testing.assert_array_equal(nonzero, trained)
    with open(os.path.join(config.run.output_dir, "summary.json")) as f:
        assert json.load(f)["client_data"] == "host"


def test_auto_placement_follows_device_memory(make_config, monkeypatch):
    assert choose_placement("auto", 10, 100) == "device"
    assert choose_placement("auto", 60, 100) == "host"
    assert choose_placement("device", 10**12, 100) == "device"
    import fedjax_llm.simulation as simulation

    monkeypatch.setattr(simulation, "device_memory_bytes", lambda: 1000)
    sim = Simulation(make_config(**SCAFFOLD_LORA), verbose=False)
    assert sim.placement == "host" and sim.client_data is None


def test_store_dir_that_cannot_be_written_fails_before_training(make_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    config = make_config(
        **SCAFFOLD_LORA, run={"client_data": "host", "client_store_dir": str(blocker / "store")}
    )
    with pytest.raises(ConfigError, match="client_store_dir.*not writable"):
        Simulation(config, verbose=False)
    with pytest.raises(ConfigError, match="needs run.client_data=host"):
        make_config(run={"client_data": "device", "client_store_dir": str(tmp_path)}).validate()
    with pytest.raises(ConfigError, match="needs run.engine=compiled"):
        make_config(run={"client_data": "host", "engine": "sequential"}).validate()


def test_host_batch_draws_are_the_device_draws():
    schedule = LocalSchedule(local_steps=3, batch_size=4)
    round_key = jax.random.key(5)
    ids = np.array([7, 0, 123456, 3], np.int32)
    starts = np.array([10, 0, 500, 40], np.int32)
    counts = np.array([5, 1, 30, 12], np.int32)
    got = np.asarray(cohort_batch_indices(round_key, ids, starts, counts, schedule))
    for j in range(len(ids)):
        data_key, _, _ = client_keys(round_key, ids[j])
        want, _, _ = client_batch_indices(data_key, starts[j], counts[j], schedule)
        np.testing.assert_array_equal(got[j], np.asarray(want))
        assert set(got[j].ravel()) <= set(range(starts[j], starts[j] + counts[j]))


def test_host_store_gather_scatter_and_memmap(tmp_path):
    one = {"c": jnp.zeros((2, 3)), "n": jnp.ones(())}
    store = HostStateStore(one, 10, str(tmp_path))
    assert isinstance(store.leaves[0], np.memmap) and store.leaves[1][4] == 1
    rows = store.gather(np.array([3, 5, 0]))
    rows = {"c": rows["c"] + 2.0, "n": rows["n"] * 7}
    store.scatter(np.array([3, 5, 0]), np.array([True, False, True]), rows)
    tree = store.tree()
    assert tree["c"][3].sum() == 12 and tree["c"][5].sum() == 0 and tree["n"][0] == 7
    assert tree["n"][5] == 1


def _vm_flags(path: str) -> list[str]:
    """The kernel's VmFlags of this process's mapping of ``path`` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(path):
            for entry in lines[i + 1 :]:
                if entry.startswith("VmFlags:"):
                    return entry.split()[1:]
    raise AssertionError(f"{path} is not mapped")


def test_memory_mapped_store_is_advised_for_random_rows(tmp_path):
    # Read-ahead on each page fault made a round of 100 rows of a million-row store take 0.5 s.
    store = HostStateStore({"c": jnp.zeros((1024,))}, 1000, str(tmp_path))
    flags = _vm_flags(os.path.realpath(store.leaves[0].filename))
    assert "rr" in flags, flags  # MADV_RANDOM
    plain = np.lib.format.open_memmap(str(tmp_path / "plain.npy"), "w+", np.float32, (1000, 1024))
    assert "rr" not in _vm_flags(os.path.realpath(plain.filename))


def test_prefetcher_returns_loads_and_reraises_their_errors():
    def load(r):
        if r == 3:
            raise RuntimeError("disk gone")
        return r * 10

    prefetcher = BatchPrefetcher(load)
    prefetcher.prefetch(1)
    assert prefetcher.get(1) == 10 and prefetcher.get(2) == 20
    prefetcher.prefetch(3)
    with pytest.raises(RuntimeError, match="disk gone"):
        prefetcher.get(3)
    prefetcher.close()
