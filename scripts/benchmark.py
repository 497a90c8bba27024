"""Benchmarks the compiled federated round against the library's sequential reference round and
against the same round as a PyTorch loop over clients.

Usage:
  python scripts/benchmark.py                          # lora-4m and tiny, their default C
  python scripts/benchmark.py --models tiny --clients 8 32 --chunk 8 32 --rounds 10
  python scripts/benchmark.py --mode full --out benchmarks/cpu_full.json
  python scripts/benchmark.py --quick                  # smoke run: tiny, C in {2, 4}, 2 rounds
  python scripts/benchmark.py --no-torch               # without the PyTorch loop

For every model and clients-per-round C it times the round of `make_round_fn`, jitted as
`Simulation` jits it, once per ``--chunk`` size, against `make_sequential_round` (one jitted
client update per client) and, with ``--torch`` (the default when PyTorch is installed; LoRA
only), against the round as a PyTorch loop over clients with transformers' LlamaForCausalLM
(`fedjax_llm.torch_reference`), after checking that all give the same new global params. Rows
report the median round time after compilation, the compile time, client updates/s, tokens/s,
model FLOP/s, MFU against a matmul peak measured in the same run and ``vs torch`` (the torch
loop's round time over the row's); the speed targets print as PASS/FAIL lines (the exit status
stays 0). The harness is `fedjax_llm.benchmarking`.
Results go to a readable table on stdout and to ``--out`` (default
``benchmarks/<backend>.json``, or ``benchmarks/<backend>_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax

from fedjax_llm.benchmarking import (
    MODELS,
    BenchmarkSettings,
    format_results,
    run_benchmark,
    torch_importable,
)
from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.models.trainable import TRAINABLE_MODES


def default_out(backend: str, quick: bool) -> str:
    """``benchmarks/<backend>.json`` beside this script's repository (``_quick`` for smoke)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
    return os.path.normpath(os.path.join(root, f"{backend}{'_quick' if quick else ''}.json"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=None,
        help="models to run (default: lora-4m tiny; tiny with --quick)",
    )
    parser.add_argument(
        "--clients",
        nargs="+",
        type=int,
        default=None,
        help="clients per round C (default: each model's own list)",
    )
    parser.add_argument(
        "--chunk",
        nargs="+",
        type=int,
        default=None,
        help="clients per chunk of the vmapped round, swept (default: C)",
    )
    parser.add_argument(
        "--mode",
        choices=TRAINABLE_MODES,
        default="lora",
        help="what clients train (default lora, r=--lora-rank on q, v)",
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=8,
        help="soft prompt / prefix length for those modes",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the model and of the peak matmul",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per example T of every model (default: the model's own, lora-4m 64, "
        "tiny 32, smollm2-135m 256)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per row, median reported (default 5; 2 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds after the (untimed) check round"
    )
    parser.add_argument(
        "--peak-size", type=int, default=None, help="side of the peak matmul (default by backend)"
    )
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument(
        "--no-sequential",
        action="store_true",
        help="skip the sequential variant (and so the equality check and ratio)",
    )
    parser.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the round as a PyTorch loop over clients (LoRA only; default: on when "
        "PyTorch and transformers can be imported)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, C in {2, 4}, 2 timed rounds"
    )
    parser.add_argument(
        "--out", default=None, help="JSON results path (default benchmarks/<backend>[_quick].json)"
    )
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["lora-4m", "tiny"]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.torch is None or args.torch:
        importable = torch_importable()
        if args.torch and not importable:
            parser.error(
                "--torch needs PyTorch and transformers, which cannot be imported; install "
                "torch==2.13.0 (the test extra: pip install -e .[test]) or pass --no-torch."
            )
        if args.torch is None and not importable:
            print(
                "PyTorch is not installed: the torch loop comparison is skipped (install "
                "torch==2.13.0 to run it).",
                file=sys.stderr,
            )
        args.torch = importable
    try:
        args.settings = settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    """The `BenchmarkSettings` of parsed arguments.

    Raises:
      ValueError: for out-of-range values (``--rounds`` < 1, ``--warmup`` < 0, ...).
    """
    return BenchmarkSettings(
        models=tuple(args.models),
        clients=None if args.clients is None else tuple(args.clients),
        chunks=None if args.chunk is None else tuple(args.chunk),
        mode=args.mode,
        lora_rank=args.lora_rank,
        num_virtual_tokens=args.num_virtual_tokens,
        dtype=args.dtype,
        rounds=args.rounds,
        warmup=args.warmup,
        peak_size=args.peak_size,
        peak_repeats=args.peak_repeats,
        sequential=not args.no_sequential,
        torch=args.torch,
        seed=args.seed,
        quick=args.quick,
        seq_len=args.seq_len,
    )


def _benchmark(argv: list[str] | None, context: ScriptContext) -> int:
    del context  # no run directory: an unexpected error's log goes to the temporary folder
    args = parse_args(argv)
    out = args.out or default_out(jax.default_backend(), args.quick)
    command = sys.argv if argv is None else [__file__, *argv]
    results = run_benchmark(args.settings, command, log=lambda message: print(message, flush=True))
    print(format_results(results))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("benchmark", _benchmark, argv)


if __name__ == "__main__":
    exit_process(main())
