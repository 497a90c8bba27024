"""The error boundary every script runs inside.

`run_script` calls a script's body and turns whatever escapes it into what a person (or a batch
system) can act on:

- a `UserError` (bad config, missing or corrupt file, unwritable folder, divergence, ...) is
  one line, ``error: <cause and fix>``, and the exit code 2;
- Ctrl-C or SIGTERM is one line and the exit code 130 (a simulation reports the checkpoint it
  can be resumed from);
- any other exception is a bug or an unforeseen fault: a short line naming it and a log file
  holding the full traceback (in the run directory when the script has one), exit code 1.

The process always ends: `exit_process` leaves without waiting for stray non-daemon threads
(a storage library's writer stuck on a failed disk must not keep a batch job alive until its
wall-time limit).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from fedjax_llm.errors import RunInterrupted, UserError, first_line, interruption

ERROR_LOG = "error.log"
"""File name of the full traceback of an unexpected error, in the script's log directory."""


class ScriptContext:
    """What a script tells the boundary while it runs.

    Attributes:
      name: the script's name, used in messages and fallback log names.
      log_dir: where the full traceback of an unexpected error goes (a run directory, once the
        script knows it); None uses the system's temporary folder.
    """

    def __init__(self, name: str):
        self.name = name
        self.log_dir: str | None = None


def write_error_log(context: ScriptContext, argv: Sequence[str] | None, err: BaseException) -> str:
    """Appends the full traceback of ``err`` to the script's error log; returns its path.

    Falls back to a file in the temporary folder when the log directory cannot be written.
    """
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = (
        f"--- {stamp} {context.name} {' '.join(sys.argv[:1] + list(argv or sys.argv[1:]))}\n"
        + "".join(traceback.format_exception(err))
    )
    candidates = []
    if context.log_dir is not None:
        candidates.append(os.path.join(context.log_dir, ERROR_LOG))
    candidates.append(
        os.path.join(tempfile.gettempdir(), f"fedjax_llm-{context.name}-{os.getpid()}.log")
    )
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "(no writable location for the log; traceback follows)\n" + text


def _report_unexpected(context: ScriptContext, argv: Sequence[str] | None, err: Exception) -> int:
    log = write_error_log(context, argv, err)
    print(
        f"error: unexpected {type(err).__name__}: {first_line(str(err))}\n"
        "This is a bug or an unforeseen fault, not a mistake in your input; the full traceback "
        f"is in {log}. Please report it with that file.",
        file=sys.stderr,
    )
    return 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_script(
    name: str,
    body: Callable[[list[str] | None, ScriptContext], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Runs ``body(argv, context)`` inside the error boundary; returns the exit code.

    Args:
      name: the script's name (``simulate``, ``generate``, ...).
      body: the script; sets ``context.log_dir`` once it knows its run directory.
      argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
      ``body``'s code, 2 for a `UserError`, 130 for an interruption, 1 for anything else.
    """
    context = ScriptContext(name)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A batch system's SIGTERM (wall-time limit, preemption) ends the run like Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body(None if argv is None else list(argv), context)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.filename is None:
            return _report_unexpected(context, argv, err)
        # A fault of the environment at a named path: permissions, a full disk, a missing
        # folder, a file where a folder should be.
        target = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        print(f"error: {err.strerror or err}: {target}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt as err:
        _ignore_abandoned_coroutines()
        print(f"{interruption(err)}: {name} stopped before finishing.", file=sys.stderr)
        return RunInterrupted.exit_code
    except Exception as err:  # noqa: BLE001 - the boundary: nothing may escape as a traceback
        return _report_unexpected(context, argv, err)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ignore_abandoned_coroutines() -> None:
    """Silences Python's warning about coroutines never awaited: an interrupted run abandons a
    checkpoint save's coroutines, and their warning at exit would follow (and bury) the one
    line that says how to continue."""
    warnings.filterwarnings(
        "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
    )


def exit_process(code: int) -> None:
    """Ends the process with ``code``, even if a library left a non-daemon thread running."""
    if code:
        _ignore_abandoned_coroutines()
    sys.stdout.flush()
    sys.stderr.flush()
    stray = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if stray:
        os._exit(code)
    sys.exit(code)
