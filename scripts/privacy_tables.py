"""Reproduces the README's "Privacy and robustness" tables.

Usage:
  python scripts/privacy_tables.py epsilon   # utility against epsilon (configs/dp_fedavg.yaml)
  python scripts/privacy_tables.py attacks   # attack x aggregator (configs/byzantine_*.yaml base)
  python scripts/privacy_tables.py cost      # round time of each mechanism against no DP
  python scripts/privacy_tables.py cost --rounds 10 --out /tmp/cost.json

Each table runs its variants one after another in this process (so round times compare) and
prints a Markdown table; rows and settings go to ``--out`` (default
``benchmarks/privacy_<table>.json``). ``--rounds`` shortens every variant (the README's
figures use the configs' own round counts unless it says otherwise).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.comparisons import markdown_table, run_table_command, run_variants, shortened

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP_BASE = os.path.join(ROOT, "configs", "dp_fedavg.yaml")
BYZANTINE_BASE = os.path.join(ROOT, "configs", "byzantine_sign_flip_krum.yaml")

NO_DP = ["privacy.level=none", "privacy.target_epsilon=null", "sampling.kind=poisson"]

EPSILON_VARIANTS = {
    "no DP": NO_DP,
    "epsilon 32": ["privacy.target_epsilon=32"],
    "epsilon 8": ["privacy.target_epsilon=8"],
    "epsilon 2": ["privacy.target_epsilon=2"],
    "epsilon 0.5": ["privacy.target_epsilon=0.5"],
}

AGGREGATORS = {
    "mean": ["aggregation.aggregator=mean"],
    "median": ["aggregation.aggregator=median"],
    "trimmed mean 0.25": ["aggregation.aggregator=trimmed_mean", "aggregation.trim_fraction=0.25"],
    "multi-Krum": ["aggregation.aggregator=multi_krum"],
    "geometric median": ["aggregation.aggregator=geometric_median"],
    "centered clipping": ["aggregation.aggregator=centered_clipping"],
    "norm bounding": ["aggregation.aggregator=norm_bounding", "aggregation.norm_bound=0.5"],
}
ATTACKS = {
    "none": ["byzantine.fraction=0", "byzantine.attack=none"],
    "sign flip x10": ["byzantine.attack=sign_flip"],
    "ALIE": ["byzantine.attack=alie"],
    "IPM": ["byzantine.attack=ipm"],
    "backdoor": ["byzantine.attack=backdoor"],
}

COST_VARIANTS = {
    "no DP": NO_DP,
    "client DP": ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"],
    "client DP, adaptive clip": [
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "privacy.adaptive_clipping=true",
    ],
    "secure aggregation": [*NO_DP, "secure_aggregation.enabled=true"],
    "client DP + secure aggregation": [
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "secure_aggregation.enabled=true",
    ],
    "sample DP-SGD": [
        "privacy.level=sample",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
    ],
}


def epsilon_table(args) -> tuple[list[dict], str]:
    rows = run_variants(DP_BASE, shortened(EPSILON_VARIANTS, args.rounds), args.runs)
    columns = {
        "name": "target",
        "noise_multiplier": "noise multiplier",
        "epsilon": "epsilon reached",
        "eval_loss": "eval loss",
        "exact_match": "exact match",
    }
    return rows, markdown_table(rows, columns)


def attack_table(args) -> tuple[list[dict], str]:
    variants = {}
    for attack, attack_overrides in ATTACKS.items():
        for aggregator, aggregator_overrides in AGGREGATORS.items():
            variants[f"{attack} / {aggregator}"] = [*attack_overrides, *aggregator_overrides]
    rows = run_variants(BYZANTINE_BASE, shortened(variants, args.rounds), args.runs)
    for row in rows:
        row["attack"], row["aggregator"] = row["name"].split(" / ")
    # One row per attack, one column per aggregator: the final eval loss (backdoor: its
    # success rate, then the loss).
    table = []
    for attack in ATTACKS:
        line = {"attack": attack}
        for row in rows:
            if row["attack"] != attack:
                continue
            value = f"{row['eval_loss']:.3f}"
            if attack == "backdoor" and row["backdoor_success"] is not None:
                value = f"{row['backdoor_success']:.2f} ({value})"
            line[row["aggregator"]] = value
        table.append(line)
    columns = {"attack": "attack \\ aggregator", **{a: a for a in AGGREGATORS}}
    return rows, markdown_table(table, columns)


def cost_table(args) -> tuple[list[dict], str]:
    overrides = ["run.save_checkpoints=false", "eval.every=0"]
    variants = {name: [*o, *overrides] for name, o in COST_VARIANTS.items()}
    rows = run_variants(DP_BASE, shortened(variants, args.rounds or 20), args.runs)
    base = rows[0]["median_round_time_s"]
    for row in rows:
        row["ratio_to_no_dp"] = row["median_round_time_s"] / base
    columns = {
        "name": "mechanism",
        "median_round_time_s": "median round (s)",
        "ratio_to_no_dp": "x no DP",
        "compile_time_s": "compile (s)",
    }
    return rows, markdown_table(rows, columns)


TABLES = {"epsilon": epsilon_table, "attacks": attack_table, "cost": cost_table}


def body(argv: Sequence[str] | None, context: ScriptContext) -> int:
    return run_table_command(
        argv,
        __doc__.split("\n\n")[0],
        TABLES,
        os.path.join("runs", "privacy_tables"),
        os.path.join(ROOT, "benchmarks", "privacy"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the script; returns its exit status."""
    return run_script("privacy_tables.py", body, argv)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
