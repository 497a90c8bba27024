"""Reproduces the README's pre-training comparisons.

Usage:
  python scripts/make_example_data.py            # the texts the tables train on
  python scripts/pretraining_tables.py diloco    # DiLoCo vs FedAvg vs synchronous training
  python scripts/pretraining_tables.py public_private   # public + private data vs either alone
  python scripts/pretraining_tables.py diloco --rounds 5 --out /tmp/diloco.json

``diloco``: configs/diloco_pretrain.yaml (a byte-level Llama, 8 workers on 8 text files, 10
inner AdamW steps per round) against the same compute spent three other ways: DiLoCo with the
workers' AdamW state kept between rounds, FedAvg (plain averaging of the same AdamW steps) and
synchronous data-parallel Adam (one step of the 8 workers' averaged gradient per round, 10x as
many rounds). ``--rounds`` is DiLoCo's number of rounds (default: the config's).

``public_private``: configs/pretrain_public_private.yaml (clients = the private text files, one
per file; the server holds public text of other topics) trained three ways with the same
rounds, clients, local steps and server steps: private only (FedAvg, no public steps; the
public text is only evaluated), public only (the server's warm start and public steps, the
clients' learning rate 0 so their uploads are exactly 0) and public + private (both). Each row
reports the held-out perplexity of the public text, of the private global held-out set and of
the clients' own held-out text. ``--rounds`` sets the rounds of every variant (default 20).

Rows and settings go to ``--out`` (default ``benchmarks/pretraining_<table>.json``).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence

import jax.numpy as jnp

from fedjax_llm.algorithms import HyperParams
from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.comparisons import (
    final_row,
    markdown_table,
    run_table_command,
    run_variants,
    variant_config,
)
from fedjax_llm.simulation import Simulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DILOCO = os.path.join(ROOT, "configs", "diloco_pretrain.yaml")
PUBLIC_PRIVATE = os.path.join(ROOT, "configs", "pretrain_public_private.yaml")
QUIET = ["run.save_checkpoints=false", "run.partition_report=false"]


def diloco_variants(rounds: int, local_steps: int, lr: float) -> dict[str, list[str]]:
    """The four ways of spending ``rounds x local_steps`` steps of each of the workers."""

    def at(num_rounds: int) -> list[str]:
        return [f"run.num_rounds={num_rounds}", f"eval.every={num_rounds}", *QUIET]

    return {
        "DiLoCo (Nesterov 0.7/0.9)": at(rounds),
        "DiLoCo, AdamW state kept between rounds": [
            "algorithm.keep_inner_state=true",
            *at(rounds),
        ],
        "FedAvg (same AdamW steps, plain average)": ["algorithm.type=fedavg", *at(rounds)],
        # One step per round of the averaged gradient: the client's SGD step with lr 1 uploads
        # -gradient, and the server's Adam (the inner AdamW's settings and learning rate)
        # steps on the mean.
        "synchronous data-parallel Adam": [
            "algorithm.type=fedadam",
            "client.optimizer=sgd",
            "client.lr=1.0",
            "client.local_steps=1",
            f"server.lr={lr}",
            "server.momentum=0.9",
            "server.b2=0.999",
            "server.eps=1e-8",
            *at(rounds * local_steps),
        ],
    }


def diloco_table(args) -> tuple[list[dict], str]:
    from fedjax_llm.config import load_config

    config = load_config(DILOCO)
    rounds = args.rounds or config.run.num_rounds
    variants = diloco_variants(rounds, config.client.local_steps, config.client.lr)
    rows = run_variants(DILOCO, variants, args.runs)
    for row in rows:
        row["eval_perplexity"] = math.exp(row["eval_loss"])
        row["client_perplexity_mean"] = math.exp(row["client_loss_mean"])
        row["mb_up"] = row["bytes_up"] / 1e6
    columns = {
        "name": "training",
        "rounds": "communication rounds",
        "eval_perplexity": "held-out perplexity",
        "client_perplexity_mean": "workers' held-out perplexity",
        "mb_up": "MB up",
    }
    return rows, markdown_table(rows, columns)


class ServerOnlySimulation(Simulation):
    """A run whose clients train at learning rate 0 every round, so each upload is exactly 0
    and the model changes only by the server's public steps. (``client.lr`` must be positive
    in a config; the round takes the rate as an array, where 0 is exact.)"""

    def hyperparams(self, round_num: int) -> HyperParams:
        return super().hyperparams(round_num)._replace(client_lr=jnp.float32(0.0))


def public_private_variants(rounds: int) -> dict[str, tuple[type, list[str]]]:
    """The three runs of the table: name -> (simulation class, overrides)."""
    at = [f"run.num_rounds={rounds}", f"eval.every={rounds}", *QUIET]
    return {
        "private only (FedAvg)": (
            Simulation,
            ["public.server_steps=0", "public.warm_start_steps=0", *at],
        ),
        "public only (server steps, clients' lr 0)": (ServerOnlySimulation, at),
        "public + private": (Simulation, at),
    }


def public_private_table(args) -> tuple[list[dict], str]:
    rows = []
    for name, (simulation, overrides) in public_private_variants(args.rounds or 20).items():
        config = variant_config(PUBLIC_PRIVATE, overrides, args.runs, name)
        shutil.rmtree(config.run.output_dir, ignore_errors=True)
        sim = simulation(config, verbose=False)
        history = sim.run()
        last = [h for h in history if "eval/loss" in h][-1]
        rounds = [h for h in history if "round_time_s" in h]
        p = config.public
        row = final_row(sim, history)
        row.update(
            name=name,
            overrides=overrides,
            client_steps=int(sum(h["local_steps"] for h in rounds)),
            server_steps=p.warm_start_steps + len(rounds) * p.server_steps,
            public_perplexity=last["eval/public/perplexity"],
            eval_perplexity=last["eval/perplexity"],
            client_perplexity_mean=last["client/perplexity_mean"],
            client_perplexity_worst10=last["client/perplexity_worst10"],
            initial_public_perplexity=history[0]["eval/public/perplexity"],
        )
        rows.append(row)
    columns = {
        "name": "training",
        "rounds": "rounds",
        "client_steps": "client steps",
        "server_steps": "server steps",
        "public_perplexity": "public held-out ppl",
        "eval_perplexity": "private held-out ppl",
        "client_perplexity_mean": "clients' held-out ppl (mean)",
        "client_perplexity_worst10": "(worst 10%)",
    }
    return rows, markdown_table(rows, columns)


TABLES = {"diloco": diloco_table, "public_private": public_private_table}


def body(argv: Sequence[str] | None, context: ScriptContext) -> int:
    return run_table_command(
        argv,
        __doc__.split("\n\n")[0],
        TABLES,
        os.path.join("runs", "pretraining_tables"),
        os.path.join(ROOT, "benchmarks", "pretraining"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the script; returns its exit status."""
    return run_script("pretraining_tables.py", body, argv)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
