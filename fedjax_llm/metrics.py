"""Run output: per-round JSONL metrics, a progress bar and the final summary table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed after every record so
    that nothing already measured is lost if the run dies.

    Args:
      path: the JSONL file.
      history: records to write first, replacing the file (used on resume so the file holds
        exactly the history of the restored state).
    """

    def __init__(self, path: str, history: Sequence[dict] | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if history is not None:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                for record in history:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, path)
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the whole run

    def write(self, record: dict) -> None:
        """Writes one record and flushes it to disk."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


def read_jsonl(path: str) -> list[dict]:
    """Reads a metrics file back into a list of records."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RoundProgress:
    """A progress bar over rounds showing the current training loss.

    Args:
      total: number of rounds in the run.
      completed: rounds already done (resume).
      enabled: False for a silent run (library use, tests).
    """

    def __init__(self, total: int, completed: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("rounds", total=total, completed=completed, status="")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def update(self, completed: int, status: str) -> None:
        """Moves the bar to ``completed`` rounds with a status text."""
        self._progress.update(self._task, completed=completed, status=status)

    def log(self, text: str) -> None:
        """Prints a line above the bar (nothing for a silent run)."""
        if self.enabled:
            self._progress.console.print(text)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def summary_table(before: dict, after: dict, keys: Iterable[str], title: str) -> Table:
    """A two-column table of metrics before the first and after the last round."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in keys:
        if key in before or key in after:
            table.add_row(key, _fmt(before.get(key, "")), _fmt(after.get(key, "")))
    return table
