"""Fault injection: kills at random moments, read-only and full disks, corrupted checkpoints.

Each test runs `scripts/simulate.py` as a user would (a subprocess) and breaks its environment
from outside; the promise checked is the same every time: the process ends at once with one
named error line, nothing committed is lost, and a resumed run equals an uninterrupted one bit
for bit.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fedjax_llm import Simulation
from fedjax_llm.checkpoint import MANIFEST, Checkpointer
from fedjax_llm.config import dump_config
from fedjax_llm.errors import CheckpointReadError
from fedjax_llm.metrics import read_jsonl

SIMULATE = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"
ROUNDS = 5


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory):
    """A YAML config of a tiny run with a checkpoint every round, and its uninterrupted result:
    (config path, reference final arrays, reference train losses)."""
    root = tmp_path_factory.mktemp("faults")
    # FedAdam: the server optimizer's state must survive every fault too.
    config = tiny_config(
        str(root / "reference"),
        algorithm={"type": "fedadam"},
        server={"lr": 0.01},
        client={"optimizer": "momentum", "lr": 0.2},
        run={"num_rounds": ROUNDS, "checkpoint_every": 1, "keep_checkpoints": 2},
    )
    path = root / "config.yaml"
    path.write_text(dump_config(config))
    Simulation(config, verbose=False).run()
    arrays, _ = _final(config.run.output_dir)
    return path, arrays, _losses(config.run.output_dir)


def _final(run_dir: str) -> tuple[dict, dict]:
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    try:
        assert checkpointer.latest_round() == ROUNDS
        return checkpointer.restore_raw(ROUNDS)
    finally:
        checkpointer.close()


def _losses(run_dir: str) -> list[float]:
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [r["train_loss"] for r in records if "train_loss" in r]


def _env(tmp_path_factory) -> dict:
    # The runs compile the same round: the test session's compilation cache (see conftest)
    # keeps each start short.
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "xla"))
    return env


def _start(config: Path, run_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SIMULATE), "--config", str(config), "--run.output_dir", str(run_dir)]
        + list(extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Polls ``predicate`` every millisecond until it holds or ``proc`` ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("timed out waiting")


def _saving(ckpt_dir: Path, round_num: int):
    prefix = f"{round_num}.orbax-checkpoint-tmp"
    return lambda: ckpt_dir.is_dir() and any(n.startswith(prefix) for n in os.listdir(ckpt_dir))


def _committed(ckpt_dir: Path, round_num: int):
    return lambda: (ckpt_dir / str(round_num) / "_CHECKPOINT_METADATA").exists()


def test_kills_at_random_moments_then_resume_equal_an_uninterrupted_run(
    fault_config, tmp_path, tmp_path_factory
):
    """kill -9 mid-save and at random moments, and a SIGTERM, resuming after each; every
    committed round survives and the finished run is bit for bit the uninterrupted one."""
    config, reference, reference_losses = fault_config
    env, run_dir = _env(tmp_path_factory), tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    rng = random.Random(0)
    kills = [("mid-save", 2), ("sigterm", 3), ("random", None), ("mid-save", 4)]
    resume: list[str] = []
    committed_before = 0
    for how, round_num in kills:
        proc = _start(config, run_dir, env, *resume)
        if how == "mid-save":
            reached = _wait_for(_saving(ckpt_dir, round_num), proc)
        elif how == "sigterm":
            reached = _wait_for(_committed(ckpt_dir, round_num), proc)
        else:
            reached = _wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if how == "sigterm" and reached and proc.returncode != 0:
            # A batch system's SIGTERM: one line naming the checkpoint to continue from.
            assert proc.returncode == 130, err
            last = err.strip().splitlines()[-1]
            assert last.startswith("error: terminated (SIGTERM) after"), err
            assert "--run.resume true" in last and "Traceback" not in err
        else:
            assert proc.returncode in (-signal.SIGKILL, 0), err
        rounds = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        # Nothing committed is ever lost, and a half-written save is never committed.
        assert not rounds or rounds[-1] >= committed_before
        if how == "mid-save" and reached:
            assert round_num not in rounds or proc.returncode == 0
        committed_before = rounds[-1] if rounds else 0
        resume = ["--run.resume", "true"]
    proc = _start(config, run_dir, env, *resume)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    arrays, _ = _final(str(run_dir))
    assert sorted(arrays) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert _losses(str(run_dir)) == reference_losses


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs (a full or read-only disk) needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.fixture
def checkpoint_mount(tmp_path):
    """A tmpfs mounted as a run's checkpoint folder (unmounted after the test)."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    yield run_dir, ckpt_dir
    subprocess.run(["umount", str(ckpt_dir)], capture_output=True)


def _frozen_readonly(ckpt_dir: Path) -> None:
    if os.geteuid() != 0:
        os.chmod(ckpt_dir, 0o555)
        return
    # The kernel refuses a read-only remount ("mount point is busy") while the run holds a file
    # open for writing, i.e. in the middle of a save; saves are short, so try again until one
    # lands between them.
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            ["mount", "-o", "remount,ro", str(ckpt_dir)], capture_output=True, text=True
        )
        if result.returncode == 0:
            return
        if "busy" not in result.stderr or time.monotonic() > deadline:
            raise AssertionError(f"could not remount {ckpt_dir} read-only: {result.stderr}")
        time.sleep(0.005)


@pytest.fixture
def readonly_capable(tmp_path):
    """A checkpoint folder that can be made read-only mid-run: a tmpfs under root (root ignores
    permission bits), a plain folder with its write permission removed otherwise."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    mounted = False
    if os.geteuid() == 0:
        _mount_tmpfs(ckpt_dir, "64m")
        mounted = True
    else:
        ckpt_dir.mkdir(parents=True)
    yield run_dir, ckpt_dir
    if mounted:
        subprocess.run(["umount", str(ckpt_dir)], capture_output=True)
    elif ckpt_dir.exists():
        os.chmod(ckpt_dir, 0o755)


def test_a_checkpoint_folder_that_turns_read_only_ends_the_run_at_once(
    fault_config, readonly_capable, tmp_path_factory
):
    """The save fails in the main thread as a named error and the process exits (it used to
    hang forever on orbax's background thread); the committed checkpoint stays readable."""
    config, _, _ = fault_config
    run_dir, ckpt_dir = readonly_capable
    proc = _start(config, run_dir, _env(tmp_path_factory))
    assert _wait_for(_committed(ckpt_dir, 1), proc)
    _frozen_readonly(ckpt_dir)
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: could not save the checkpoint of round")
    assert "read-only file system" in lines[-1] or "permission denied" in lines[-1]
    assert "Traceback" not in err
    checkpointer = Checkpointer(str(ckpt_dir), read_only=True)
    try:
        committed = checkpointer.rounds()
        assert committed and checkpointer.restore_raw(committed[-1])[0]
    finally:
        checkpointer.close()


def test_a_full_disk_ends_the_run_with_a_named_error_and_resumes_once_freed(
    fault_config, checkpoint_mount, tmp_path_factory
):
    config, reference, reference_losses = fault_config
    run_dir, ckpt_dir = checkpoint_mount
    newest = Path(_ref_dir(config)) / str(ROUNDS)
    one = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    assert one > 0
    # Room for about one and a half checkpoints: the second save (kept beside the first) fails.
    _mount_tmpfs(ckpt_dir, str(int(one * 1.5) // 4096 * 4096 + 4096))
    env = _env(tmp_path_factory)
    proc = _start(config, run_dir, env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert "no space left on device" in last and "Traceback" not in err
    assert "The previous checkpoint (round 1) is intact" in last
    assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]  # the failed save is cleaned up
    _remount(ckpt_dir, "size=64m")
    proc = _start(config, run_dir, env, "--run.resume", "true")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    arrays, _ = _final(str(run_dir))
    for name, value in reference.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert _losses(str(run_dir)) == reference_losses


def _ref_dir(config: Path) -> str:
    return str(config.parent / "reference" / "checkpoints")


# --------------------------------------------------------------------- corrupted checkpoints
def _copy_reference(config: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(config.parent / "reference", run_dir)
    return run_dir


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(max(path.stat().st_size, 16)))


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _array_files(checkpoint: Path) -> list[Path]:
    return sorted(
        p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: [_truncate(p) for p in _array_files(c)],
        lambda c: [_garbage(p) for p in _array_files(c)],
        lambda c: [_flip_middle_byte(p) for p in _array_files(c)],
        lambda c: [p.unlink() for p in _array_files(c)],
        lambda c: _garbage(c / "meta" / "metadata"),
        lambda c: shutil.rmtree(c / "state"),
        # Without the file manifest (a kill between commit and manifest): the arrays' CRCs.
        lambda c: [(c / MANIFEST).unlink()] + [_flip_middle_byte(p) for p in _array_files(c)],
    ],
    ids=["truncated", "garbage", "bit-flip", "deleted", "bad-metadata", "no-state", "no-manifest"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(fault_config, tmp_path, damage):
    config, _, _ = fault_config
    run_dir = _copy_reference(config, tmp_path)
    damage(run_dir / "checkpoints" / str(ROUNDS))
    checkpointer = Checkpointer(str(run_dir / "checkpoints"), read_only=True)
    try:
        with pytest.raises(CheckpointReadError, match=f"checkpoint .*/{ROUNDS} "):
            checkpointer.restore_raw(ROUNDS)
        found = checkpointer.newest_readable(checkpointer.restore_raw)
        assert found is not None
        round_num, (arrays, meta), skipped = found
        assert round_num == ROUNDS - 1 and meta["round"] == ROUNDS - 1
        assert [r for r, _ in skipped] == [ROUNDS] and f"/{ROUNDS} " in skipped[0][1]
    finally:
        checkpointer.close()


def test_resume_from_a_damaged_newest_checkpoint_says_so_and_equals_the_reference(
    fault_config, tmp_path, capsys
):
    config_path, reference, reference_losses = fault_config
    run_dir = _copy_reference(config_path, tmp_path)
    for p in _array_files(run_dir / "checkpoints" / str(ROUNDS)):
        _truncate(p)
    from fedjax_llm.config import load_config

    config = load_config(
        str(config_path), ["--run.output_dir", str(run_dir), "--run.resume", "true"]
    )
    sim = Simulation(config, verbose=True)
    sim.run()
    assert sim.notes[0].startswith(f"warning: checkpoint {run_dir / 'checkpoints' / str(ROUNDS)}")
    assert "older checkpoint" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / f"{ROUNDS}.unreadable").is_dir()  # kept, not deleted
    arrays, _ = _final(str(run_dir))
    for name, value in reference.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert _losses(str(run_dir)) == reference_losses


def test_no_readable_checkpoint_is_a_named_error(fault_config, tmp_path):
    config, _, _ = fault_config
    run_dir = _copy_reference(config, tmp_path)
    for round_num in (ROUNDS - 1, ROUNDS):
        for p in _array_files(run_dir / "checkpoints" / str(round_num)):
            _garbage(p)
    proc = subprocess.run(
        [sys.executable, str(SIMULATE), "--config", str(config)]
        + ["--run.output_dir", str(run_dir), "--run.resume", "true"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "none of the checkpoints in" in proc.stderr and "Traceback" not in proc.stderr
