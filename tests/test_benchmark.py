"""Tests of scripts/benchmark.py: an end-to-end smoke run and its pure helpers.

Timings are never asserted against targets here (the CI machine is small and noisy); only that
the script runs, measures positive numbers and that the two variants compute the same round.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "benchmark.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


benchmark = _load_script()


@pytest.mark.slow
def test_quick_run_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new global params equal" in proc.stdout
    results = json.loads(out.read_text())

    for key in (
        "schema_version",
        "device",
        "peak",
        "peak_end",
        "peak_drift",
        "settings",
        "models",
        "rows",
        "targets",
    ):
        assert key in results
    assert results["quick"] is True
    assert results["device"]["device_kind"] and results["device"]["cpu_count"] >= 1
    assert results["peak"]["gflops"] > 0 and results["peak"]["best_gflops"] > 0
    tiny = results["models"]["tiny"]
    assert 50_000 < tiny["params"] < 200_000 and tiny["train_flops_per_token"] > 0

    rows = results["rows"]
    assert {(r["clients"], r["variant"]) for r in rows} == {
        (c, v) for c in benchmark.QUICK_CLIENTS for v in ("sequential", "vmapped")
    }
    for row in rows:
        assert len(row["round_s_all"]) == 2
        for key in (
            "compile_s",
            "round_s",
            "client_updates_per_s",
            "tokens_per_s",
            "model_gflops",
            "mfu",
        ):
            assert row[key] > 0, (key, row)
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_round"] / row["round_s"])
        if row["variant"] == "vmapped":
            assert row["check"]["allclose"], row["check"]
            assert row["vmapped_over_sequential"] > 0

    statuses = {t["target"]: t["status"] for t in results["targets"]}
    assert len(statuses) == 3 and set(statuses.values()) <= {"PASS", "FAIL", "SKIP"}
    # The quick run measures neither of the MFU target rows.
    assert sum(s == "SKIP" for s in statuses.values()) == 2


def _row(model, clients, variant, chunk, round_s, mfu, ratio=None):
    row = {
        "model": model,
        "mode": "lora",
        "clients": clients,
        "variant": variant,
        "chunk": chunk,
        "round_s": round_s,
        "mfu": mfu,
    }
    if ratio is not None:
        row["vmapped_over_sequential"] = ratio
    return row


def test_targets_use_the_best_chunk():
    rows = [
        _row("lora-4m", 32, "sequential", None, 1.0, 0.45),
        _row("lora-4m", 32, "vmapped", 4, 1.5, 0.30, 1.5),  # a slow chunk size
        _row("lora-4m", 32, "vmapped", 32, 0.9, 0.55, 0.9),
        _row("tiny", 256, "sequential", None, 1.0, 0.20),
        _row("tiny", 256, "vmapped", 256, 1.05, 0.25, 1.05),
    ]
    by_target = {t["target"]: t for t in benchmark.check_targets(rows)}
    statuses = [t["status"] for t in by_target.values()]
    assert statuses == ["PASS", "FAIL", "PASS"]
    assert "chunk 32" in list(by_target.values())[0]["detail"]


def test_targets_fail_when_vmapped_is_slower_and_skip_when_unmeasured():
    rows = [
        _row("tiny", 8, "sequential", None, 1.0, 0.2),
        _row("tiny", 8, "vmapped", 8, 1.2, 0.17, 1.2),
    ]
    statuses = [t["status"] for t in benchmark.check_targets(rows)]
    assert statuses == ["SKIP", "SKIP", "FAIL"]


def test_parse_args_defaults():
    args = benchmark.parse_args([])
    assert args.models == ["lora-4m", "tiny"] and args.rounds == 5 and args.chunk is None
    quick = benchmark.parse_args(["--quick"])
    assert quick.models == ["tiny"] and quick.rounds == 2
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models", "gpt5"])


def test_model_sizes_are_as_documented():
    import jax

    from fedjax_llm.models.llama import count_params, init_params

    sizes = {
        name: count_params(jax.eval_shape(lambda c=spec.config: init_params(c, jax.random.key(0))))
        for name, spec in benchmark.MODELS.items()
    }
    assert 3_500_000 < sizes["lora-4m"] < 4_500_000
    assert 80_000 < sizes["tiny"] < 150_000


def test_format_table_aligns_columns():
    # Names (first two columns) are left-aligned, numbers right-aligned.
    text = benchmark.format_table(("a", "b", "num"), [("xyz", "v", "1"), ("x", "vv", "1234")])
    lines = text.splitlines()
    assert lines[0] == "a    b    num"
    assert lines[1] == "---  --  ----"
    assert lines[2] == "xyz  v      1"
    assert lines[3] == "x    vv  1234"
