"""Compares the next-token loss with the output projection fused into the cross entropy (the
default on `Trainable.apply`, `kernels/linear_cross_entropy.py`) against the plain path that
makes the whole [tokens, vocab] logits, on one chunk of clients of a benchmark model.

Usage:
  python scripts/loss_head.py                              # lora-4m, 8 clients
  python scripts/loss_head.py --model smollm2-135m --clients 4 --no-time
  python scripts/loss_head.py --out benchmarks/loss_head_lora-4m.json

For each path it compiles one LoRA gradient of the loss for a chunk of ``--clients`` clients
(vmapped, as the round runs them; each client one local batch of the model's benchmark shape),
reports XLA's temporary memory for it and, unless ``--no-time``, the median time of
``--repeats`` runs, the two paths taking turns. Random weights: only shapes matter.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.benchmarking import MODELS
from fedjax_llm.comparisons import machine
from fedjax_llm.models import llama
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lora-4m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-time", action="store_true", help="memory analysis only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    spec = MODELS[args.model]
    trainable = make_trainable(spec.config, "lora", lora_rank=8, lora_targets=("q", "v"))
    base = jax.jit(lambda k: llama.init_params(spec.config, k))(jax.random.key(0))
    frozen, params = trainable.frozen(base), trainable.init(jax.random.key(1), base)
    shape = (args.clients, spec.batch_size, spec.seq_len)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(1, spec.config.vocab_size, size=shape), jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.float32),
        "example_weight": jnp.ones(shape[:2], jnp.float32),
    }
    paths = {
        "plain logits": next_token_loss(lambda f, p, t: trainable.apply(f, p, t), 0),
        "fused": next_token_loss(trainable.apply, 0),
    }
    compiled, rows = {}, {}
    for name, objective in paths.items():

        def grad(p, b, objective=objective):
            return jax.grad(lambda q: objective.loss(frozen, q, b, None)[0])(p)

        compiled[name] = jax.jit(jax.vmap(grad, (None, 0))).lower(params, batch).compile()
        temp = compiled[name].memory_analysis().temp_size_in_bytes
        rows[name] = {"temp_mib": temp / 2**20}
    if not args.no_time:
        times = {name: [] for name in paths}
        for fn in compiled.values():
            jax.block_until_ready(fn(params, batch))
        for _ in range(args.repeats):
            for name, fn in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, batch))
                times[name].append(time.perf_counter() - start)
        for name in paths:
            rows[name]["median_ms"] = 1e3 * float(np.median(times[name]))
    for name, row in rows.items():
        timing = f"  {row['median_ms']:8.1f} ms" if "median_ms" in row else ""
        print(f"{name:13s} temp {row['temp_mib']:9.1f} MiB{timing}")
    if not args.no_time:
        ratio = rows["plain logits"]["median_ms"] / rows["fused"]["median_ms"]
        print(f"fused is {ratio:.3f}x the plain path's speed")
    result = {
        "model": args.model,
        "clients": args.clients,
        "tokens_per_client": spec.batch_size * spec.seq_len,
        "vocab": spec.config.vocab_size,
        "backend": jax.default_backend(),
        "machine": machine(),
        "jax": jax.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
