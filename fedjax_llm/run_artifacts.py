"""What every run leaves to look at besides its JSONL metrics: a learning-curve PNG and
TensorBoard event files.

`write_learning_curves` draws ``learning_curves.png`` (the training loss per round and every
evaluated loss) at the end of a run; `TensorBoardWriter` writes every numeric scalar of each
round record as it is written, so ``tensorboard --logdir runs`` shows every run under
``runs/`` live. Both are conveniences beside ``metrics.jsonl``, which stays the record of a
run: a failure to draw or to write events is a warning, never the end of a run.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

LEARNING_CURVES = "learning_curves.png"
"""File name of the learning-curve plot in a run directory."""

_writer_ids = itertools.count()


class ArtifactWarning(UserWarning):
    """A run artifact (plot, TensorBoard events) could not be written; the run goes on."""


def _warn(message: str) -> None:
    warnings.warn(message, ArtifactWarning, stacklevel=3)


def _number(value: Any) -> float | None:
    """A float for an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evaluated loss-like metrics of a history: ``eval/*`` and ``client/*`` keys whose name
    holds ``loss`` (``eval/loss``, ``client/loss_mean``, ...), in first-seen order."""
    keys: dict[str, None] = {}
    for record in history:
        for key in record:
            if key.startswith(("eval/", "client/")) and "loss" in key.split("/", 1)[1]:
                keys.setdefault(key)
    return list(keys)


def write_learning_curves(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None
) -> str | None:
    """Saves a PNG of the training loss per round and every evaluated loss per evaluated round.

    ``train_loss`` is drawn at each round record that has it; each loss-like evaluation metric
    (see `loss_keys`) at the rounds it was evaluated (round 0 is before training). Uses
    matplotlib's object API rendered by Agg, so it needs no display and changes no global
    matplotlib state.

    Args:
      history: the run's records (`fedjax_llm.Simulation.run`'s return value or the records of
        ``metrics.jsonl``), each with a ``round``.
      path: the PNG file; its folder is created.
      title: the figure title (default: the file's folder name).

    Returns:
      ``path`` as a string, or None if it could not be written; the reason is issued as an
      `ArtifactWarning` (a finished run's results are already saved, so a plot never fails it).
    """
    path = os.fspath(path)
    try:
        from matplotlib.figure import Figure  # lazy: only plots need matplotlib

        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        rounds, losses = [], []
        for record in history:
            value = _number(record.get("train_loss"))
            if value is not None and "round" in record:
                rounds.append(record["round"])
                losses.append(value)
        if rounds:
            ax.plot(rounds, losses, color="0.55", linewidth=1.0, label="train_loss")
        for key in loss_keys(history):
            points = [
                (r["round"], v)
                for r in history
                if "round" in r and (v := _number(r.get(key))) is not None and math.isfinite(v)
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=key)
        ax.set_xlabel("round")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center")
        folder = os.path.dirname(os.path.abspath(path))
        ax.set_title(title if title is not None else os.path.basename(folder))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    except Exception as err:  # noqa: BLE001 - a plot must never fail a finished run
        _warn(f"could not write the learning curves {path}: {type(err).__name__}: {err}")
        return None
    return path


def _import_tensorboardx() -> tuple[Any, Any, Any]:
    """Imports tensorboardX's synchronous event writer, its protos and its scalar summary.

    tensorboardX's package import also imports PyTorch when it is installed, only to
    recognize torch tensors (which are never passed here); that costs seconds and hundreds of
    MiB. While tensorboardX is first imported, ``torch`` is hidden, then restored at once.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return EventsWriter, (Event, SessionLog), scalar


class TensorBoardWriter:
    """Writes each round record's numeric scalars as TensorBoard events, in the run directory.

    One event per record, at step ``record["round"]`` and wall time ``record["time"]`` (when
    the record has one), holding every int or float value (``train_loss``, ``eval/loss``,
    ``privacy/epsilon``, ...) under its key as the tag. Events are written synchronously (no
    background thread or queue that could block a run) and flushed after every record, so
    TensorBoard shows a run while it trains. A resumed run passes ``purge_step``: TensorBoard
    then hides the earlier process's events from that step on, as a resumed history replaces
    them.

    Any failure (tensorboardX missing, an unwritable folder, a full disk) is one
    `ArtifactWarning`, after which the writer does nothing: it never stops or hangs a run.

    Args:
      log_dir: the folder of the event file (a run directory).
      purge_step: the first step the records written from now on will have, on resume; None
        for a fresh run.

    Attributes:
      path: the event file (``events.out.tfevents.*``); None if the writer could not start.
    """

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None):
        self.log_dir = os.fspath(log_dir)
        self.path: str | None = None  # the event file, once started
        self._writer: Any = None
        self._event: Any = None
        self._session_log: Any = None
        self._scalar: Any = None
        try:
            events_writer, (self._event, self._session_log), self._scalar = _import_tensorboardx()
            os.makedirs(self.log_dir, exist_ok=True)
            # The pid and a counter keep two writers started within one second (a run and
            # its resumption) from sharing, and truncating, one file name.
            suffix = f".{os.getpid()}.{next(_writer_ids)}"
            self._writer = events_writer(os.path.join(self.log_dir, "events"), suffix)
            self.path = getattr(self._writer, "_file_name", None)
            if purge_step is not None:
                start = self._session_log(status=self._session_log.START)
                self._writer.write_event(self._event(step=purge_step, session_log=start))
            self._writer.flush()
        except Exception as err:  # noqa: BLE001 - events are optional, the run is not
            self._fail("could not start TensorBoard events", err)

    def _fail(self, what: str, err: BaseException) -> None:
        _warn(
            f"{what} in {self.log_dir}: {type(err).__name__}: {err}. The run goes on; its "
            "metrics are in metrics.jsonl."
        )
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; nothing more to report
                pass

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record's numeric scalars as one event at step ``record["round"]``.

        Args:
          record: a flat metrics record with a ``round``; keys ``round`` and ``time`` are the
            step and the wall time, every other int or float value a scalar.
        """
        if self._writer is None:
            return
        try:
            values = []
            for key, value in record.items():
                number = _number(value)
                if number is not None and key not in ("round", "time"):
                    values.extend(self._scalar(key, number).value)
            event = self._event(step=int(record.get("round", 0)))
            wall = _number(record.get("time"))
            if wall is not None:
                event.wall_time = wall
            event.summary.value.extend(values)
            self._writer.write_event(event)
            self._writer.flush()
        except Exception as err:  # noqa: BLE001 - events are optional, the run is not
            self._fail("could not write TensorBoard events", err)

    def close(self) -> None:
        """Flushes and closes the event file; safe to call more than once."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as err:  # noqa: BLE001 - events are optional, the run is not
            _warn(f"could not close the TensorBoard events in {self.log_dir}: {err}")
