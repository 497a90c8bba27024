"""Time of one LoRA gradient against the query block size of causal attention.

Usage:
  python scripts/attention_blocks.py                                 # lora-4m, 16 x 1,024 tokens
  python scripts/attention_blocks.py --seq-len 512 --batch 32 --dtype bfloat16
  python scripts/attention_blocks.py --blocks 1024 256 128 64 --out benchmarks/x.json

For a benchmark model (`fedjax_llm.benchmarking.MODELS`, LoRA r=8 on q and v, built as the
benchmark builds it) it compiles the value and gradient of the benchmark's objective (what one
local step computes: the fused output projection and next-token loss) on ``--batch`` random
sequences of ``--seq-len`` tokens once per query block size
(`fedjax_llm.models.llama.ATTENTION_QUERY_BLOCK`; a block of at least the sequence length is the
plain one-block attention) and times them in turn, round after round, so that load changes hit
all alike; it prints the median of ``--rounds`` calls of each and checks that every block size
gives the same loss and gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from fedjax_llm import benchmarking, comparisons
from fedjax_llm.models import llama


def compiled_gradient(setup: benchmarking.Setup, params, batch: dict, block: int):
    """The jitted loss and gradient of the benchmark's objective (what a local step computes),
    traced with query blocks of ``block`` positions."""
    default = llama.ATTENTION_QUERY_BLOCK
    llama.ATTENTION_QUERY_BLOCK = block
    try:

        def loss(params):
            return setup.objective.loss(setup.frozen, params, batch, jax.random.key(0))[0]

        return jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    finally:
        llama.ATTENTION_QUERY_BLOCK = default


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="lora-4m", choices=sorted(benchmarking.MODELS))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=llama.COMPUTE_DTYPES)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 512, 256, 128, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    load = benchmarking.load_average()
    default_block = llama.ATTENTION_QUERY_BLOCK
    spec = benchmarking.with_seq_len(benchmarking.MODELS[args.model], args.seq_len)
    setup = benchmarking.build_setup(spec, 1, "lora", 8, 8, args.dtype, 0)
    params = setup.algorithm.server_params(setup.state.server)
    tokens = jax.random.randint(
        jax.random.key(2), (args.batch, args.seq_len), 0, setup.config.vocab_size, jnp.int32
    )
    batch = {
        "tokens": tokens,
        "loss_mask": jnp.ones(tokens.shape, jnp.float32),
        "example_weight": jnp.ones(args.batch, jnp.float32),
    }
    fns = {b: compiled_gradient(setup, params, batch, b) for b in args.blocks}

    first = jax.block_until_ready(fns[args.blocks[0]](params))
    for block in args.blocks[1:]:
        got = jax.block_until_ready(fns[block](params))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(got), strict=True):
            scale = float(jnp.max(jnp.abs(a))) or 1.0
            tol = 1e-5 if args.dtype == "float32" else 3e-2
            if float(jnp.max(jnp.abs(a - b))) > tol * scale:
                raise SystemExit(f"block {block} differs from block {args.blocks[0]}")

    times = {b: [] for b in args.blocks}
    for _ in range(args.rounds):
        for block, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[block].append(time.perf_counter() - start)
    rows = []
    for block in args.blocks:
        median = statistics.median(times[block])
        rows.append({"block": block, "median_s": median, "times_s": times[block]})
        print(
            f"{args.model} {args.batch} x {args.seq_len} tokens {args.dtype}, query block "
            f"{block:>5}: {median:.3f} s ({median / statistics.median(times[args.blocks[0]]):.2f}"
            f" of block {args.blocks[0]})",
            flush=True,
        )
    result = {
        "machine": comparisons.machine(),
        "settings": {k.replace("_", "-"): v for k, v in vars(args).items() if k != "out"},
        "default_block": default_block,
        "load_average_start": load,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
