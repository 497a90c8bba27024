"""One simulation on several processes (hosts) joined by `jax.distributed`.

Every process runs the same config and the same thin round loop; `jax.distributed` joins their
devices into one set (`jax.devices()`) and each round stays one compiled program whose
``clients`` mesh axis spans the devices of all processes. JAX and XLA move every byte; there is
no messaging of our own. What lives where:

- Replicated on every device of every process: the frozen base, the client data, the round
  state (global trainable params, server and pipeline state, the per-client store), and each
  round's cohort, key and hyperparameters. Every process builds them identically from the
  config (the same seeds), so nothing is sent at start.
- Sharded over the ``clients`` axis: the sampled clients' local training. Their streaming sums
  are added with one ``psum`` (gathering aggregators: one ``all_gather``) across processes,
  and the server update runs replicated, so the round's outputs are replicated too.
- Process 0 alone writes the run directory (metrics, summaries, plots, the config) and the
  checkpoints, from a host copy of the replicated state; the other processes print and write
  nothing. On resume process 0 reads the checkpoint and sends the state to the others, so the
  run directory need not be on a file system they share.
- Evaluation runs on one local device of each process, on its replica of the global model
  (every process evaluates, so every process stops alike on a non-finite loss).

Call `initialize` before any other JAX call of the process (``scripts/simulate.py`` does); a
single-process config (``distributed.coordinator_address`` null) changes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from fedjax_llm.config import ConfigError, DistributedConfig, ExperimentConfig
from fedjax_llm.errors import UserError, first_line
from fedjax_llm.metrics import MetricsWriter
from kernels.pytree import PyTree

AUTO = "auto"
"""``distributed.coordinator_address`` that lets JAX detect the cluster."""


class ProcessError(UserError, RuntimeError):
    """Process 0 stopped the run (a bad run directory, an unreadable checkpoint, ...); the other
    processes stop with its message."""


def _section(config: ExperimentConfig | DistributedConfig) -> DistributedConfig:
    return config.distributed if isinstance(config, ExperimentConfig) else config


def initialize(config: ExperimentConfig | DistributedConfig) -> bool:
    """Joins this process to a multi-process run, if the config asks for one.

    With ``distributed.coordinator_address`` null nothing happens (one process). Otherwise
    `jax.distributed.initialize` is called with the given keys (``auto``: no address, so that
    JAX detects SLURM, Open MPI, Cloud TPU pods, Kubernetes or the ``JAX_COORDINATOR_ADDRESS``
    environment variable; keys left null are detected the same way). CPU processes exchange
    data through gloo (``jax_cpu_collectives_implementation``). The call blocks until every
    process has connected or ``distributed.timeout_s`` has passed (JAX then ends the process).

    It must come before any other JAX call of the process (before any array is made and before
    `jax.devices`), since JAX fixes its devices at its first use.

    Args:
      config: the experiment config (or its ``distributed`` section).

    Returns:
      Whether this process is part of a multi-process run now.

    Raises:
      ConfigError: if JAX was used before this call, JAX finds no cluster for ``auto``, or the
        processes that joined do not match the keys (see `check_launch`).
    """
    d = _section(config)
    if d.coordinator_address is None:
        return False
    if jax.distributed.is_initialized():
        check_launch(d)
        return True
    _use_gloo_on_cpu()
    kwargs: dict[str, Any] = {
        "num_processes": d.num_processes,
        "process_id": d.process_id,
        "initialization_timeout": d.timeout_s,
    }
    if d.coordinator_address != AUTO:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.local_device_ids is not None:
        kwargs["local_device_ids"] = [int(i) for i in d.local_device_ids.split(",")]
    where = (
        "the cluster's coordinator"
        if d.coordinator_address == AUTO
        else f"the coordinator {d.coordinator_address}"
    )
    print(
        f"distributed: process {d.process_id if d.process_id is not None else '(detected)'} "
        f"joins {where}; waiting up to {d.timeout_s} s for all "
        f"{d.num_processes or '(detected)'} processes",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        if "before any JAX" not in str(err):
            raise
        raise ConfigError(
            "distributed: JAX was already in use in this process, so it cannot join a "
            "multi-process run; call fedjax_llm.distributed.initialize(config) before any other "
            "JAX call (scripts/simulate.py does)."
        ) from None
    except ValueError as err:
        raise ConfigError(
            f"distributed.coordinator_address={d.coordinator_address}: {first_line(str(err))} "
            "JAX found no cluster to detect it from (SLURM, Open MPI, Cloud TPU, Kubernetes, "
            "JAX_COORDINATOR_ADDRESS); give host:port, distributed.num_processes and "
            "distributed.process_id."
        ) from None
    check_launch(d)
    return True


def _use_gloo_on_cpu() -> None:
    # CPU processes exchange collectives through gloo (over TCP, set up by the coordinator)
    # unless MPI was chosen; without an implementation a CPU run cannot cross processes.
    try:
        if jax.config.jax_cpu_collectives_implementation != "mpi":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX without the option has a single CPU implementation
        pass


def check_launch(config: ExperimentConfig | DistributedConfig) -> None:
    """Checks that the running JAX processes are the launch the config describes.

    Raises:
      ConfigError: one line naming the mismatch: the keys describe several processes but
        `initialize` was not called (or JAX joined another number of processes), this process
        has another index than ``distributed.process_id``, or the processes have different
        numbers of devices.
    """
    d = _section(config)
    count, index = jax.process_count(), jax.process_index()
    if d.coordinator_address is not None and not jax.distributed.is_initialized():
        raise ConfigError(
            f"distributed.coordinator_address={d.coordinator_address} but this process has not "
            "joined a multi-process run: call fedjax_llm.distributed.initialize(config) before "
            "any other JAX call (scripts/simulate.py does), or set it to null for one process."
        )
    if d.num_processes is not None and count != d.num_processes:
        raise ConfigError(
            f"distributed.num_processes={d.num_processes} but {count} JAX process(es) joined this "
            f"run; start exactly {d.num_processes} processes (process_id 0 to "
            f"{d.num_processes - 1}) with the same distributed.coordinator_address."
        )
    if d.process_id is not None and index != d.process_id:
        raise ConfigError(
            f"distributed.process_id={d.process_id} but JAX numbers this process {index}; give "
            "each process its own id from 0 to distributed.num_processes - 1."
        )
    if jax.device_count() != jax.local_device_count() * count:
        raise ConfigError(
            f"the {count} processes have different numbers of devices ({jax.device_count()} in "
            f"all, {jax.local_device_count()} here); give every process the same number "
            "(distributed.local_device_ids, or XLA_FLAGS on the CPU)."
        )


def is_multiprocess() -> bool:
    """Whether this process is one of several in a `jax.distributed` run."""
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes the run directory."""
    return jax.process_index() == 0


def client_mesh(config: ExperimentConfig, axis: str) -> jax.sharding.Mesh:
    """The mesh of a multi-process run: one ``axis`` over the devices of all processes.

    Raises:
      ConfigError: if ``run.devices`` is not 0 or the number of all devices, or the run uses
        the sequential engine (one device by construction).
    """
    devices = jax.devices()
    if config.run.devices not in (0, len(devices)):
        raise ConfigError(
            f"run.devices={config.run.devices} but this run spans {jax.process_count()} "
            f"processes with {len(devices)} devices in all, and its clients are sharded over "
            f"all of them; set run.devices 0 (or {len(devices)})."
        )
    if config.run.engine == "sequential":
        raise ConfigError(
            "run.engine=sequential trains one client at a time on one device; a run over "
            "several processes needs run.engine=compiled."
        )
    return jax.sharding.Mesh(np.asarray(devices), (axis,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The sharding of a value held whole by every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicate(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Global arrays of ``tree``'s values, replicated over ``mesh``.

    Every process must pass the same values (nothing is checked or sent: each process fills its
    own devices). Leaves that already are replicated over ``mesh`` are returned as they are.
    """
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            raise ValueError(f"cannot replicate a global array of sharding {x.sharding}.")
        value = x if isinstance(x, jax.Array) else np.asarray(x)
        # Replicated: every device's index is the whole array.
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value)

    return jax.tree.map(one, tree)


def jit_shardings(mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """`jax.jit` arguments of the compiled round: over several processes every input and
    output replicated over ``mesh`` (outputs then read on any process); none for one process,
    which keeps JAX's default placement."""
    if mesh is None or not is_multiprocess():
        return {}
    return {"in_shardings": replicated(mesh), "out_shardings": replicated(mesh)}


def local_view(tree: PyTree) -> PyTree:
    """This process's replica of each replicated global array (other leaves as they are).

    The replica lives on one local device and shares the global array's buffer (no copy).
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def broadcast_arrays(tree: PyTree) -> PyTree:
    """Process 0's values of a pytree of arrays, on every process (as numpy arrays).

    Every process passes arrays of the same shapes and dtypes; only process 0's values count.
    """
    from jax.experimental import multihost_utils

    host = jax.tree.map(np.asarray, tree)
    out = multihost_utils.broadcast_one_to_all(host)
    return jax.tree.map(lambda o, x: np.asarray(o).astype(x.dtype), out, host)


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serializable ``value``, on every process (others pass anything)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else None
    size = int(broadcast_arrays(np.int32(0 if data is None else data.size)))
    buffer = data if data is not None else np.zeros(size, np.uint8)
    return json.loads(broadcast_arrays(buffer).tobytes().decode())


class NullMetricsWriter(MetricsWriter):
    """The `MetricsWriter` of a process other than process 0: it timestamps records and
    writes nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs
        self.path = os.devnull
        self._clock = time.time

    def write(self, record: dict) -> dict:
        record["time"] = round(self._clock(), 3)
        return record

    def close(self) -> None:
        pass


class CheckpointNames:
    """The checkpoint folder as a process other than process 0 sees it: it names checkpoints
    (for messages) and reads or writes nothing, since process 0 saves them."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def path(self, round_num: int) -> str:
        """The directory of the checkpoint taken after ``round_num`` rounds."""
        return os.path.join(self.directory, str(round_num))

    def close(self) -> None:
        """Nothing to release."""
