"""Runs named variants of one config and tabulates what each ended with.

A variant is a list of dotted overrides (``["privacy.target_epsilon=8"]``) applied to a base
config, exactly as on the command line of ``scripts/simulate.py``; each runs to the end in this
process, one after another (so their round times are comparable), in its own run directory
under ``out_dir``. The row of a variant holds its final evaluation, its median round time and
whatever the run reported about privacy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.config import ExperimentConfig, load_config


def variant_config(
    base: str, overrides: Sequence[str], out_dir: str, name: str
) -> ExperimentConfig:
    """The base YAML with a variant's overrides and its own output directory."""
    run_dir = os.path.join(out_dir, name.replace(" ", "_").replace("/", "_"))
    args = [f"--{o.split('=', 1)[0]}={o.split('=', 1)[1]}" for o in overrides]
    return load_config(base, [*args, f"--run.output_dir={run_dir}"]).validate()


def final_row(sim: Any, history: list[dict]) -> dict[str, Any]:
    """What a finished `fedjax_llm.Simulation` reports: final evaluation, times, bytes sent,
    privacy."""
    evals = [h for h in history if "eval/loss" in h]
    rounds = [h for h in history if "round_time_s" in h]
    last = evals[-1] if evals else {}
    exact = [v for k, v in last.items() if k.startswith("eval/exact_match/")]
    row: dict[str, Any] = {
        "rounds": len(rounds),
        "eval_loss": last.get("eval/loss"),
        "exact_match": float(np.mean(exact)) if exact else None,
        "client_loss_mean": last.get("client/loss_mean"),
        "client_loss_worst10": last.get("client/loss_worst10"),
        "personal_loss_mean": last.get("client/personal/loss_mean"),
        "personal_loss_worst10": last.get("client/personal/loss_worst10"),
        "bytes_up": int(sum(h.get("bytes_up", 0) for h in rounds)),
        "bytes_down": int(sum(h.get("bytes_down", 0) for h in rounds)),
        "backdoor_success": last.get("eval/backdoor_success"),
        "median_round_time_s": float(np.median([h["round_time_s"] for h in rounds]))
        if rounds
        else None,
        "compile_time_s": sim.compile_time_s,
    }
    if sim.privacy is not None:
        row["epsilon"] = sim.privacy.epsilon()
        row["noise_multiplier"] = sim.privacy_plan.noise_multiplier
        row["delta"] = sim.privacy_plan.delta
        row["stopped_by_budget"] = sim.stopped_by_budget
    if sim.audit is not None and "canaries" in sim.audit:
        row["audit_epsilon_lower_bound"] = sim.audit["canaries"]["epsilon_lower_bound"]
    return row


def machine() -> str:
    """The CPU model (lscpu's model name) or the accelerator that figures come from."""
    import platform
    import subprocess

    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "cpu"


def shortened(variants: Mapping[str, Sequence[str]], rounds: int | None) -> dict:
    """The variants with ``rounds`` rounds each (evaluated at the end), or unchanged for None."""
    if rounds is None:
        return dict(variants)
    extra = [f"run.num_rounds={rounds}", f"eval.every={rounds}", "run.checkpoint_every=0"]
    return {name: [*overrides, *extra] for name, overrides in variants.items()}


def run_variants(
    base: str,
    variants: Mapping[str, Sequence[str]],
    out_dir: str,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Runs every variant of ``base`` and returns one row per variant (``name`` first).

    Args:
      base: path of the base YAML config.
      variants: name -> overrides (``key=value`` strings).
      out_dir: parent of the variants' run directories (each starts fresh).
      verbose: show each run's progress.

    Returns:
      The rows, in the order of ``variants``.
    """
    from fedjax_llm.simulation import Simulation

    rows = []
    for name, overrides in variants.items():
        config = variant_config(base, overrides, out_dir, name)
        if os.path.exists(config.run.output_dir):
            import shutil

            shutil.rmtree(config.run.output_dir)
        sim = Simulation(config, verbose=verbose)
        history = sim.run()
        rows.append({"name": name, "overrides": list(overrides), **final_row(sim, history)})
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A Markdown table of ``rows`` with ``columns`` (key -> header); floats to 4 digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key)) for key in columns) + " |")
    return "\n".join(lines)


def write_rows(path: str, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    """Writes rows and the settings they came from as JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "rows": list(rows)}, f, indent=1)


def run_table_command(
    argv: Sequence[str] | None,
    description: str,
    tables: Mapping[str, Any],
    runs_dir: str,
    out_prefix: str,
) -> int:
    """The command line of a table script: ``TABLE [--rounds N] [--runs DIR] [--out FILE]``.

    Builds the chosen table (``tables[name](args) -> (rows, markdown)``), writes its rows with
    the settings and machine to ``--out`` (default ``<out_prefix>_<table>.json``) and prints
    the Markdown table.

    Returns:
      The exit status (0).
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("table", choices=sorted(tables))
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every variant")
    parser.add_argument("--runs", default=runs_dir)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows, table = tables[args.table](args)
    out = args.out or f"{out_prefix}_{args.table}.json"
    meta = {"table": args.table, "rounds": args.rounds, "machine": machine()}
    write_rows(out, rows, meta)
    print(f"{args.table} ({meta['machine']}; rows in {out}):\n{table}")
    return 0
