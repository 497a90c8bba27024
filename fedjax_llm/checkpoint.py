"""Checkpoints of the whole global state with an orbax `CheckpointManager`.

A checkpoint holds every array the next round depends on (trainable params, server optimizer
state, per-client state store, the PRNG key data) plus JSON metadata: the round, the metric
history and the config it was made with. The client sampler is a pure function of
``(seed, round)``, so the round number is its whole state. Restoring and running M more
rounds therefore reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kernels.pytree import PyTree

# Settings that may change between a run and its resumption: they decide what is written and how
# the round is laid out (chunks, devices, engine: equal results up to float rounding), not the
# state.
RESUMABLE_FIELDS = (
    "run.partition_report",
    "run.save_checkpoints",
    "run.devices",
    "run.engine",
    "run.num_rounds",
    "run.resume",
    "run.output_dir",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.log_every",
    "run.clients_per_chunk",
    "run.stop_after",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint was made with a config that the current run cannot continue."""


def _flatten(tree: PyTree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


class Checkpointer:
    """Saves and restores the global state of a run.

    Args:
      directory: where checkpoints live (``<run_dir>/checkpoints``).
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_round(self) -> int | None:
        """Returns the round of the newest checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def path(self, round_num: int) -> str:
        """Returns the directory of the checkpoint taken after ``round_num`` rounds."""
        return os.path.join(self.directory, str(round_num))

    def save(self, round_num: int, state: PyTree, metadata: dict) -> None:
        """Saves the state after ``round_num`` rounds and waits until it is on disk.

        Args:
          round_num: number of completed rounds.
          state: pytree of arrays (PRNG keys as key data).
          metadata: JSON-serializable data (history, config).
        """
        arrays = {k: np.asarray(v) if np.isscalar(v) else v for k, v in _flatten(state).items()}
        self._manager.save(
            round_num,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(metadata)
            ),
        )
        # Synchronous: a crash right after this call must not lose the checkpoint.
        self._manager.wait_until_finished()

    def metadata(self, round_num: int) -> dict:
        """Returns the JSON metadata (round, history, config) of a checkpoint, no arrays."""
        return self._manager.restore(
            round_num, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def restore(self, round_num: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restores the state saved after ``round_num`` rounds into the structure of ``like``.

        Args:
          round_num: which checkpoint.
          like: a pytree with the structure, shapes and dtypes of the saved state.

        Returns:
          The restored state and its metadata.

        Raises:
          CheckpointMismatchError: if the saved arrays do not match ``like`` (a different
            model, trainable mode or algorithm); the message names the differing entries.
        """
        saved_meta = self.metadata(round_num)
        flat_like = _flatten(like)
        restored = self._manager.restore(
            round_num,
            args=ocp.args.Composite(state=ocp.args.StandardRestore()),
        ).state
        missing = sorted(set(flat_like) - set(restored))
        extra = sorted(set(restored) - set(flat_like))
        wrong = sorted(
            k
            for k in set(flat_like) & set(restored)
            if tuple(np.shape(restored[k])) != tuple(np.shape(flat_like[k]))
        )
        if missing or extra or wrong:
            raise CheckpointMismatchError(
                f"checkpoint {self.path(round_num)} does not match this run's state: "
                f"missing {missing[:5]}, unexpected {extra[:5]}, different shapes {wrong[:5]}."
            )
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        values = [
            np.asarray(restored[jax.tree_util.keystr(path)]).astype(np.asarray(leaf).dtype)
            for path, leaf in leaves
        ]
        return jax.tree_util.tree_unflatten(treedef, values), saved_meta

    def restore_raw(self, round_num: int) -> tuple[dict[str, np.ndarray], dict]:
        """Restores a checkpoint as a flat ``{key path: array}`` dict, without a template."""
        out = self._manager.restore(
            round_num,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        return dict(out.state), out.meta

    def close(self) -> None:
        """Releases the manager's background resources."""
        self._manager.close()


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Lists dotted keys whose values differ, ignoring `RESUMABLE_FIELDS`.

    Args:
      saved: the config stored in a checkpoint (as a dict).
      current: the current config (as a dict).
      prefix: used in recursion.

    Returns:
      ``["client.lr: 0.1 -> 0.2", ...]``.
    """
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, dotted + "."))
        elif dotted not in RESUMABLE_FIELDS and a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs
