"""Run output: per-round JSONL metrics, a progress bar and the final summary table."""

from __future__ import annotations

import collections
import datetime
import json
import math
import numbers
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

ProgressMode = Literal["auto", "bar", "plain", "off"]
_MODES = ("auto", "bar", "plain", "off")


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed after every record so
    that nothing already measured is lost if the run dies.

    Every record written by :meth:`write` carries a wall-clock timestamp under the key
    ``"time"``: Unix time (seconds since 1970-01-01 UTC) as a float rounded to milliseconds.
    A plain float keeps records flat and lets a plot or a diff of two records work without
    date parsing (``pandas.to_datetime(df.time, unit="s", utc=True)`` turns it into dates).
    The key ``"time"`` is therefore reserved for the writer.

    Args:
      path: the JSONL file.
      history: records to write first, replacing the file (used on resume so the file holds
        exactly the history of the restored state). They are written exactly as given: no
        timestamp is added or changed, so resumed records keep their original times.
      clock: returns the current Unix time in seconds; tests inject a fake one.
    """

    def __init__(
        self,
        path: str,
        history: Sequence[dict] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self._clock = clock
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if history is not None:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                for record in history:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, path)
        torn = _ends_without_newline(path)
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the whole run
        if torn:
            # A run killed mid-write left a partial last line; without this newline the next
            # record would be glued to it and a good record lost with the torn one.
            self._file.write("\n")
            self._file.flush()

    def write(self, record: dict) -> dict:
        """Timestamps one record, writes it as one line and flushes it to disk.

        The timestamp is set **in place**: ``record["time"]`` is (over)written with the
        current Unix time before the line is written. This is deliberate: the caller's dict
        (e.g. the run history kept in checkpoints and replayed as ``history`` on resume) then
        equals the line on disk, timestamp included. Pass a copy (``dict(record)``) to keep
        your own dict untouched.

        Args:
          record: a JSON-serializable, flat dict of metrics.

        Returns:
          ``record`` itself, now with its ``"time"`` key.
        """
        record["time"] = round(self._clock(), 3)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


def _ends_without_newline(path: str) -> bool:
    """Whether ``path`` exists, is non-empty and its last byte is not a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_jsonl(path: str, *, allow_partial_last_line: bool = False) -> list[dict]:
    """Reads a metrics file back into a list of records.

    Blank lines are skipped. Non-finite floats (``NaN``, ``Infinity``) read back as floats.

    Args:
      path: the JSONL file.
      allow_partial_last_line: skip the last line if it is not newline-terminated and is not
        valid JSON, which is what a process killed in the middle of a write leaves behind.
        Use it to read the metrics of a run that died or is still running. A bad line
        anywhere else (or a bad last line that does end in a newline, which a torn write
        cannot produce) still raises.

    Returns:
      The records, in file order.

    Raises:
      ValueError: naming the file and the 1-based line number, if a line is not valid JSON
        or not a JSON object.
    """
    records = []
    with open(path) as f:
        lines = list(f)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            torn = lineno == len(lines) and not line.endswith("\n")
            if torn and allow_partial_last_line:
                break
            hint = (
                " It looks like a write cut short by a killed process; pass "
                "allow_partial_last_line=True to skip it."
                if torn
                else ""
            )
            raise ValueError(
                f"{path}:{lineno}: corrupt JSON line ({e.msg} at column {e.colno}): "
                f"{_clip(line.rstrip())!r}.{hint}"
            ) from e
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object (a record), got "
                f"{type(record).__name__}: {_clip(line.rstrip())!r}"
            )
        records.append(record)
    return records


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class RoundProgress:
    """Progress over rounds: a live bar on a terminal, one plain line per update otherwise.

    Modes:

    - ``"bar"``: a rich progress bar (round m/n, bar, status, time remaining).
    - ``"plain"``: each :meth:`update` prints one line such as
      ``round 12/60  loss 2.3141  1.23 s/round  eta 0:00:59``, fit for log files and grep.
    - ``"off"``: prints nothing (library use, tests).
    - ``"auto"`` (default): ``"bar"`` if the stream is an interactive terminal (its
      ``isatty()`` is true and neither ``TERM=dumb`` nor ``TTY_INTERACTIVE=0`` is set) or
      Jupyter, else ``"plain"``, so batch jobs, ``> log.txt`` and ``nohup`` get plain lines.
      The choice is made once, in the constructor.

    In every mode, :meth:`log` and :meth:`log_eval` print whole lines that are never
    hard-wrapped at the console width (they may be longer than 80 columns in a log file).

    The plain mode's rate is the mean time per round over the last ``window`` intervals
    between updates, measured with ``clock``: it counts everything the remaining rounds will
    also pay (evaluation, checkpoints, logging). Only rounds completed after the first
    update count, so neither rounds restored on resume nor compilation before the first
    update distort it. Until two updates have been timed, the round times passed by the
    caller (``round_time_s``) stand in, if any.

    Args:
      total: number of rounds in the run.
      completed: rounds already done (resume).
      enabled: False for a silent run; it forces ``mode="off"`` whatever ``mode`` says (kept
        for backward compatibility, so ``enabled=verbose, mode=...`` works).
      mode: one of ``"auto"``, ``"bar"``, ``"plain"``, ``"off"``.
      stream: where to print; defaults to ``sys.stderr`` (looked up at each write).
      clock: monotonic seconds, for the plain mode's rate and ETA; tests inject a fake one.
      window: how many recent intervals between updates the rate averages over.

    Raises:
      ValueError: for an unknown ``mode`` or a ``window`` below 1.
    """

    def __init__(
        self,
        total: int,
        completed: int = 0,
        enabled: bool = True,
        *,
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: int = 20,
    ):
        if mode not in _MODES:
            raise ValueError(f"unknown progress mode {mode!r}; choose one of {', '.join(_MODES)}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.total = total
        self.completed = completed
        # soft_wrap: lines are written whole; a non-terminal console would otherwise
        # hard-wrap them at 80 columns and break grep and log parsers.
        console_args: dict[str, Any] = {"soft_wrap": True, "quiet": not enabled or mode == "off"}
        if stream is None:
            self.console = Console(stderr=True, **console_args)
        else:
            self.console = Console(file=stream, **console_args)
        if not enabled or mode == "off":
            self.mode = "off"
        elif mode == "auto":
            self.mode = "bar" if self._is_live_terminal() else "plain"
        else:
            self.mode = mode
        self.enabled = self.mode != "off"
        self._clock = clock
        # (completed, time) of the last window + 1 updates: window intervals.
        self._marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)
        self._given: collections.deque[float] = collections.deque(maxlen=window)
        self._progress: Progress | None = None
        if self.mode == "bar":
            self._progress = Progress(
                TextColumn("round"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "rounds", total=total, completed=completed, status=""
            )

    def _is_live_terminal(self) -> bool:
        """Whether a live bar makes sense: Jupyter, or a stream that is really a terminal.

        rich alone would also call a redirected stream a terminal when FORCE_COLOR is set
        (common in CI), which asks for colours, not for a redrawn bar in a log file; its
        TERM=dumb and TTY_INTERACTIVE=0 still turn the bar off.
        """
        if self.console.is_jupyter:
            return True
        try:
            isatty = self.console.file.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed file
            isatty = False
        return bool(isatty) and self.console.is_interactive

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(
        self, completed: int, status: str = "", *, round_time_s: float | None = None
    ) -> None:
        """Reports that ``completed`` rounds are done.

        In bar mode it moves the bar; in plain mode it prints one line
        ``round {completed}/{total}  {status}  {rate} s/round  eta H:MM:SS`` (the rate is
        left out, and the ETA shows ``-:--:--``, while there is nothing to estimate from).

        Args:
          completed: rounds done so far (absolute, not since the start of this process).
          status: free text shown after the round count, e.g. ``"loss 2.3141"``.
          round_time_s: wall time of the latest round as measured by the caller, if it was;
            it gives a rate (and an ETA) from the very first update, before two updates
            have been timed.
        """
        now = self._clock()
        if self._marks and completed < self._marks[-1][0]:
            self._marks.clear()  # went backwards (a restart): old intervals mean nothing
        if not self._marks or completed > self._marks[-1][0]:
            self._marks.append((completed, now))
        if round_time_s is not None:
            self._given.append(float(round_time_s))
        self.completed = completed
        if self.mode == "bar":
            assert self._progress is not None
            self._progress.update(self._task, completed=completed, status=status)
        elif self.mode == "plain":
            parts = [f"round {completed}/{self.total}"]
            if status:
                parts.append(status)
            rate = self.seconds_per_round
            if rate is not None:
                parts.append(f"{_fmt_rate(rate)} s/round")
            eta = self.eta_s
            parts.append(f"eta {'-:--:--' if eta is None else _fmt_duration(eta)}")
            self._print("  ".join(parts))

    @property
    def seconds_per_round(self) -> float | None:
        """Estimated seconds per round (see the class docstring), or None if unknown yet."""
        if len(self._marks) >= 2:
            (c0, t0), (c1, t1) = self._marks[0], self._marks[-1]
            return (t1 - t0) / (c1 - c0)
        if self._given:
            return statistics.median(self._given)
        return None

    @property
    def eta_s(self) -> float | None:
        """Estimated seconds until ``total`` rounds are done, or None if unknown yet."""
        rate = self.seconds_per_round
        if rate is None:
            return None
        return rate * max(self.total - self.completed, 0)

    def log(self, text: str) -> None:
        """Prints text as is: above the bar in bar mode, never hard-wrapped, no markup.

        Args:
          text: one or more lines; square brackets are printed literally.
        """
        if self.enabled:
            self._print(text)

    def log_eval(self, round_num: int, metrics: Mapping[str, Any]) -> None:
        """Prints an evaluation's results on one line as soon as they are known.

        For example ``eval round 20: eval/exact_match 0.41  eval/loss 1.234``: keys sorted,
        floats with 4 significant digits, values that are not numeric scalars (lists,
        dicts, strings, arrays with more than one element) and a ``"round"`` key left out.

        Args:
          round_num: the round the evaluation belongs to (0 = before training).
          metrics: the evaluation's metrics, e.g. what ``Simulation.evaluate`` returns.
        """
        if not self.enabled:
            return
        items = []
        for key in sorted(metrics):
            value = _scalar(metrics[key])
            if key != "round" and value is not None:
                items.append(f"{key} {_fmt(value)}")
        self._print(f"eval round {round_num}: " + "  ".join(items))

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def _scalar(value: Any) -> bool | int | float | None:
    """A Python number for a numeric scalar (also numpy/JAX 0-d arrays), else None."""
    if isinstance(value, bool | numbers.Integral | numbers.Real):
        return value.item() if hasattr(value, "item") else value
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if getattr(value, "shape", None) == () and kind in ("b", "i", "u", "f"):
        return value.item()
    return None


def _fmt_rate(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.3g}"


def _fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


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
