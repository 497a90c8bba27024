"""Reproduces the README's "Beyond FedAvg" comparison and its bytes-against-loss plot.

Usage:
  python scripts/method_tables.py methods       # one row per method family (configs/lora.yaml)
  python scripts/method_tables.py compression   # compressors: bytes sent against final loss
  python scripts/method_tables.py smollm2 --rounds 5   # the families on SmolLM2-135M-Instruct
  python scripts/method_tables.py methods --rounds 10 --out /tmp/methods.json

Every variant is configs/lora.yaml (LoRA r=8 on q, v of the tiny model; 64 clients on a
Dirichlet(0.5) split of the built-in tasks; 16 clients a round) with a few overrides, run one
after another in this process so round times compare. Rows and settings go to ``--out``
(default ``benchmarks/methods_<table>.json``); ``compression`` also draws
``benchmarks/compression_bytes_vs_loss.png``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.comparisons import markdown_table, run_table_command, run_variants, shortened

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "lora.yaml")

RANK_TIERS = ["system.tier_fractions=[0.5,0.3,0.2]", "system.tier_lora_ranks=[2,4,8]"]
# Phones (a third) run 2 steps of 0.5 s, laptops 8 of 0.1 s; a 0.8 s deadline: 1 and 8 steps.
COMPUTE_TIERS = [
    "client.optimizer=sgd",
    "client.lr=0.5",
    "client.local_steps=8",
    "system.tier_fractions=[0.34,0.66]",
    "system.tier_local_steps=[2,8]",
    "system.tier_step_time_s=[0.5,0.1]",
    "system.deadline_s=0.8",
]
METHOD_VARIANTS = {
    "FedAvg (rank 8)": [],
    "HetLoRA, ranks 2/4/8": ["algorithm.type=hetlora", *RANK_TIERS],
    "FlexLoRA, ranks 2/4/8": ["algorithm.type=flexlora", *RANK_TIERS],
    "FLoRA, ranks 2/4/8": ["algorithm.type=flora", *RANK_TIERS],
    "FFA-LoRA, ranks 2/4/8": ["algorithm.type=ffa_lora", *RANK_TIERS],
    "FedAvg, compute tiers + deadline": ["algorithm.type=fedavg", *COMPUTE_TIERS],
    "FedNova, compute tiers + deadline": ["algorithm.type=fednova", *COMPUTE_TIERS],
    "FedSA-LoRA (B personal)": ["algorithm.type=fedsa_lora"],
    "Ditto (lambda 0.1)": ["algorithm.type=ditto", "algorithm.lam=0.1"],
    "top-k 10% + error feedback": ["aggregation.transforms=[topk]"],
    "QSGD 4 bits + error feedback": [
        "aggregation.transforms=[qsgd]",
        "aggregation.quantization_bits=4",
    ],
}

SMOLLM2 = os.path.join(ROOT, "configs", "smollm2_lora_instruct.yaml")
# The same families on SmolLM2-135M-Instruct (LoRA r=8 on q, k, v, o; one client per user of
# the example instructions), on a 600-record subset so that each variant's evaluations (global,
# per client and personal, with greedy decoding) take about a minute on a CPU.
SMOLLM2_SETTINGS = [
    "data.max_examples=600",
    "eval.per_client=true",
    "eval.max_new_tokens=8",
    "run.num_clients_per_round=8",
]
SMOLLM2_VARIANTS = {
    "FedAvg (rank 8)": [],
    "HetLoRA, ranks 2/4/8": ["algorithm.type=hetlora", *RANK_TIERS],
    "FlexLoRA, ranks 2/4/8": ["algorithm.type=flexlora", *RANK_TIERS],
    "FLoRA, ranks 2/4/8": ["algorithm.type=flora", *RANK_TIERS],
    "FFA-LoRA, ranks 2/4/8": ["algorithm.type=ffa_lora", *RANK_TIERS],
    "FedSA-LoRA (B personal)": ["algorithm.type=fedsa_lora"],
    "personal soft prompt (4 tokens) on shared LoRA": [
        "algorithm.type=personal_prompt",
        "trainable.lora_soft_prompt=4",
    ],
    "top-k 10% + error feedback": ["aggregation.transforms=[topk]"],
    "QSGD 4 bits + error feedback": [
        "aggregation.transforms=[qsgd]",
        "aggregation.quantization_bits=4",
    ],
}

COMPRESSION_VARIANTS = {
    "dense": [],
    "top-k 30%": ["aggregation.transforms=[topk]", "aggregation.compression_ratio=0.3"],
    "top-k 10%": ["aggregation.transforms=[topk]", "aggregation.compression_ratio=0.1"],
    "top-k 3%": ["aggregation.transforms=[topk]", "aggregation.compression_ratio=0.03"],
    "top-k 1%": ["aggregation.transforms=[topk]", "aggregation.compression_ratio=0.01"],
    "top-k 10%, no error feedback": [
        "aggregation.transforms=[topk]",
        "aggregation.compression_ratio=0.1",
        "aggregation.error_feedback=false",
    ],
    "random-k 10%": ["aggregation.transforms=[randk]", "aggregation.compression_ratio=0.1"],
    "QSGD 8 bits": ["aggregation.transforms=[qsgd]", "aggregation.quantization_bits=8"],
    "QSGD 4 bits": ["aggregation.transforms=[qsgd]", "aggregation.quantization_bits=4"],
    "QSGD 2 bits": ["aggregation.transforms=[qsgd]", "aggregation.quantization_bits=2"],
    "sign + error feedback": ["aggregation.transforms=[sign]"],
    "low rank 1": ["aggregation.transforms=[lowrank]", "aggregation.lowrank_rank=1"],
}

QUIET = ["run.save_checkpoints=false", "run.partition_report=false"]


def _with_megabytes(rows: list[dict]) -> None:
    for row in rows:
        row["mb_up"] = row["bytes_up"] / 1e6
        row["mb_down"] = row["bytes_down"] / 1e6


METHOD_COLUMNS = {
    "name": "method",
    "eval_loss": "eval loss",
    "exact_match": "exact match",
    "client_loss_mean": "client loss (global model)",
    "personal_loss_mean": "client loss (personal)",
    "mb_up": "MB up",
    "median_round_time_s": "median round (s)",
}


def _families_table(base: str, variants: dict, settings: list[str], args):
    """One row per method family: each variant of ``base`` with ``settings``, MB columns."""
    variants = {name: [*o, *settings, *QUIET] for name, o in variants.items()}
    rows = run_variants(base, shortened(variants, args.rounds), args.runs)
    _with_megabytes(rows)
    return rows, markdown_table(rows, METHOD_COLUMNS)


def methods_table(args) -> tuple[list[dict], str]:
    return _families_table(BASE, METHOD_VARIANTS, [], args)


def smollm2_table(args) -> tuple[list[dict], str]:
    return _families_table(SMOLLM2, SMOLLM2_VARIANTS, SMOLLM2_SETTINGS, args)


def compression_table(args) -> tuple[list[dict], str]:
    variants = {name: [*o, *QUIET] for name, o in COMPRESSION_VARIANTS.items()}
    rows = run_variants(BASE, shortened(variants, args.rounds), args.runs)
    _with_megabytes(rows)
    dense = rows[0]["bytes_up"]
    for row in rows:
        row["share_of_dense"] = row["bytes_up"] / dense
    plot_bytes_vs_loss(rows, os.path.join(ROOT, "benchmarks", "compression_bytes_vs_loss.png"))
    columns = {
        "name": "upload",
        "mb_up": "MB up",
        "share_of_dense": "x dense",
        "eval_loss": "eval loss",
        "median_round_time_s": "median round (s)",
    }
    return rows, markdown_table(rows, columns)


def plot_bytes_vs_loss(rows: list[dict], path: str) -> None:
    """Final eval loss against the total bytes uploaded, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row["mb_up"], row["eval_loss"])
        ax.annotate(
            row["name"],
            (row["mb_up"], row["eval_loss"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("MB uploaded in total (log scale)")
    ax.set_ylabel("final eval loss")
    ax.set_title("configs/lora.yaml: bytes uploaded against loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLES = {"methods": methods_table, "compression": compression_table, "smollm2": smollm2_table}


def body(argv: Sequence[str] | None, context: ScriptContext) -> int:
    return run_table_command(
        argv,
        __doc__.split("\n\n")[0],
        TABLES,
        os.path.join("runs", "method_tables"),
        os.path.join(ROOT, "benchmarks", "methods"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the script; returns its exit status."""
    return run_script("method_tables.py", body, argv)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
