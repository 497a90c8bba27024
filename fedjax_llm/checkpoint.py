"""Checkpoints of the whole global state with an orbax `CheckpointManager`.

A checkpoint holds every array the next round depends on (trainable params, server optimizer
state, per-client state store, the PRNG key data) plus JSON metadata: the round, the metric
history and the config it was made with. The client sampler is a pure function of
``(seed, round)``, so the round number is its whole state. Restoring and running M more
rounds therefore reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_llm.errors import CheckpointReadError, CheckpointWriteError, UserError, first_line
from kernels.pytree import PyTree

# Settings that may change between a run and its resumption: they decide what is written, where
# (a host store's memory-mapped files are refilled from the checkpoint), which compiled programs
# are cached, and when the run stops, never a result. The round's layout (run.clients_per_chunk,
# run.devices, run.engine) is not among them: it changes the float rounding of the chunked sums,
# so a resumed run would no longer equal an uninterrupted one bit for bit. run.num_rounds may
# change only while no learning-rate schedule depends on it (checked by the simulation).
RESUMABLE_FIELDS = (
    "run.partition_report",
    "run.save_checkpoints",
    "run.num_rounds",
    "run.resume",
    "run.output_dir",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.log_every",
    "run.stop_after",
    "run.compilation_cache_dir",
    "run.client_store_dir",
)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint was made with a config that the current run cannot continue."""


T = TypeVar("T")

_TMP_SUFFIX = ".orbax-checkpoint-tmp"

MANIFEST = "files.crc32.json"
"""Inside each checkpoint: every file's size and CRC-32, checked before the storage layer reads
any of them (a damaged file is then reported without the storage layer's own noise)."""


def _flatten(tree: PyTree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _crc32(array: Any) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(array)).view(np.uint8).reshape(-1))


# Causes of a failed write or read that a person can act on, as storage layers word them.
_KNOWN_CAUSES = (
    "No space left on device",
    "Read-only file system",
    "Permission denied",
    "Disk quota exceeded",
    "No such file or directory",
)


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: str) -> dict[str, str]:
    """Relative path -> path of every file under ``directory`` except the manifest."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                out[rel] = path
    return out


def _cause(err: BaseException) -> str:
    text = str(err)
    for cause in _KNOWN_CAUSES:
        if cause in text:
            return cause.lower()
    return f"{type(err).__name__}: {first_line(text, 200)}"


@contextlib.contextmanager
def _quiet_storage_threads() -> Iterator[None]:
    # Orbax's writer threads log a failed write (with its traceback) before the error reaches
    # the caller; the caller reports it once, as a named error.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpointer:
    """Saves and restores the global state of a run.

    Saves are synchronous and atomic: a checkpoint is written to a temporary folder and renamed
    when complete, so a crash, a full disk or a kill at any moment leaves every earlier
    checkpoint intact. Each array's CRC-32 is stored with it and checked on restore, so a
    corrupted file is reported (and an older checkpoint used) instead of resuming from wrong
    values.

    Args:
      directory: where checkpoints live (``<run_dir>/checkpoints``).
      keep: how many of the most recent checkpoints to keep.
      read_only: open an existing folder for reading only (nothing is created or cleaned).

    Raises:
      CheckpointReadError: with ``read_only``, if ``directory`` is not an existing folder.
      CheckpointWriteError: without it, if the folder cannot be created.
    """

    def __init__(self, directory: str, keep: int = 2, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._verified: set[int] = set()
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointReadError(f"{self.directory} is not a folder of checkpoints.")
        # In a run over several processes each Checkpointer serves its own process alone (the
        # simulation saves from process 0 only): orbax then never waits for the others.
        alone = {}
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            me = jax.process_index()
            alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            )
        try:
            if alone and not read_only:
                os.makedirs(self.directory, exist_ok=True)
            with _quiet_storage_threads():
                self._manager = ocp.CheckpointManager(
                    self.directory,
                    options=ocp.CheckpointManagerOptions(
                        max_to_keep=keep,
                        # orbax creates the folder only with every process taking part.
                        create=not read_only and not alone,
                        read_only=read_only,
                        # Leftovers of a save that was killed or failed are never committed.
                        cleanup_tmp_directories=not read_only,
                        enable_async_checkpointing=False,
                        **alone,
                    ),
                )
        except OSError as err:
            raise CheckpointWriteError(
                f"cannot create the checkpoint folder {self.directory}: {_cause(err)}. Choose a "
                "writable --run.output_dir."
            ) from None

    def rounds(self) -> list[int]:
        """Rounds of the committed checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_round(self) -> int | None:
        """Returns the round of the newest checkpoint, or None if there is none."""
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def path(self, round_num: int) -> str:
        """Returns the directory of the checkpoint taken after ``round_num`` rounds."""
        return os.path.join(self.directory, str(round_num))

    def save(self, round_num: int, state: PyTree, metadata: dict) -> None:
        """Saves the state after ``round_num`` rounds and returns once it is committed on disk.

        Args:
          round_num: number of completed rounds.
          state: pytree of arrays (PRNG keys as key data).
          metadata: JSON-serializable data (history, config).

        Raises:
          CheckpointWriteError: if the checkpoint cannot be written (permissions, disk full,
            storage errors); the previous committed checkpoints are untouched.
        """
        arrays = {k: np.asarray(v) if np.isscalar(v) else v for k, v in _flatten(state).items()}
        checksums = {k: _crc32(v) for k, v in arrays.items()}
        rounds = self.rounds()
        if round_num in rounds:
            raise CheckpointWriteError(
                f"a checkpoint of round {round_num} already exists in {self.directory}."
            )
        kept = (
            f"The previous checkpoint (round {rounds[-1]}) is intact"
            if rounds
            else "There is no earlier checkpoint"
        )
        if rounds:
            # The newest checkpoint's size on disk predicts this one's: a disk too full for it
            # fails here, cleanly, before anything is written.
            need = sum(os.path.getsize(p) for p in _files(self.path(rounds[-1])).values())
            free = shutil.disk_usage(self.directory).free
            if free < need:
                raise CheckpointWriteError(
                    f"could not save the checkpoint of round {round_num} in {self.directory}: no "
                    f"space left on device (it needs about {need / 2**20:,.2f} MiB, "
                    f"{free / 2**20:,.2f} MiB are free). {kept}. Free disk space, then continue "
                    "with --run.resume true."
                )
        try:
            with _quiet_storage_threads():
                saved = self._manager.save(
                    round_num,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(arrays),
                        meta=ocp.args.JsonSave({**metadata, "array_crc32": checksums}),
                    ),
                )
                # Synchronous: a crash right after this call must not lose the checkpoint.
                self._manager.wait_until_finished()
            if not saved:
                raise RuntimeError("the checkpoint manager declined to save this round")
            self._write_manifest(round_num)
        except Exception as err:  # noqa: BLE001 - storage layers raise many types
            # The storage layer's writer threads go on logging the failure after it reached
            # us; it is reported once, as the error raised here.
            logging.getLogger("absl").setLevel(logging.CRITICAL)
            self._remove_partial(round_num)
            raise CheckpointWriteError(
                f"could not save the checkpoint of round {round_num} in {self.directory}: "
                f"{_cause(err)}. {kept}. Free disk space or make the folder writable, then "
                "continue with --run.resume true."
            ) from err

    def _remove_partial(self, round_num: int) -> None:
        """Removes what a failed save of ``round_num`` left (never a committed checkpoint)."""
        with contextlib.suppress(Exception), _quiet_storage_threads():
            self._manager.wait_until_finished()  # writer threads may still be finishing
        for _ in range(50):
            names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
            partial = [n for n in names if n.startswith(f"{round_num}{_TMP_SUFFIX}")]
            if not partial:
                return
            for name in partial:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            time.sleep(0.01)

    def _write_manifest(self, round_num: int) -> None:
        # Written after the commit: a kill in between leaves a checkpoint without a manifest,
        # which is read unverified (its arrays' CRCs are still checked).
        directory = self.path(round_num)
        manifest = {
            rel: [os.path.getsize(path), _file_crc32(path)]
            for rel, path in sorted(_files(directory).items())
        }
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, MANIFEST))

    def verify_files(self, round_num: int, under: str | None = None) -> None:
        """Checks the files of a checkpoint against its manifest (size and CRC-32).

        Args:
          round_num: which checkpoint.
          under: only the files in this subfolder (``meta``); None: all of them.

        Raises:
          CheckpointReadError: naming the first missing, truncated or changed file.
        """
        if round_num in self._verified:
            return
        directory = self.path(round_num)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    manifest = {rel: (int(v[0]), int(v[1])) for rel, v in json.load(f).items()}
            except (OSError, ValueError, TypeError, AttributeError, IndexError) as err:
                raise CheckpointReadError(
                    f"checkpoint {directory} is damaged: its {MANIFEST} cannot be read "
                    f"({_cause(err)})."
                ) from None
            for rel, (size, crc) in manifest.items():
                if under is not None and not rel.startswith(under + os.sep):
                    continue
                file = os.path.join(directory, rel)
                if not os.path.isfile(file):
                    problem = f"{rel} is missing"
                elif os.path.getsize(file) != size:
                    problem = f"{rel} has {os.path.getsize(file)} bytes, {size} were saved"
                elif _file_crc32(file) != crc:
                    problem = f"{rel} differs from what was saved (CRC-32 mismatch)"
                else:
                    continue
                raise CheckpointReadError(f"checkpoint {directory} is damaged: {problem}.")
        if under is None:
            self._verified.add(round_num)

    def metadata(self, round_num: int) -> dict:
        """Returns the JSON metadata (round, history, config) of a checkpoint, no arrays.

        Raises:
          CheckpointReadError: if it cannot be read.
        """
        self.verify_files(round_num, under="meta")
        try:
            with _quiet_storage_threads():
                meta = self._manager.restore(
                    round_num, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
        except Exception as err:  # noqa: BLE001 - storage layers raise many types
            raise CheckpointReadError(
                f"checkpoint {self.path(round_num)} cannot be read: {_cause(err)}"
            ) from err
        if not isinstance(meta, dict):
            raise CheckpointReadError(f"checkpoint {self.path(round_num)} has no metadata.")
        meta = dict(meta)
        meta.pop("array_crc32", None)
        return meta

    def _restore_arrays(self, round_num: int) -> dict[str, Any]:
        path = self.path(round_num)
        self.verify_files(round_num)
        try:
            with _quiet_storage_threads():
                out = self._manager.restore(
                    round_num,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                    ),
                )
            arrays = {k: np.asarray(v) for k, v in dict(out.state).items()}
        except Exception as err:  # noqa: BLE001 - storage layers raise many types
            raise CheckpointReadError(f"checkpoint {path} cannot be read: {_cause(err)}") from err
        checksums = (out.meta or {}).get("array_crc32", {})
        bad = sorted(k for k, v in arrays.items() if k in checksums and _crc32(v) != checksums[k])
        if bad:
            raise CheckpointReadError(
                f"checkpoint {path} is corrupted: the stored values of {bad[:3]} differ from "
                "those that were saved (CRC-32 mismatch)."
            )
        return arrays

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
          CheckpointReadError: if the checkpoint cannot be read or fails its checksums.
        """
        saved_meta = self.metadata(round_num)
        flat_like = _flatten(like)
        restored = self._restore_arrays(round_num)
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
            restored[jax.tree_util.keystr(path)].astype(np.asarray(leaf).dtype)
            for path, leaf in leaves
        ]
        return jax.tree_util.tree_unflatten(treedef, values), saved_meta

    def restore_raw(self, round_num: int) -> tuple[dict[str, np.ndarray], dict]:
        """Restores a checkpoint as a flat ``{key path: array}`` dict, without a template.

        Raises:
          CheckpointReadError: if the checkpoint cannot be read or fails its checksums.
        """
        return self._restore_arrays(round_num), self.metadata(round_num)

    def newest_readable(
        self, read: Callable[[int], T]
    ) -> tuple[int, T, list[tuple[int, str]]] | None:
        """Reads the newest checkpoint that can be read, falling back to older ones.

        Args:
          read: reads the checkpoint of a round (e.g. ``lambda r: self.restore(r, like)``);
            a `CheckpointReadError` moves on to the next older checkpoint, any other error
            (a config mismatch) is raised.

        Returns:
          ``(round, read(round), skipped)`` where ``skipped`` holds ``(round, reason)`` for
          every newer checkpoint that could not be read; None if there is no committed
          checkpoint.

        Raises:
          CheckpointReadError: if checkpoints exist but none can be read.
        """
        skipped: list[tuple[int, str]] = []
        for round_num in reversed(self.rounds()):
            try:
                return round_num, read(round_num), skipped
            except CheckpointReadError as err:
                skipped.append((round_num, str(err)))
        if skipped:
            raise CheckpointReadError(
                f"none of the checkpoints in {self.directory} can be read: "
                f"{[reason for _, reason in skipped]}"
            )
        return None

    def set_aside(self, round_num: int) -> str:
        """Renames an unreadable checkpoint to ``<round>.unreadable[.N]`` so that a resumed run
        can save that round again (nothing is deleted); returns the new path."""
        target = self.path(round_num) + ".unreadable"
        suffix = 0
        while os.path.exists(target + (f".{suffix}" if suffix else "")):
            suffix += 1
        target += f".{suffix}" if suffix else ""
        os.rename(self.path(round_num), target)
        self._verified.discard(round_num)
        self._manager.reload()
        return target

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
