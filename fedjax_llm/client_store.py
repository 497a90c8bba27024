"""Client populations that live on the host: examples and per-client states in host memory.

A device-resident population (`fedjax_llm.round.ClientData` plus the `ClientStates` store in
the `RoundState`) is the fastest layout while it fits the device. A population of a million
clients, or a per-client state (SCAFFOLD's control variates, error feedback) times that many
clients, does not; then the examples and the state store stay on the host (numpy arrays, the
store optionally memory-mapped files on disk) and each round moves only what its cohort needs:

- `HostClientData` draws the batches the cohort's clients will use this round (the very
  indices the device would draw, `fedjax_llm.round.client_batch_indices`, computed on the
  host's CPU), gathers those rows and sends them as `fedjax_llm.round.ClientBatches`.
- `HostStateStore` gathers the cohort's rows of the store and writes their new values back.
- `BatchPrefetcher` draws and gathers the next round's batches in a background thread while
  the device runs the current round.

Results equal those of the device-resident layout (same keys, same examples, same order).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import mmap
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.round import ClientBatches, LocalSchedule, client_batch_indices, client_keys
from kernels.pytree import PyTree

PLACEMENTS = ("auto", "device", "host")
"""Values of ``run.client_data``: where the population's examples and client states live."""
DEVICE_SHARE = 0.5
"""``auto`` keeps the population on the device while it takes at most this share of its memory."""


def choose_placement(requested: str, population_bytes: int, device_bytes: int) -> str:
    """Resolves ``run.client_data``: ``auto`` is ``device`` while the population's examples and
    client states fit `DEVICE_SHARE` of the device's memory, else ``host``."""
    if requested != "auto":
        return requested
    return "device" if population_bytes <= DEVICE_SHARE * device_bytes else "host"


@functools.cache
def _host_cpu() -> jax.Device:
    return jax.devices("cpu")[0]


@functools.partial(jax.jit, static_argnames="schedule")
def cohort_batch_indices(
    round_key: jax.Array,
    client_ids: jax.Array,
    starts: jax.Array,
    counts: jax.Array,
    schedule: LocalSchedule,
) -> jax.Array:
    """``[C, K, B]`` dataset rows of each slot's batches: what the round's clients would draw
    on the device from their keys (`fedjax_llm.round.client_keys`)."""

    def one(client_id, start, count):
        data_key, _, _ = client_keys(round_key, client_id)
        return client_batch_indices(data_key, start, count, schedule)[0]

    return jax.vmap(one)(client_ids, starts, counts)


class HostClientData:
    """Every client's examples on the host (numpy arrays or memory maps).

    Args:
      examples: ``{field: [N, ...]}``, each client's examples contiguous.
      client_start: ``[M]`` each client's first row.
      client_count: ``[M]`` each client's number of examples (>= 1).
      client_profile: ``{name: [M]}`` per-client system attributes
        (`fedjax_llm.client_profiles`); each round's slots get their clients' rows.
    """

    def __init__(
        self,
        examples: dict,
        client_start: np.ndarray,
        client_count: np.ndarray,
        client_profile: dict | None = None,
    ):
        self.examples = examples
        self.client_profile = {
            name: np.asarray(x, np.float32) for name, x in (client_profile or {}).items()
        }
        for values in examples.values():
            advise_random_access(values)
        self.client_start = np.asarray(client_start, np.int64)
        self.client_count = np.asarray(client_count, np.int32)

    @property
    def nbytes(self) -> int:
        """Bytes of the examples."""
        return sum(int(x.nbytes) for x in self.examples.values())

    def cohort_batches(
        self, cohort_ids: np.ndarray, round_key: jax.Array, schedule: LocalSchedule
    ) -> ClientBatches:
        """The cohort's batches of a round as host arrays ``[C, K, B, ...]``.

        Args:
          cohort_ids: ``[C]`` the slots' client ids (padding slots included: they draw from
            their placeholder client like on the device, and are masked in the round).
          round_key: the round's key.
          schedule: the round's local-training shape.
        """
        ids = np.asarray(cohort_ids, np.int64)
        starts, counts = self.client_start[ids], self.client_count[ids]
        # Rows within int32 per client; the offset is added on the host in int64, so a
        # population of more than 2**31 examples works.
        with jax.default_device(_host_cpu()):
            local = cohort_batch_indices(
                jax.device_put(round_key, _host_cpu()),
                np.asarray(ids, np.int32),
                np.zeros(len(ids), np.int32),
                counts,
                schedule,
            )
        rows = np.asarray(local, np.int64) + starts[:, None, None]
        return ClientBatches(
            examples={name: np.asarray(x[rows]) for name, x in self.examples.items()},
            client_count=counts,
            client_profile={name: x[ids] for name, x in self.client_profile.items()},
        )


class HostStateStore:
    """The per-client state store on the host, one array ``[N, ...]`` per leaf.

    Args:
      one_row: one client's initial state (a pytree of arrays, no client axis).
      num_clients: ``N``.
      directory: if set, every leaf is a memory-mapped file in this directory (for stores
        larger than RAM; untouched rows of a zero initial state take no disk space).
    """

    def __init__(self, one_row: PyTree, num_clients: int, directory: str | None = None):
        leaves, self.treedef = jax.tree.flatten(one_row)
        self.num_clients = num_clients
        self.directory = directory
        self.leaves: list[np.ndarray] = []
        if directory is not None:
            check_store_directory(directory)
        for i, leaf in enumerate(leaves):
            leaf = np.asarray(leaf)
            shape = (num_clients,) + leaf.shape
            if directory is None:
                array = np.empty(shape, leaf.dtype)
                array[...] = leaf
            else:
                path = os.path.join(directory, f"leaf{i}.npy")
                array = np.lib.format.open_memmap(path, mode="w+", dtype=leaf.dtype, shape=shape)
                advise_random_access(array)
                if np.any(leaf):
                    array[...] = leaf
            self.leaves.append(array)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole store."""
        return sum(int(x.nbytes) for x in self.leaves)

    def tree(self) -> PyTree:
        """The store as a pytree of host arrays ``[N, ...]`` (for checkpoints)."""
        return jax.tree.unflatten(self.treedef, self.leaves)

    def load(self, tree: PyTree) -> None:
        """Replaces the store's contents (a restored checkpoint)."""
        for array, value in zip(self.leaves, jax.tree.leaves(tree), strict=True):
            array[...] = np.asarray(value)

    def gather(self, client_ids: np.ndarray) -> PyTree:
        """The rows of ``client_ids`` ``[C, ...]`` (host arrays)."""
        ids = np.asarray(client_ids, np.int64)
        return jax.tree.unflatten(self.treedef, [x[ids] for x in self.leaves])

    def scatter(self, client_ids: np.ndarray, written: np.ndarray, rows: PyTree) -> None:
        """Writes ``rows[j]`` to row ``client_ids[j]`` wherever ``written[j]``."""
        keep = np.flatnonzero(np.asarray(written))
        ids = np.asarray(client_ids, np.int64)[keep]
        for array, value in zip(self.leaves, jax.tree.leaves(rows), strict=True):
            array[ids] = np.asarray(value)[keep]

    def flush(self) -> None:
        """Writes memory-mapped leaves to disk."""
        for array in self.leaves:
            if isinstance(array, np.memmap):
                array.flush()


def advise_random_access(array: np.ndarray) -> None:
    """Tells the kernel that a memory-mapped array is read and written at random rows.

    Without it every page fault reads ahead a window of the file: a round touching 100 rows of
    a million-row store spent 0.5 s faulting in read-ahead pages (2 ms with the advice). A
    no-op for arrays that are not memory-mapped or where ``madvise`` is missing (not Linux).
    """
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


def check_store_directory(directory: str) -> None:
    """Raises `OSError` with a one-line message unless ``directory`` can hold the store."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write_probe")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as err:
        raise OSError(
            f"run.client_store_dir={directory!r} is not writable ({err.strerror or err}); "
            "give a writable directory or null to keep the store in RAM."
        ) from None


def store_row_bytes(one_row: PyTree) -> int:
    """Bytes of one client's state."""
    return sum(
        math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(one_row)
    )


class BatchPrefetcher:
    """Draws and gathers the next round's cohort batches while the device runs this round.

    Args:
      load: ``(round_num) -> ClientBatches`` on the device (host work plus the transfer).
    """

    def __init__(self, load: Callable[[int], ClientBatches]):
        self._load = load
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: dict[int, concurrent.futures.Future] = {}

    def prefetch(self, round_num: int) -> None:
        """Starts loading ``round_num``'s batches in the background."""
        if round_num not in self._pending:
            self._pending[round_num] = self._pool.submit(self._load, round_num)

    def get(self, round_num: int) -> ClientBatches:
        """``round_num``'s batches (prefetched, or loaded now); errors of the load re-raise."""
        future = self._pending.pop(round_num, None)
        for stale in list(self._pending):
            if stale < round_num:
                self._pending.pop(stale).cancel()
        return future.result() if future is not None else self._load(round_num)

    def close(self) -> None:
        """Stops the background thread (pending loads are dropped)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def to_device(batches: ClientBatches, sharding: jax.sharding.Sharding | None = None):
    """Sends host `ClientBatches` to the device (sharded over the client axis if given)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, batches)
    return jax.device_put(batches, sharding)
