"""Sweeps from a YAML spec (`fedjax_llm.sweep`, `fedjax_llm.sweep_plots`, scripts/sweep.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml
from conftest import tiny_config

from fedjax_llm.config import config_to_dict
from fedjax_llm.sweep import (
    SweepError,
    build_runs,
    load_spec,
    prepare_output_dir,
    run_name,
    run_sweep,
    spec_from_dict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = {
    "run.num_rounds": 2,
    "eval.every": 2,
    "eval.max_new_tokens": 0,
    "eval.per_client": False,
    "run.save_checkpoints": False,
    "run.partition_report": False,
    "data.partitioner": "dirichlet",
}


def _script():
    path = os.path.join(ROOT, "scripts", "sweep.py")
    module_spec = importlib.util.spec_from_file_location("sweep_script", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def write_spec(tmp_path, name: str = "spec.yaml", **fields) -> str:
    """A spec over the tiny test config, with fast overrides."""
    base = tmp_path / "base.yaml"
    if not base.exists():
        base.write_text(yaml.safe_dump(config_to_dict(tiny_config(str(tmp_path / "unused")))))
    data = {"base": str(base), "output_dir": str(tmp_path / "sweep"), "overrides": FAST}
    data.update(fields)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"grid": {"data.alpha": [0.1, 1]}},
            r"unknown config key data\.alpha in grid\. Did you mean data\.dirichlet_alpha\?",
        ),
        (
            {"runs": [{"client.lr": 0.1}, {"clent.lr": 0.2}]},
            r"unknown config key clent\.lr in runs\[1\]\. Did you mean client\.lr\?",
        ),
        (
            {"overrides": {"run": {"num_round": 2}}, "grid": {"run.seed": [0]}},
            r"run\.num_round in overrides\. Did you mean run\.num_rounds\?",
        ),
        ({"grid": {"run.output_dir": ["a", "b"]}}, r"grid sets run\.output_dir, which the sweep"),
        (
            {"grid": {"client.lr": [0.1, -1]}},
            r"run client\.lr=-1: client\.lr=-1(\.0)? must be positive",
        ),
        ({"grid": {"client.lr": 0.1}}, r"grid\.client\.lr must be a non-empty list"),
        ({"grids": {"client.lr": [0.1]}}, r"unknown spec key 'grids'\. Did you mean grid\?"),
        ({}, r"a sweep needs grid: .* or runs:"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key_before_anything_runs(tmp_path, fields, message):
    path = write_spec(tmp_path, **fields)
    with pytest.raises(SweepError, match=message) as info:
        run_sweep(load_spec(path), progress=False)
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "sweep")


def test_grid_expansion_count_names_and_configs(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            grid={"data.dirichlet_alpha": [0.1, 1, 10], "algorithm.type": ["fedavg", "fedprox"]},
            runs=[{"run.seed": 0}, {"run.seed": 1, "client.lr": 0.05}],
        )
    )
    runs = build_runs(spec)
    assert len(runs) == 3 * 2 * 2
    assert spec.swept_keys == ["data.dirichlet_alpha", "algorithm.type", "run.seed", "client.lr"]
    assert runs[0].name == "algorithm.type=fedavg,data.dirichlet_alpha=0.1,run.seed=0"
    assert runs[1].name == "algorithm.type=fedprox,data.dirichlet_alpha=0.1,run.seed=0"
    last = runs[-1]
    assert last.name == "algorithm.type=fedprox,client.lr=0.05,data.dirichlet_alpha=10,run.seed=1"
    assert last.config.algorithm.name == "fedprox" and last.config.data.dirichlet_alpha == 10
    assert last.config.client.lr == 0.05 and runs[0].config.client.lr == 0.02  # base value
    assert last.config.run.num_rounds == 2  # the common overrides
    assert last.run_dir == os.path.join(str(tmp_path / "sweep"), "runs", last.name)
    assert len({run.name for run in runs}) == len(runs)

    # Odd characters and long names are sanitized, stay unique and stable.
    odd = run_name({"data.path": "/a b/c.jsonl", "trainable.lora_targets": ["q", "v"]})
    assert odd.startswith("data.path=_a_b_c.jsonl,trainable.lora_targets=q+v_") and "/" not in odd
    assert odd != run_name({"data.path": "/a_b/c.jsonl", "trainable.lora_targets": ["q", "v"]})
    long = run_name({f"k{i}": "x" * 20 for i in range(10)})
    assert len(long) <= 120 and long == run_name({f"k{i}": "x" * 20 for i in range(10)})
    assert run_name({}) == "base"

    with pytest.raises(SweepError, match=r"same values \(run\.seed=0\)"):
        build_runs(spec_from_dict({"output_dir": "x", "runs": [{"run.seed": 0}, {"run.seed": 0}]}))
    with pytest.raises(SweepError, match=r"run\.seed is both in grid and in runs\[0\]"):
        build_runs(
            spec_from_dict(
                {"output_dir": "x", "grid": {"run.seed": [0]}, "runs": [{"run.seed": 1}]}
            )
        )


def test_a_sweep_runs_tabulates_plots_and_skips_finished_runs(tmp_path, capsys):
    grid = {"data.dirichlet_alpha": [0.1, 10], "run.num_clients_per_round": [2, 4]}
    path = write_spec(tmp_path, grid=grid)
    script = _script()
    assert script.main([path]) == 0
    out = capsys.readouterr().out
    assert "[1/4] data.dirichlet_alpha=0.1,run.num_clients_per_round=2: started" in out
    assert out.count("done in") == 4 and "eta" in out and "elapsed" in out
    assert "sweep: 4 of 4 runs finished, 0 failed" in out

    sweep = tmp_path / "sweep"
    rows = read_csv(str(sweep / "results.csv"))
    assert [r["run.num_clients_per_round"] for r in rows] == ["2", "4", "2", "4"]
    assert [r["data.dirichlet_alpha"] for r in rows] == ["0.1", "0.1", "10", "10"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        assert float(row["eval/loss"]) > 0 and row["rounds"] == "2"
        assert float(row["median_round_time_s"]) > 0 and float(row["wall_time_s"]) > 0
    for name in ("final_vs_alpha.png", "learning_curves.png", "round_time_vs_clients.png"):
        assert (sweep / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert load_spec(str(sweep / "sweep.yaml")).grid == grid  # the copy is itself a spec

    # Running again skips every finished run: nothing is rewritten.
    metrics = sorted(sweep.glob("runs/*/metrics.jsonl"))
    assert len(metrics) == 4
    mtimes = [os.stat(m).st_mtime_ns for m in metrics]
    assert script.main([path]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4 and "started" not in out
    assert [os.stat(m).st_mtime_ns for m in metrics] == mtimes
    assert read_csv(str(sweep / "results.csv")) == rows


class _Broken:
    """A simulation with a bug: raises an unexpected error."""

    def __init__(self, config, verbose=False):
        del config, verbose

    def run(self):
        raise RuntimeError("something inside broke\nsecond line")


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    runs = [
        {"data.source": "file", "data.path": missing, "data.partitioner": "iid"},
        {"data.seed": 1},
    ]
    path = write_spec(tmp_path, runs=runs)
    script = _script()
    assert script.main([path]) == 1
    out = capsys.readouterr().out
    assert "[1/2] data.partitioner=iid,data.path=" in out and "FAILED after" in out
    assert "sweep: 1 of 2 runs finished, 1 failed" in out and "retries them" in out
    failed, ok = read_csv(str(tmp_path / "sweep" / "results.csv"))
    assert failed["status"] == "failed" and "missing.jsonl" in failed["error"]
    assert "\n" not in failed["error"]
    assert ok["status"] == "ok" and float(ok["eval/loss"]) > 0

    # Again: the finished run is skipped, the failed one is retried (and fails again).
    assert script.main([path]) == 1
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 1 and out.count("FAILED after") == 1

    # An unexpected error (a bug) is one line in the results and a traceback in the run's log.
    spec = load_spec(
        write_spec(
            tmp_path, "broken.yaml", output_dir=str(tmp_path / "broken"), runs=[{"data.seed": 3}]
        )
    )
    result = run_sweep(spec, simulation=_Broken, progress=False)
    assert result.failed == ["data.seed=3"]
    (row,) = result.rows
    assert row["error"].startswith("unexpected RuntimeError: something inside broke (traceback in")
    log = tmp_path / "broken" / "runs" / "data.seed=3" / "error.log"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()


def test_a_different_spec_in_the_same_directory_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"run.seed": [0, 1]}))
    prepare_output_dir(spec)
    prepare_output_dir(spec)  # the same spec continues
    prepare_output_dir(
        load_spec(write_spec(tmp_path, grid={"run.seed": [0, 1]}, metric="train_loss"))
    )
    other = load_spec(write_spec(tmp_path, "other.yaml", grid={"run.seed": [0, 1, 2]}))
    with pytest.raises(SweepError) as info:
        run_sweep(other, progress=False)
    message = str(info.value)
    assert "\n" not in message and "holds another sweep (grid differ" in message
    assert "run the same spec" in message and "choose another output_dir (or delete" in message
    assert not (tmp_path / "sweep" / "runs").exists()  # refused before any run

    # Runs without a sweep.yaml are not adopted either.
    (tmp_path / "loose" / "runs" / "x").mkdir(parents=True)
    loose = load_spec(
        write_spec(
            tmp_path, "loose.yaml", output_dir=str(tmp_path / "loose"), grid={"run.seed": [0]}
        )
    )
    with pytest.raises(SweepError, match="holds runs but .* has no sweep.yaml"):
        prepare_output_dir(loose)


def test_the_heterogeneity_study_spec_builds():
    spec = load_spec(os.path.join(ROOT, "configs", "sweeps", "heterogeneity.yaml"))
    runs = build_runs(spec)
    assert len(runs) == 45
    assert {run.config.algorithm.name for run in runs} == {"fedavg", "fedprox", "scaffold"}
    assert sorted({run.config.data.dirichlet_alpha for run in runs}) == [0.01, 0.1, 1, 10, 100]
    assert {run.config.data.partitioner for run in runs} == {"dirichlet"}


def test_seeds_run_as_one_program_and_equal_runs_one_by_one(tmp_path):
    together = run_sweep(
        load_spec(write_spec(tmp_path, grid={"run.seed": [0, 1, 2]})), progress=False
    )
    # The middle seed alone (tests/test_replicas.py compares whole groups with separate runs).
    spec = write_spec(
        tmp_path, "alone.yaml", grid={"run.seed": [1]}, output_dir=str(tmp_path / "b")
    )
    alone = run_sweep(load_spec(spec), progress=False, replicas=False)
    assert together.failed == [] and alone.failed == []
    assert [row["status"] for row in together.rows] == ["ok"] * 3
    np.testing.assert_allclose(
        float(together.rows[1]["eval/loss"]), float(alone.rows[0]["eval/loss"]), rtol=1e-4
    )
    losses = {float(row["eval/loss"]) for row in together.rows}
    assert len(losses) == 3  # each run its own seed
    compile_times = set()
    for row in together.rows:
        summary = tmp_path / "sweep" / "runs" / row["run"] / "summary.json"
        compile_times.add(json.loads(summary.read_text())["compile_time_s"])
    # One program compiled once for the three runs.
    assert len(compile_times) == 1
