"""Where a round's time goes: the compiled round against the bare model work it contains.

Usage:
  python scripts/profile_round.py                                  # lora-4m, C=16, chunk 8
  python scripts/profile_round.py --model tiny --clients 256 --chunk 32
  python scripts/profile_round.py --trace /tmp/round_trace         # + traces and op times
  python scripts/profile_round.py --clients 4 --chunk 4 --seq-len 1024 --rounds 3

For one benchmark workload (`fedjax_llm.benchmarking.MODELS`, LoRA, FedAvg) it times, round by
round in turn so that load changes hit all alike (medians of ``--rounds``):

- **round**: the library's compiled round (`make_round_fn`, as `Simulation` runs it): batch
  drawing on the device, masks, local steps, clipping-free FedAvg aggregation, metrics, server
  update;
- **bare**: the same local training written as a plain-JAX prototype would: the cohort's batches
  gathered beforehand into one ``[C, K, B, T]`` array, ``lax.scan`` over chunks of a ``vmap``
  over clients of a ``lax.scan`` over local SGD steps of ``value_and_grad`` of the same
  objective, and the mean of the deltas. Same FLOPs, none of the round's machinery;
- **model-shaped matmuls**: the forward matmuls of one local step of a chunk at their shapes
  (``[chunk x B x T, d] @ [d, n]`` for the projections and the MLP), each timed alone: the speed
  the device reaches on the shapes the model actually has, against the square peak.

It prints each one's time and MFU against the square float32 matmul peak measured in the same
run, the share of the round that its machinery costs (1 - bare / round), and XLA's cost analysis
of the compiled round (FLOPs and bytes accessed) against the model FLOPs. With ``--trace DIR`` it
writes a `jax.profiler` trace of 2 calls of each (``DIR/round``, ``DIR/bare``; open with
TensorBoard's profile plugin or Perfetto) and prints the XLA operations that took the most time
in each, from the trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm import benchmarking
from fedjax_llm.round import ClientData


def bare_round_fn(setup: benchmarking.Setup, num_clients: int, chunk: int, lr: float):
    """The round's local training as a plain-JAX prototype: pre-gathered batches, no masks."""
    objective = setup.objective
    key = jax.random.key(0)

    def client(params, frozen, batches):
        def step(p, batch):
            grad_fn = jax.value_and_grad(objective.loss, argnums=1, has_aux=True)
            (loss, _), grads = grad_fn(frozen, p, batch, key)
            return jax.tree.map(lambda w, g: w - lr * g, p, grads), loss

        new, losses = jax.lax.scan(step, params, batches)
        return jax.tree.map(jnp.subtract, new, params), losses.mean()

    def round_fn(params, frozen, batches):
        # batches: every field [C, K, B, ...] -> [C / chunk, chunk, K, B, ...]
        chunks = jax.tree.map(lambda x: x.reshape(-1, chunk, *x.shape[1:]), batches)

        def body(total, chunk_batches):
            deltas, losses = jax.vmap(client, in_axes=(None, None, 0))(
                params, frozen, chunk_batches
            )
            return jax.tree.map(lambda t, d: t + d.sum(0), total, deltas), losses

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, losses = jax.lax.scan(body, zeros, chunks)
        new = jax.tree.map(lambda p, t: p + t / num_clients, params, total)
        return new, losses.mean()

    return jax.jit(round_fn)


def gathered_batches(data: ClientData, ids: np.ndarray, steps: int, batch: int) -> dict:
    """``[C, K, B, T]`` batches of the given clients (their first K x B examples)."""
    start = np.asarray(data.client_start)[ids]
    index = start[:, None] + np.arange(steps * batch)[None, :]
    out = {}
    for name, values in data.examples.items():
        taken = np.asarray(values)[index]
        out[name] = jnp.asarray(taken.reshape(len(ids), steps, batch, *taken.shape[2:]))
    out["example_weight"] = jnp.ones((len(ids), steps, batch), jnp.float32)
    return out


def model_matmul_shapes(setup: benchmarking.Setup, chunk: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, inner, cols) of the forward matmuls of one local step of a chunk."""
    cfg = setup.config
    spec = setup.spec
    rows = chunk * spec.batch_size * spec.seq_len
    d, f = cfg.hidden_size, cfg.intermediate_size
    head = d // cfg.num_heads
    kv = cfg.num_kv_heads * head
    return [
        ("q/o projection", rows, d, d),
        ("k/v projection", rows, d, kv),
        ("MLP up/gate", rows, d, f),
        ("MLP down", rows, f, d),
        ("logits", rows, d, cfg.vocab_size),
    ]


def time_matmul(rows: int, inner: int, cols: int, repeats: int) -> float:
    """Median GFLOP/s of one float32 ``[rows, inner] @ [inner, cols]``."""
    a = jax.random.normal(jax.random.key(1), (rows, inner), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (inner, cols), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * rows * inner * cols / statistics.median(times) / 1e9


def op_time_breakdown(folder: str, top: int = 12) -> list[dict]:
    """The kinds of XLA operation that took the most time in a `jax.profiler` trace written to
    ``folder``: ``[{"op", "ms", "share"}]``, summed over instances, threads and calls (on CPUs
    ``ynn_fusion`` and ``onednn`` kinds are library matmuls, ``fusion`` and ``loop_fusion``
    XLA's own elementwise and reduction code), the ``top`` ones (the share is of all XLA
    operations' summed time; "other" collects the rest)."""
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return []
    profile = jax.profiler.ProfileData.from_file(paths[-1])
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    # ynn_fusion.62 -> ynn_fusion: the kind of operation, summed over instances.
                    totals[re.sub(r"\.\d+$", "", str(stats["hlo_op"]))] += event.duration_ns
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [{"op": op, "ms": ns / 1e6, "share": ns / whole} for op, ns in ranked[:top]]
    rest = sum(ns for _, ns in ranked[top:])
    if rest:
        rows.append({"op": "other", "ms": rest / 1e6, "share": rest / whole})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lora-4m", choices=sorted(benchmarking.MODELS))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example T")
    parser.add_argument(
        "--trace",
        help="write jax.profiler traces of 2 calls of each here, and list the costliest ops",
    )
    parser.add_argument("--peak-size", type=int, default=None, help="side of the peak matmul")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.clients % args.chunk:
        parser.error(f"--chunk {args.chunk} must divide --clients {args.clients}.")

    size = args.peak_size or benchmarking.peak_matmul_size(jax.default_backend(), False)
    peak = benchmarking.measure_matmul_peak(size, "float32", 10)
    spec = benchmarking.MODELS[args.model]
    if args.seq_len is not None:
        spec = benchmarking.with_seq_len(spec, args.seq_len)
    setup = benchmarking.build_setup(spec, args.clients, "lora", 8, 8, "float32", 0)
    round_args = benchmarking.make_round_args(setup, args.clients, args.rounds + 2, 0)
    vmapped = benchmarking.build_vmapped(setup, args.chunk, round_args[0])
    vmapped.start(setup, round_args[0])

    params = setup.algorithm.server_params(setup.state.server)
    ids = np.asarray(round_args[0].cohort.client_ids)
    batches = gathered_batches(setup.data, ids, spec.local_steps, spec.batch_size)
    bare = bare_round_fn(setup, args.clients, args.chunk, benchmarking.CLIENT_LR)
    lowered_bare = bare.lower(params, setup.frozen, batches)
    compiled_bare = lowered_bare.compile()
    jax.block_until_ready(compiled_bare(params, setup.frozen, batches))

    def run_bare() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled_bare(params, setup.frozen, batches))
        return time.perf_counter() - t0

    round_s, bare_s = [], []
    for r in range(args.rounds):
        round_s.append(vmapped.advance(round_args[1 + r]))
        bare_s.append(run_bare())
    round_med, bare_med = statistics.median(round_s), statistics.median(bare_s)
    tokens = benchmarking.tokens_per_round(setup, args.clients)
    flops = tokens * setup.flops_per_token
    peak_flops = peak["gflops"] * 1e9

    round_fn = benchmarking.setup_round_fn(setup, args.chunk)
    cost = (
        jax.jit(round_fn)
        .lower(setup.frozen, setup.state, setup.data, *round_args[0])
        .cost_analysis()
    )
    bare_cost = lowered_bare.cost_analysis()

    shapes = []
    for name, rows, inner, cols in model_matmul_shapes(setup, args.chunk):
        gflops = time_matmul(rows, inner, cols, 20)
        shapes.append({"matmul": name, "shape": [rows, inner, cols], "gflops": gflops})

    breakdown = {}
    if args.trace:
        calls = {
            "round": lambda r: vmapped.advance(round_args[1 + r]),
            "bare": lambda r: run_bare(),
        }
        for name, call in calls.items():
            folder = os.path.join(args.trace, name)
            with jax.profiler.trace(folder):
                for r in range(2):
                    call(r)
            breakdown[name] = op_time_breakdown(folder)

    device = jax.devices()[0]
    print(f"{args.model}, LoRA r=8 q/v, C={args.clients}, chunk {args.chunk}, {device.device_kind}")
    print(f"square float32 matmul peak: {peak['gflops']:.1f} GFLOP/s")
    print(f"round: {round_med:.4f} s  MFU {flops / round_med / peak_flops:.1%}")
    print(f"bare:  {bare_med:.4f} s  MFU {flops / bare_med / peak_flops:.1%}")
    print(f"the round's machinery: {1 - bare_med / round_med:.1%} of the round")
    print(
        f"XLA cost analysis: round {cost.get('flops', float('nan')) / 1e9:.2f} GFLOP, "
        f"{cost.get('bytes accessed', float('nan')) / 2**20:.1f} MiB accessed; bare "
        f"{bare_cost.get('flops', float('nan')) / 1e9:.2f} GFLOP; model {flops / 1e9:.2f} GFLOP"
    )
    for row in shapes:
        rows, inner, cols = row["shape"]
        print(
            f"  {row['matmul']:<15} [{rows} x {inner}] @ [{inner} x {cols}]: "
            f"{row['gflops']:7.1f} GFLOP/s ({row['gflops'] / peak['gflops']:.0%} of the peak)"
        )
    for name, rows in breakdown.items():
        print(f"XLA operation kinds of the {name} by summed time (all threads, 2 calls):")
        for row in rows:
            print(f"  {row['op']:<40} {row['ms']:9.1f} ms {row['share']:6.1%}")
    results = {
        "command": [
            "python",
            "scripts/profile_round.py",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "device": benchmarking.describe_device(),
        "model": args.model,
        "clients": args.clients,
        "chunk": args.chunk,
        "seq_len": spec.seq_len,
        "local_steps": spec.local_steps,
        "peak_gflops": peak["gflops"],
        "model_gflop": flops / 1e9,
        "round_s": round_s,
        "bare_s": bare_s,
        "round_mfu": flops / round_med / peak_flops,
        "bare_mfu": flops / bare_med / peak_flops,
        "machinery_share": 1 - bare_med / round_med,
        "xla_round_gflop": cost.get("flops", None) and cost["flops"] / 1e9,
        "xla_round_bytes": cost.get("bytes accessed"),
        "xla_bare_gflop": bare_cost.get("flops", None) and bare_cost["flops"] / 1e9,
        "matmuls": shapes,
        "op_time": breakdown,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
