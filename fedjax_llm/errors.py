"""The error types a user can act on.

Every error that bad input or a fault of the environment can cause derives from `UserError`:
scripts report it as one line (its message names the cause and the fix) and exit with its
``exit_code``; anything else is a bug or an unforeseen fault, reported with a pointer to a log
holding the full traceback (see `fedjax_llm.cli`). Library code raises the most specific
subclass; each also derives from the builtin type callers caught before (``ValueError``,
``RuntimeError``, ``OSError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the cause and what to do."""

    exit_code = 2


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (permissions, disk full, storage error); the
    previous committed checkpoint is intact."""


class CheckpointReadError(UserError, OSError):
    """No checkpoint of a run could be read back (missing, truncated or corrupted files)."""


class RunInterrupted(UserError):
    """The run was stopped by Ctrl-C or SIGTERM; it can be continued with ``--run.resume``."""

    exit_code = 130


class DeviceMemoryError(UserError, RuntimeError):
    """The compiled round or evaluation needs more accelerator memory than there is."""


def first_line(text: str, limit: int = 300) -> str:
    """The first line of an error message, cut to ``limit`` characters (for one-line reports
    of errors whose messages run over many lines, as XLA's and storage layers' do)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def interruption(err: KeyboardInterrupt) -> str:
    """How an interruption is named: SIGTERM (raised as `KeyboardInterrupt("SIGTERM")` by the
    scripts' boundary) or Ctrl-C."""
    return "terminated (SIGTERM)" if str(err) == "SIGTERM" else "interrupted"
