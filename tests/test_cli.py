"""The scripts' error boundary: one line per known error, a log for unexpected ones, exits."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedjax_llm.cli import ERROR_LOG, run_script
from fedjax_llm.config import ConfigError
from fedjax_llm.errors import CheckpointWriteError, RunInterrupted, UserError


def _raising(err: BaseException, log_dir: str | None = None):
    def body(argv, context):
        context.log_dir = log_dir
        raise err

    return body


@pytest.mark.parametrize(
    "err", [ConfigError("client.lr=-1 must be positive."), CheckpointWriteError("disk full")]
)
def test_a_user_error_is_one_line_and_exit_code_2(err, capsys):
    assert run_script("t", _raising(err), []) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {err}\n"
    assert "Traceback" not in captured.err + captured.out


def test_an_interrupted_run_exits_130_with_its_message(capsys):
    err = RunInterrupted("interrupted after 3 completed rounds; continue with --run.resume true")
    assert run_script("t", _raising(err), []) == 130
    assert capsys.readouterr().err == f"error: {err}\n"
    assert run_script("t", _raising(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err.strip() == "interrupted: t stopped before finishing."


def test_an_os_error_on_a_path_names_the_path(capsys, tmp_path):
    err = PermissionError(13, "Permission denied", str(tmp_path / "x"))
    assert run_script("t", _raising(err), []) == 2
    assert capsys.readouterr().err.strip() == f"error: Permission denied: {tmp_path / 'x'}"


def test_an_unexpected_error_points_to_a_full_log_in_the_run_directory(capsys, tmp_path):
    def body(argv, context):
        context.log_dir = str(tmp_path / "run")

        def deep():
            raise RuntimeError("something inside broke\nsecond line")

        deep()

    assert run_script("t", body, ["--x", "1"]) == 1
    err = capsys.readouterr().err
    log = tmp_path / "run" / ERROR_LOG
    assert "unexpected RuntimeError: something inside broke" in err
    assert str(log) in err and "second line" not in err and "Traceback" not in err
    text = log.read_text()
    assert "Traceback" in text and "in deep" in text and "second line" in text


def test_the_log_falls_back_to_the_temporary_folder(capsys, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run directory should be")
    assert run_script("t", _raising(ValueError("boom"), str(blocked)), []) == 1
    err = capsys.readouterr().err
    path = err.split("traceback is in ")[1].split(". Please")[0]
    assert "fedjax_llm-t-" in path and "ValueError: boom" in open(path).read()


def test_user_error_is_the_base_of_every_named_error():
    from fedjax_llm import CohortOverflowError, DivergenceError, RunDirectoryError
    from fedjax_llm.checkpoint import CheckpointMismatchError
    from fedjax_llm.models.gguf_convert import GGUFConversionError
    from fedjax_llm.models.hf_loader import ModelLoadError

    for kind in (
        ConfigError,
        CohortOverflowError,
        DivergenceError,
        RunDirectoryError,
        CheckpointMismatchError,
        GGUFConversionError,
        ModelLoadError,
    ):
        assert issubclass(kind, UserError), kind


def test_the_process_ends_although_a_non_daemon_thread_still_runs():
    code = (
        "import threading, time\n"
        "from fedjax_llm.cli import exit_process\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "exit_process(3)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 60


def test_the_interruption_line_is_the_last_line_although_a_save_was_abandoned():
    # An interrupted checkpoint save leaves coroutines never awaited; Python's warning about
    # them at exit must not follow the line that says how to continue.
    code = (
        "from fedjax_llm.cli import exit_process, run_script\n"
        "async def save(): pass\n"
        "pending = save()\n"
        "def body(argv, context): raise KeyboardInterrupt('SIGTERM')\n"
        "code = run_script('simulate', body, [])\n"
        "del pending\n"
        "exit_process(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert result.returncode == 130
    lines = result.stderr.decode().strip().splitlines()
    assert lines == ["terminated (SIGTERM): simulate stopped before finishing."], lines
