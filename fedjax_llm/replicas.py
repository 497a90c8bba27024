"""Several runs that differ only in seeds or round-varying values, as one compiled program.

Runs of a sweep that share the model shape, the data and the round's structure, and differ in
``run.seed`` (model init, client sampling, local-training keys) or in values that are array
arguments of the round (``client.lr``, ``server.lr``, an algorithm's hyperparameters), compute
the same program on different numbers. `ReplicaGroup` runs them as one: the round is
`jax.vmap`-ped over a leading replica axis of the states, cohorts, keys and hyperparameters
(the data, and the frozen base when the replicas share it, are not copied), compiled once, and
each replica's `Simulation` keeps everything else of its own: run directory, metrics,
evaluation, checkpoints, summary, plots.

Each replica's `Simulation.run` runs in its own thread; at every round the threads meet, the
last to arrive runs the replicated round and each takes its slice. A replica that stops early
(divergence, an error) leaves the group; the others go on, the departed slot running an empty
cohort (its chunks are skipped). Results equal separate runs up to float reduction order (the
vmapped matmuls are batched).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.config import ConfigError, ExperimentConfig, config_to_dict
from kernels.pytree import PyTree

REPLICA_KEYS = ("run.seed", "run.output_dir", "client.lr", "server.lr")
"""Config keys replicas may differ in (with `replica_differences`, algorithm values too)."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def replica_differences(configs: Sequence[ExperimentConfig]) -> list[str]:
    """The config keys in which ``configs`` differ that a replica group cannot vary (empty:
    they can run as one group)."""
    flat = [_flat(config_to_dict(c)) for c in configs]
    keys = sorted(set().union(*flat))
    bad = []
    for key in keys:
        values = {repr(f.get(key)) for f in flat}
        if len(values) > 1 and key not in REPLICA_KEYS and key != "algorithm.type":
            # Scalar algorithm values (prox mu, ...) are round hyperparameters of the same type.
            same_type = len({f.get("algorithm.type") for f in flat}) == 1
            if not (key.startswith("algorithm.") and same_type):
                bad.append(key)
        elif len(values) > 1 and key == "algorithm.type":
            bad.append(key)
    return bad


def _identical(trees: Sequence[PyTree]) -> bool:
    first = jax.tree.leaves(trees[0])
    for tree in trees[1:]:
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(first):
            return False
        for a, b in zip(first, leaves, strict=True):
            if a is b:
                continue
            if np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a), np.asarray(b)):
                return False
    return True


class ReplicaGroup:
    """Runs `Simulation`s that differ only in seeds or round-varying values as one program.

    Args:
      simulations: the replicas (built, not yet run), device-resident populations, compiled
        engine, one process.

    Raises:
      ConfigError: if the replicas differ in anything else (named), or use what a group does
        not support (host-resident data, privacy accounting, the sequential engine).
    """

    def __init__(self, simulations: Sequence[Any]):
        self.sims = list(simulations)
        if len(self.sims) < 2:
            raise ConfigError("a replica group needs at least two runs.")
        bad = replica_differences([s.config for s in self.sims])
        if bad:
            raise ConfigError(
                f"runs in one replica group may differ only in {', '.join(REPLICA_KEYS)} and "
                f"algorithm values; these differ: {bad}."
            )
        for sim in self.sims:
            if sim.host_store is not None or sim.config.run.engine != "compiled":
                raise ConfigError(
                    "a replica group runs the compiled engine on a device-resident population."
                )
            if sim.privacy_plan is not None or sim.canaries is not None:
                raise ConfigError("a replica group does not run private or audited runs.")
        if not _identical([s.client_data for s in self.sims]):
            raise ConfigError("the runs of a replica group must share their data (data.seed).")
        self.shared_frozen = _identical([s.frozen for s in self.sims])
        for index, sim in enumerate(self.sims):
            sim.replica_group, sim.replica_index = self, index
        self._cond = threading.Condition()
        self._active = set(range(len(self.sims)))
        self._arrived: dict[int, tuple] = {}
        self._results: dict[int, tuple] = {}
        self._round: int | None = None
        self._generation = 0
        self._compiled = None
        self._error: BaseException | None = None
        self._state: PyTree = None
        self.compile_time_s: float | None = None
        self.round_times: list[float] = []

    # ------------------------------------------------------------------ compiled program
    def _in_axes(self, num_inputs: int = 6) -> tuple:
        # A 7th input, the server's public examples, is shared like the data.
        return (None if self.shared_frozen else 0, 0, None, 0, 0, 0, None)[:num_inputs]

    def _stack(self, per_replica: Sequence[tuple]) -> tuple:
        out = []
        for position, axis in enumerate(self._in_axes(len(per_replica[0]))):
            values = [inputs[position] for inputs in per_replica]
            if axis is None:
                out.append(values[0])
            else:
                out.append(jax.tree.map(lambda *xs: jnp.stack(xs), *values))
        return tuple(out)

    def _compile(self, inputs: tuple) -> None:
        sim = self.sims[0]
        fn = jax.jit(
            jax.vmap(sim.round_body, in_axes=self._in_axes(len(inputs))), donate_argnums=(1,)
        )
        stacked = self._stack([inputs] * len(self.sims))
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), stacked)
        t0 = time.perf_counter()
        self._compiled = fn.lower(*shapes).compile()
        self.compile_time_s = time.perf_counter() - t0

    def compile(self, sim: Any, inputs: tuple) -> float:
        """Compiles the replicated round once (for whichever replica asks first)."""
        with self._cond:
            if self._compiled is None:
                self._compile(inputs)
            return self.compile_time_s

    # ------------------------------------------------------------------ rounds
    def run_round(self, sim: Any, round_num: int, cohort: Any, inputs: tuple) -> tuple:
        """Runs ``round_num`` for ``sim`` once every active replica has asked for it; returns
        ``(new state, round output)`` of that replica."""
        index = sim.replica_index
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._round is None:
                self._round = round_num
            if round_num != self._round:
                raise RuntimeError(
                    f"replica {index} asked for round {round_num + 1} while the group runs "
                    f"round {self._round + 1}; replicas must start at the same round."
                )
            self._arrived[index] = (cohort, inputs)
            generation = self._generation
            if set(self._arrived) >= self._active:
                self._run_all()
            else:
                while self._generation == generation and self._error is None:
                    self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._results.pop(index)

    def leave(self, sim: Any) -> None:
        """``sim`` stops taking part (its run ended or failed); the others go on."""
        with self._cond:
            self._active.discard(sim.replica_index)
            if self._active and self._arrived and set(self._arrived) >= self._active:
                self._run_all()

    def _run_all(self) -> None:
        """Runs the round for every replica (called with the lock held, by the last arrival)."""
        try:
            first = next(iter(self._arrived.values()))[1]
            per_replica = []
            for index, sim in enumerate(self.sims):
                if index in self._arrived:
                    per_replica.append(self._arrived[index][1])
                else:
                    # A departed replica: its last state and an empty cohort (chunks skipped).
                    frozen, _, data, cohort, key, hparams, *server_data = first
                    empty = jax.tree.map(jnp.asarray, cohort)
                    empty = empty._replace(
                        participating=jnp.zeros_like(empty.participating),
                        delivered=jnp.zeros_like(empty.delivered),
                    )
                    per_replica.append(
                        (sim.frozen, sim.state, data, empty, key, hparams, *server_data)
                    )
            if self._compiled is None:
                self._compile(first)
            stacked = self._stack(per_replica)
            t0 = time.perf_counter()
            state, out = self._compiled(*stacked)
            out = jax.device_get(out)
            self.round_times.append(time.perf_counter() - t0)
            for index in self._arrived:
                self._results[index] = (
                    jax.tree.map(lambda x, i=index: x[i], state),
                    jax.tree.map(lambda x, i=index: x[i], out),
                )
            for index, sim in enumerate(self.sims):
                if index not in self._arrived:
                    sim.state = jax.tree.map(lambda x, i=index: x[i], state)
        except BaseException as err:  # every waiting replica gets the error
            self._error = err
        finally:
            self._arrived.clear()
            self._round = None if self._error is None else self._round
            self._generation += 1
            self._cond.notify_all()

    def run(self) -> list[list[dict]]:
        """Runs every replica (one thread each) to its end; returns their histories in order
        (None for a replica that failed; its error is in ``errors`` at the same index)."""
        histories: list[Any] = [None] * len(self.sims)
        errors: list[BaseException | None] = [None] * len(self.sims)

        def one(index: int) -> None:
            sim = self.sims[index]
            try:
                histories[index] = sim.run()
            except BaseException as err:
                errors[index] = err
            finally:
                self.leave(sim)

        threads = [
            threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(self.sims))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.errors: list[BaseException | None] = errors
        return histories
